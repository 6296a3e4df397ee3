"""A model for EleutherAI's lm-evaluation-harness backed by a llama_jax model directory.

Importing this module registers `LlamaJaxLM` with the harness as `llama_jax`:

    import lm_eval, llama_jax.lm_eval_model
    lm_eval.simple_evaluate(model="llama_jax", model_args="pretrained=models/tiny,batch_size=16",
                            tasks=["hellaswag"])

`llama-jax lm-eval MODEL_DIR --tasks ...` does the same from the command line (`evaluate_tasks`).
Requests are tokenized as the harness's Hugging Face backend (`hf`) tokenizes them for a LLaMA
tokenizer (BOS first; a context and continuation split where the context's tokens end, or, where
the continuation merged into the context's last piece, where the two part ways) and scored
by `llama_jax.evaluate.Scorer`, so both backends give the same numbers on the same weights.
Needs the `eval` extra (`pip install -e '.[eval]'`); `import llama_jax` never imports this.
"""

from __future__ import annotations

import contextlib
import json
import traceback
import warnings
from pathlib import Path

import lm_eval.models  # noqa: F401  (the harness fills its registry with its own models only while it is empty)
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from llama_jax.evaluate import Scorer, length_bucket

NAME = "llama_jax"
DEFAULT_BATCH_SIZE = 8
# A generation task's settings of its number of new tokens, in the order lm-eval (normalize_gen_kwargs) prefers them
NEW_TOKEN_SETTINGS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def _batch_size(value) -> int:
    """lm-eval passes batch sizes as ints or strings; "auto" (find the largest that fits) is not
    implemented here and means the default."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    return _whole_number("batch_size", value, minimum=1)


def _whole_number(name: str, value, minimum: int) -> int:
    """A model argument (the harness passes `--model_args` as strings) as an integer of at least
    `minimum`; ValueError naming it otherwise, before the model is read."""
    try:
        number = int(str(value))  # (not 2.5 or True, which int() would take)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise ValueError(f"{name}={value!r} is not {'a positive' if minimum == 1 else 'a non-negative'} integer")
    return number


def _mesh_size(name: str, value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: must be a positive integer or -1 (all remaining devices)") from None


class LlamaJaxLM(TemplateLM):
    """`pretrained`: a llama_jax model directory holding its tokenizer.model.
    `max_length`: context length in tokens (default: the model's max_seq_len); `dtype`: compute
    dtype (default: the model's); `max_gen_toks`: default generation length.
    `data`, `fsdp`, `tensor`: the (data, fsdp, tensor) mesh over this host's devices that the model
    is sharded over (default: FSDP over all of them, as `llama-jax eval` does); batch rows are split
    over data x fsdp, so batches are rounded up to a multiple of it."""

    def __init__(self, pretrained: str, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, dtype: str | None = None,
                 device: str | None = None, max_batch_size: int | None = None, seed: int | str = 0,
                 data: int | str = 1, fsdp: int | str = -1, tensor: int | str = 1):
        """`device` and `max_batch_size` are accepted because the harness passes them to every model;
        the mesh decides where the model lives."""
        super().__init__()
        from llama_jax.checkpoint import load_model
        from llama_jax.config import check_seed
        from llama_jax.model_dir import generation_end_ids, load_tokenizer_for
        from llama_jax.prompts import end_ids
        from llama_jax.sharding import make_mesh, mesh_context

        batch_size = _batch_size(batch_size)  # model arguments that are not numbers fail before any reading
        max_length = None if max_length is None else _whole_number("max_length", max_length, minimum=1)
        self._max_gen_toks = _whole_number("max_gen_toks", max_gen_toks, minimum=1)
        self.seed = _whole_number("seed", seed, minimum=0)
        check_seed(self.seed)
        self.mesh = make_mesh(*(_mesh_size(name, value) for name, value in  # a bad mesh fails before any reading
                                (("data", data), ("fsdp", fsdp), ("tensor", tensor))))
        config, self.tokenizer = load_tokenizer_for(
            pretrained, "lm-eval requests are text, so the model directory needs its tokenizer (llama-jax export and "
            "convert --to jax copy it)")
        self.end_ids = end_ids(self.tokenizer, chat=False,  # EOS first
                               listed=generation_end_ids(pretrained, config.vocab_size))
        self.config, self.params = load_model(pretrained, mesh=self.mesh, **({"dtype": dtype} if dtype else {}))
        self.pretrained = str(pretrained)
        self.scorer = Scorer(self.config, self.params, batch_size=batch_size, max_length=max_length, mesh=self.mesh,
                             context=lambda: mesh_context(self.mesh))
        self._batches_sampled, self._seeds_drawn = 0, set()  # each sampled batch has a key of its own
        # what was scored, as the harness's model_args string (for the results file)
        shape = dict(self.mesh.shape)
        self.model_args = ",".join(f"{k}={v}" for k, v in dict(
            pretrained=self.pretrained, batch_size=self.batch_size, max_length=self.max_length,
            max_gen_toks=self._max_gen_toks, dtype=self.config.dtype, seed=self.seed, data=shape["data"],
            fsdp=shape["fsdp"], tensor=shape["tensor"]).items())

    # ---- what the harness asks of a model ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def _eos_text(self) -> str | None:
        """The EOS token's text ("</s>", "<|end_of_text|>"), which the `hf` backend adds to every
        request's stop sequences: a model that writes it as ordinary pieces ends there."""
        eos = self.tokenizer.eos_id
        if hasattr(self.tokenizer, "sp"):  # SentencePiece (a model without EOS has id -1)
            return self.tokenizer.sp.id_to_piece(eos) if eos >= 0 else None
        return next((text for text, i in getattr(self.tokenizer, "special_tokens", {}).items() if i == eos), None)

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Refused: requests are encoded as plain text (special-token text in them stays text, as in
        Meta's code), so a chat template's markers would not be the model's marker tokens."""
        raise ValueError("llama_jax does not apply chat templates (lm-eval's apply_chat_template, with or without "
                         "fewshot_as_multiturn): it encodes requests as plain text; valid: evaluate without "
                         "apply_chat_template (a system_instruction alone is put before each prompt as text)")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Ids of `string`, BOS first unless add_special_tokens is False (as `hf` with a LLaMA tokenizer)."""
        ids = self.tokenizer.encode(string, bos=add_special_tokens is not False, eos=False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        """Text of `tokens`, without special ones (unknown, chat markers) unless asked, as the
        harness's Hugging Face backend decodes generated text."""
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self.tokenizer.special_ids]
        return self.tokenizer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The harness's split of context + continuation into their tokens, except where the
        continuation completes the context's last word ("x = Tru" + "e") and the two tokenize as
        one piece, which leaves the continuation no tokens (the `hf` backend fails there): the
        split is then moved back to where the whole text's tokens and the context's part ways, so
        the continuation is scored as the pieces it changed (here P(▁True | x =))."""
        context_enc, continuation_enc = super()._encode_pair(context, continuation)
        if continuation_enc or not continuation:
            return context_enc, continuation_enc
        whole = self.tok_encode(context + continuation)
        shared = next((k for k, (a, b) in enumerate(zip(whole, context_enc)) if a != b), len(whole))
        split = max(1, min(shared, len(whole) - 1))
        return whole[:split], whole[split:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Scores of the requests' continuation tokens; an empty continuation scores (0.0, True),
        the empty sum."""
        self._check_continuations(requests)
        scored = [i for i, (_, _, continuation) in enumerate(requests) if continuation]
        results = [(0.0, True)] * len(requests)
        answers = self.scorer.loglikelihood([requests[i][1:] for i in scored], progress=not disable_tqdm)
        for i, answer in zip(scored, answers):
            results[i] = answer
        for (strings, _, _), answer in zip(requests, results):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return results

    def _check_continuations(self, requests) -> None:
        """ValueError for a continuation longer than max_length, which no window scores, naming the
        request (in the harness's order) and the max_length that would score it."""
        for i, (strings, _, continuation) in enumerate(requests):
            n, most = len(continuation), self.config.max_seq_len
            if n > self.max_length:
                text = f" {strings[1][:40]!r}{'...' if len(strings[1]) > 40 else ''}" if strings else ""
                valid = (f"max_length (--max-length) of at least {n}, up to the model's max_seq_len ({most})"
                         if n <= most else f"none: the model's max_seq_len is {most}")
                raise ValueError(f"loglikelihood request {i}: its continuation{text} has {n} tokens, more than "
                                 f"max_length={self.max_length} scores in one window; valid: {valid}")

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's tokens (BOS first, as `hf` encodes them) scored after the prefix token,
        in windows of max_length."""
        texts = [request.args[0] for request in requests]
        results = self.scorer.loglikelihood_rolling([self.tok_encode(text) for text in texts], self.prefix_token_id,
                                                    progress=not disable_tqdm)
        for text, result in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), result)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations, cut at the first stop sequence.

        Requests with the same generation settings run together, longest prompt first, in
        batches of batch_size prompts (fewer requests: `Scorer.rows_for`) left-padded to a length
        bucket (one compiled shape each).
        A batch stops decoding once every row has reached EOS or one of its stop sequences, which,
        as the `hf` backend's, include the EOS token's text ("</s>" written as ordinary pieces). A
        row also ends at any other end-of-text id the model's generation_config.json lists, as in
        transformers' `generate` (LLaMA 3 instruct models: <|eot_id|>), and at a stop sequence
        that is a special token's text (`until: ["<|eot_id|>"]`) where the model emits that token:
        special tokens are no text, and the `hf` backend's stop check reads them as their text.
        """
        from tqdm import tqdm

        from llama_jax.config import check_sampling
        from llama_jax.generate import decoding_params, generate
        from llama_jax.prompts import end_ids, through_end

        params = decoding_params(self.config, self.params, self.mesh, batch_size=self.batch_size)  # once, not per batch
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=None if not disable_tqdm else True)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=self._eos_text) if s]
            ends = end_ids(self.tokenizer, chat=False, listed=self.end_ids, stop=until)  # EOS first
            new_tokens = kwargs.pop("max_gen_toks")
            sampled = bool(kwargs.pop("do_sample", False))
            temperature, top_k, top_p = (kwargs.pop(k, None) for k in ("temperature", "top_k", "top_p"))
            temperature = (temperature or 0.0) if sampled else 0.0  # without do_sample the harness means greedy
            try:  # the task's settings, named as such (a bad one failed as if given to generate)
                check_sampling(new_tokens, temperature, top_k, top_p, 0)
            except ValueError as e:
                task = getattr(requests[indices[0]], "task_name", None) or "a task"
                raise ValueError(f"{task}'s generation_kwargs {requests[indices[0]].args[1]}: {e}") from None
            if kwargs:
                warnings.warn(f"generation settings {sorted(kwargs)} are not supported by llama_jax; ignored",
                              stacklevel=2)
            room = self.max_length - new_tokens
            if room < 1:
                setting = next((k for k in NEW_TOKEN_SETTINGS if requests[indices[0]].args[1].get(k) is not None),
                               None)  # (the one the harness took)
                given = ("the task's generation_kwargs set it" if setting
                         else "llama-jax lm-eval --max-gen-toks N, or model arg max_gen_toks=N, sets it")
                raise ValueError(f"{setting or 'max_gen_toks'}={new_tokens} leaves no room for a prompt in the "
                                 f"model's context of {self.max_length} tokens; valid: below {self.max_length} "
                                 f"({given})")
            prompts, cut = {}, 0
            for i in indices:
                ids = self.tok_encode(requests[i].args[0])
                cut += len(ids) > room
                prompts[i] = ids[-room:]
            if cut:
                warnings.warn(f"{cut} prompts are longer than the model's context leaves room for "
                              f"({room} tokens + {new_tokens} new); they were truncated from the left", stacklevel=2)
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            B = self.scorer.rows_for(len(order))
            for start in range(0, len(order), B):
                chosen = order[start:start + B]
                batch = [prompts[i] for i in chosen]
                batch += [[self.prefix_token_id]] * (B - len(batch))  # one batch shape for every batch

                def finished(rows, real=len(chosen)):  # filler rows, and rows that reached an end or stop sequence
                    return [k >= real or any(e in row for e in ends[1:])
                            or any(s in self.tok_decode(row) for s in until) for k, row in enumerate(rows)]

                outputs = generate(self.config, params, batch, new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=self._sampling_seed(temperature),
                                   eos_id=ends[0],
                                   n_tokens=self.tokenizer.vocab_size, on_tokens=finished,
                                   pad_to=length_bucket(len(batch[0]), room), mesh=self.mesh)
                for i, ids in zip(chosen, outputs):
                    # (an end id that is an ordinary piece is text, as the `hf` backend's decode keeps it)
                    text = postprocess_generated_text(self.tok_decode(through_end(ids, ends)), until, None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chosen))
        bar.close()
        return results

    def _sampling_seed(self, temperature: float) -> int:
        """The seed of the next batch of generation requests: one of its own per sampled batch, drawn
        from `seed` and the batch's number, so that a task's repeats (the same request several times,
        in one batch or several) are independent samples, and a run is reproducible."""
        if not temperature:  # greedy: no draw
            return self.seed
        while True:  # a seed is 32 bits (a key keeps no more): one already drawn is skipped
            self._batches_sampled += 1
            seed = int(np.random.SeedSequence([self.seed, self._batches_sampled]).generate_state(1, np.uint32)[0])
            if seed not in self._seeds_drawn:
                self._seeds_drawn.add(seed)
                return seed


if NAME not in model_registry:  # a module imported again must not collide with its first import
    register_model(NAME)(LlamaJaxLM)


def evaluate_tasks(model_dir: str, tasks: list[str], num_fewshot: int | None = None, limit: int | float | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, include_path: str | None = None, max_length: int | None = None,
                   dtype: str | None = None, log_samples: bool = False, include_defaults: bool = True,
                   mesh: tuple[int, int, int] = (1, -1, 1), max_gen_toks: int | None = None) -> dict:
    """Run lm-eval tasks on a model directory; returns the harness's results dict.

    The tasks are built once, before the model is loaded (`_build_tasks`), so an unknown name, a
    task the harness cannot read or prepare, a metric it cannot resolve, or more few-shot examples
    than a task's documents hold is a ValueError before the minutes a large model takes to load;
    `simple_evaluate` runs the tasks built then.
    `include_path`: a directory of task YAML files of one's own; `include_defaults=False` leaves out
    the harness's tasks (faster; also done when every task named is one of its own tasks, not a
    group or tag).
    `mesh`: (data, fsdp, tensor) sizes of the device mesh the model is sharded over.
    `max_gen_toks`: new tokens of generation tasks whose settings do not give them (default 256)."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise ValueError("no task given; pass --tasks NAME[,NAME...] (`lm-eval ls tasks` lists them)")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path}: not a directory of task YAML files")
    manager = _task_manager(tasks, include_path, include_defaults)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    unreadable = _unreadable_task_files(include_path) if unknown and include_path is not None else {}
    if unreadable:  # the harness leaves such a file out, and its task is then unknown
        named = [path for path in unreadable if unknown[0] in path.read_text(encoding="utf-8", errors="replace")]
        path = (named or list(unreadable))[0]  # the file that names the task, likely
        raise ValueError(f"lm-eval has no task {unknown[0]!r}; --include-path {include_path} holds a task file the "
                         f"harness left out: {path}: {unreadable[path]}")
    if unknown:
        raise ValueError(f"lm-eval has no task {unknown[0]!r}; `lm-eval ls tasks` lists the tasks it knows "
                         f"(tasks of your own: --include-path DIR of task YAML files)")
    with _task_errors(tasks, include_path, num_fewshot):
        built = _build_tasks(tasks, manager)  # before the model is read, which takes minutes for a large one
    _check_fewshot(built.built["tasks"], num_fewshot)
    data, fsdp, tensor = mesh
    model = LlamaJaxLM(model_dir, batch_size=batch_size, max_length=max_length, dtype=dtype, data=data, fsdp=fsdp,
                       tensor=tensor, **({} if max_gen_toks is None else {"max_gen_toks": max_gen_toks}))
    with _task_errors(tasks, include_path, num_fewshot):
        results = simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=built, log_samples=log_samples)
    # the harness records a model object as its class name alone: say what was scored, and how
    results["config"] = {**results.get("config", {}), "model": NAME, "model_args": model.model_args,
                         "batch_size": model.batch_size}
    return results


def _task_manager(tasks: list[str], include_path: str | None, include_defaults: bool):
    """The harness's index of the tasks under `include_path` and, with `include_defaults`, its own:
    only those under `include_path` when every name in `tasks` is a task there (not a group or a
    tag, which may name the harness's tasks), sparing the seconds it takes to index its thousands."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and include_defaults:
        own = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(own.all_subtasks):
            return own
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _build_tasks(tasks: list[str], manager) -> _BuiltTasks:
    """Build the tasks as `simple_evaluate` builds them (their configs, data, templates and metrics
    read), so that what fails there fails before the model is read, for `simple_evaluate` to run
    (`_BuiltTasks`). Python's and NumPy's generators are seeded as `simple_evaluate` seeds them
    before its build, so a task that draws from them as it is built (GPQA shuffles its choices)
    draws what the harness's own build would. Raises ValueError for a metric that the harness
    resolves to nothing (`_unknown_metric`)."""
    import inspect
    import random

    from lm_eval import simple_evaluate
    from lm_eval.api.registry import METRIC_REGISTRY
    from lm_eval.api.task import ConfigurableTask

    seeds = inspect.signature(simple_evaluate).parameters
    random.seed(seeds["random_seed"].default)
    np.random.seed(seeds["numpy_random_seed"].default)
    built = manager.load(list(tasks))  # {"tasks": {name: task}, "groups": {name: group}, "group_map": ...}

    # A metric whose function the harness could not find (`get_metric` gave None): a generation task
    # calls it once generated; other tasks score the registered metrics themselves (as with
    # `hf_evaluate: true` offline) and leave any other name out of their results.
    for task in built["tasks"].values():
        if isinstance(task, ConfigurableTask) and task.config.process_results is None \
                and type(task).process_results is ConfigurableTask.process_results:
            generates = task.config.output_type == "generate_until"
            for metric, function in task._metric_fn_list.items():  # (else a function of the task's own scores it)
                if function is None and (generates or metric not in METRIC_REGISTRY):
                    raise ValueError(_unknown_metric(task.config.task, metric, aggregated=True))
    return _BuiltTasks(manager, built, (random.getstate(), np.random.get_state()))


def _check_fewshot(tasks: dict, num_fewshot: int | None) -> None:
    """ValueError for a task that would be asked for more few-shot examples than its few-shot
    documents hold (the harness finds it as it builds the prompts, after the model is read). The
    number is `num_fewshot` unless the task's config sets 0 (the harness keeps that) or, without
    it, the task's own; where the task's few-shot split is its test split, each question is left
    out of its own examples, so one more document is needed (a task that falls back on its test
    documents for want of others keeps each question among them, as the harness samples them)."""
    for task in tasks.values():
        own = task.get_config("num_fewshot")
        shots = (own if num_fewshot is None or own == 0 else num_fewshot) or 0
        sampler = getattr(task, "sampler", None)
        if not shots or sampler is None:
            continue
        held = len(sampler.fewshot_indices or sampler.df)
        split = getattr(getattr(task, "fewshot_cfg", None), "split", None)
        itself = split is not None and split == task.config.test_split
        if shots + itself > held:
            given = f"--num-fewshot {num_fewshot}" if num_fewshot is not None else f"its config's num_fewshot: {shots}"
            raise ValueError(f"lm-eval task {task.config.task!r} has {held} few-shot document(s)"
                             + (" (its test documents, each question left out of its own examples)" if itself
                                else "") + f", fewer than {given} asks for; valid: at most {held - itself}")


class _BuiltTasks:
    """The task manager `simple_evaluate` is given to run tasks built beforehand: its `load` gives
    them, as the manager's `load` built them, and puts Python's and NumPy's generators back where
    that build left them (`simple_evaluate` seeds them, then loads the tasks), so the harness runs
    the tasks, and draws from the generators as they run (a task that reads its documents again
    draws again; the harness draws as it names a task), as it runs the tasks it builds itself.
    Everything else (its index of tasks) is the manager's."""

    def __init__(self, manager, built: dict, generators: tuple):
        self.manager, self.built, self.generators = manager, built, generators

    def load(self, task_list) -> dict:
        import random

        random.setstate(self.generators[0])
        np.random.set_state(self.generators[1])
        return self.built

    def __getattr__(self, name: str):
        return getattr(self.manager, name)


@contextlib.contextmanager
def _task_errors(tasks: list[str], include_path: str | None, num_fewshot: int | None):
    """An error of the harness's code (reading a task's config, data or templates, a task of one's own
    or a dataset it cannot fetch; or scoring it) as one ValueError line naming the tasks and its
    causes; errors raised in this package's code pass unchanged."""
    try:
        yield
    except Exception as e:
        if _raised_in_llama_jax(e):
            raise
        if isinstance(e, KeyError) and e.args == (None,):
            named = _metric_without_aggregation(e)
            if named:
                raise ValueError(_unknown_metric(*named, aggregated=False)) from e
        where = f" (tasks of your own: check their files under --include-path {include_path})" if include_path else ""
        if num_fewshot and isinstance(e, ValueError) and str(e).startswith("Sample larger than population"):
            where = (f" (--num-fewshot {num_fewshot} asks for more examples than a task's few-shot documents "
                     f"hold, one fewer when its fewshot_split is its test split; give fewer)")  # random.sample's error
        raise ValueError(f"lm-eval failed on the task(s) {', '.join(tasks)}: {_causes(e)}{where}") from e


def _raised_in_llama_jax(error: BaseException) -> bool:
    """Whether `error` comes from this package's code (the model's methods the harness calls), a
    failure of ours whose traceback is wanted, rather than from the harness's code (reading a
    task, or the settings it hands the model): which of the two holds the innermost frame of its
    traceback that is either's (code both call, such as NumPy's, raises for its caller)."""
    import lm_eval

    ours, harness = Path(__file__).parent, Path(lm_eval.__file__).parent
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if Path(frame.filename).is_relative_to(ours):
            return True
        if Path(frame.filename).is_relative_to(harness):
            return False
    return False


def _metric_without_aggregation(error: KeyError) -> tuple[str, str] | None:
    """The (task, metric) behind the harness's `KeyError: None` while it builds a task whose
    metric_list names a metric it does not register without giving an aggregation (it looks up
    the name of the default aggregation it found, None), as the task being built held them."""
    from lm_eval.api.task import ConfigurableTask

    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code is ConfigurableTask.__init__.__code__ and "metric_name" in frame.f_locals:
            return frame.f_locals["self"].config.task, frame.f_locals["metric_name"]
    return None


def _unknown_metric(task: str, metric: str, aggregated: bool) -> str:
    """The line for a task whose metric_list names a metric the harness has no function for: one it
    does not register, without an aggregation (it stops building the task) or with one (no function
    for it elsewhere, Hugging Face Evaluate: a generation task fails once generated, "'NoneType'
    object is not callable", other tasks leave the metric out of their results); or a registered one
    of a generation task's marked `hf_evaluate: true`, which Hugging Face Evaluate did not load."""
    from lm_eval.api.registry import METRIC_AGGREGATION_REGISTRY, METRIC_REGISTRY

    if metric in METRIC_REGISTRY:
        return (f"task {task!r}: its metric_list names {metric!r} with `hf_evaluate: true`, which Hugging Face "
                f"Evaluate does not load here (offline, or not one of its metrics), and the task would stop on it "
                f"once generated; drop `hf_evaluate` to score lm-eval's own {metric!r}")
    problem = " and Hugging Face Evaluate does not load" if aggregated else ", without an aggregation"
    return (f"task {task!r}: its metric_list names {metric!r}, a metric lm-eval does not register{problem}; "
            f"valid: a metric it registers ({', '.join(sorted(METRIC_AGGREGATION_REGISTRY))}), or another "
            f"(a `!function` metric, a Hugging Face Evaluate metric) with its aggregation beside it (such as "
            f"`aggregation: mean`)")


def _causes(error: BaseException) -> str:
    """`error` and the errors that caused it, one line: "Type: first line (Cause: first line)"."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 4:
        chain.append(chain[-1].__cause__)
    text = [_one_line(e) for e in chain]
    return text[0] + "".join(f" ({t})" for t in text[1:])


def _one_line(error: BaseException) -> str:
    """"Type: first line", or, for an error without a message (a StopIteration of an empty data
    file), where it was raised."""
    first = (str(error).strip().splitlines() or [""])[0]
    if first:
        return f"{type(error).__name__}: {first}"
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (raised in {Path(frames[-1].filename).name}, {frames[-1].name})" if frames else ""
    return f"{type(error).__name__} without a message{where}"


def _unreadable_task_files(include_path: str) -> dict[Path, str]:
    """The task files under `include_path` (`*.yaml`, as the harness finds them) that the harness
    leaves out, each with its problem: not valid YAML ("problem (line N)"), or an `include:` of a
    file that is not there (the harness reads it beside the task file). Tags such as its
    `!function` are accepted as they are."""
    import yaml

    class AnyTag(yaml.SafeLoader):
        pass

    AnyTag.add_multi_constructor("", lambda loader, suffix, node: None)
    unreadable = {}
    for path in sorted(p for p in Path(include_path).rglob("*.yaml") if p.is_file()):
        try:
            document = yaml.load(path.read_text(encoding="utf-8"), Loader=AnyTag)  # noqa: S506 (a safe loader)
        except yaml.MarkedYAMLError as e:
            line = f" (line {e.problem_mark.line + 1})" if e.problem_mark is not None else ""
            unreadable[path] = f"{e.problem or e.context}{line}"
            continue
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            unreadable[path] = (str(e).splitlines() or [""])[0]
            continue
        except OSError:  # unreadable: the harness cannot read it either
            continue
        included = document.get("include") if isinstance(document, dict) else None
        missing = [name for name in (included if isinstance(included, list) else [included])
                   if isinstance(name, str) and not (path.parent / name).is_file()]
        if missing:
            unreadable[path] = f"its include {missing[0]!r} is not there (read from {path.parent})"
    return unreadable
