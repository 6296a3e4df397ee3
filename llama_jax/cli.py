"""The `llama-jax` command: parse, call the package, report. User errors exit with one line."""

from __future__ import annotations

import sys

from llama_jax.signals import interrupt_at_once

if __name__ == "__main__" or sys.argv[0].rpartition("/")[2] == "llama-jax":  # the program (its console script)
    interrupt_at_once("llama-jax")  # before the imports below, which take a while

import argparse
import contextlib
import errno
import io
import json
import logging
import math
import os
import re
import resource
import select
import shlex
import signal
import tempfile
import threading
import traceback
import warnings
from pathlib import Path
from stat import S_ISDIR, S_ISREG

from llama_jax.distributed import MAX_JOIN_TIMEOUT_S, check_process_flags, join_run, joins_others
from llama_jax.safe_io import (RUN_DATA_DIR, check_folder, check_outside_runs_and_models, check_results_file,
                               check_run_config, check_writable, enclosing_run_or_model, holds_lock, holds_run,
                               quiet_abandoned_reads, run_directory_problem, saved_run_setting, write_json_atomic)
from llama_jax.signals import RAISING, Terminated, ignore_signals, raising_signals, signal_again, stopped_status


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, pointing at --help rather than printing the usage."""

    given: list[str] = []  # the arguments being parsed, for the messages of any parser

    def error(self, message: str):
        # argparse takes a value that starts with "-" (and is no plain number) for an option: --stop -x
        flag = re.fullmatch(r"argument (?:\S+/)?(--\S+): expected one argument", message)
        if flag and any(len(a) > 2 and flag[1].startswith(a) and b.startswith("-")
                        for a, b in zip(self.given, self.given[1:])):
            message += f"; give a value that starts with '-' as {flag[1]}=VALUE"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, except that arguments no parser knows are reported by the innermost
        subcommand's parser ("llama-jax train: error: ..."), whose --help lists what is valid."""
        OneLineParser.given = list(sys.argv[1:] if args is None else args)
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self._innermost_parser(parsed).error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def _innermost_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                return action.choices[getattr(parsed, action.dest)]._innermost_parser(parsed)
        return self


def cmd_presets(args) -> None:
    from llama_jax import PRESETS, param_count

    print(f"{'preset':<16} {'params':>17} {'dim':>6} {'layers':>6} {'heads':>5} {'kv':>3} {'ffn':>6} "
          f"{'vocab':>7} {'ctx':>7}  rope")
    for name, c in PRESETS.items():
        rope = f"theta={c.rope_theta:g}" + (f", {c.rope_scaling.rope_type} x{c.rope_scaling.factor:g}"
                                              if c.rope_scaling else "")
        print(f"{name:<16} {param_count(c):>17,} {c.dim:>6} {c.n_layers:>6} {c.n_heads:>5} {c.n_kv_heads:>3} "
              f"{c.ffn_dim:>6} {c.vocab_size:>7} {c.max_seq_len:>7}  {rope}{', tied' if c.tie_embeddings else ''}")


def cmd_demo(args) -> int:
    from llama_jax.demo import run_demo

    return run_demo(args.workdir, args.overrides)


def _check_model_or_run(args) -> None:
    """UserError unless a command that reads a model directory or a run's checkpoint is given one."""
    if (args.model is None) == (args.workdir is None):
        raise UserError("give a model directory or --workdir RUN (one of them)")
    if args.step is not None and args.workdir is None:
        raise UserError("--step needs --workdir (a model directory holds one set of parameters)")


def _check_generate_arguments(args) -> None:
    """What generate refuses of its arguments alone (no file read), also checked by a launcher."""
    from llama_jax.config import check_sampling
    from llama_jax.mesh_axes import check_mesh_sizes
    from llama_jax.prompts import check_infill_prompt
    from llama_jax.tokenizer import unicode_problem

    _check_model_or_run(args)
    if args.workdir is not None and args.tokenizer:
        raise UserError("--tokenizer is for a model directory; --workdir uses the tokenizer the run trained with")
    if any(s == "" for s in args.stop or ()):
        raise UserError("--stop must not be empty")
    for option, texts in (("--prompt", args.prompt or ()), ("--stop", args.stop or ())):
        for text in texts:
            if problem := unicode_problem(text, from_argv=True):  # bytes of another encoding, passed on escaped
                raise UserError(f"{option}: not UTF-8 text ({problem})")
    if not args.prompt and not args.prompts_file:
        raise UserError("no prompts; give --prompt TEXT (repeatable) and/or --prompts-file FILE")
    if args.infill and args.chat:
        raise UserError("--infill and --chat exclude each other: a prompt is an infilling problem or a user turn")
    if args.infill:
        for prompt in args.prompt or ():
            check_infill_prompt(prompt)
    if (args.prompts_file or []).count("-") > 1:  # the second read would find it empty
        raise UserError("--prompts-file - is given more than once; standard input is read once, so give it once")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)  # before loading
    if args.mesh is not None:  # what holds of the sizes whatever the device count
        check_mesh_sizes(*args.mesh)


def cmd_generate(args) -> None:
    from llama_jax.model_dir import generation_end_ids, load_tokenizer_for
    from llama_jax.prompts import check_infill_prompt, complete, infill_pieces, read_prompts_file
    from llama_jax.tokenizer import check_fits, load_tokenizer

    _check_generate_arguments(args)
    prompts = list(args.prompt or []) + [p for file in args.prompts_file or [] for p in read_prompts_file(file)]
    if not prompts:
        raise UserError("no prompts: the --prompts-file files hold none")
    if args.infill:  # (the --prompt ones were checked with the arguments)
        for prompt in prompts[len(args.prompt or ()):]:
            check_infill_prompt(prompt)

    mesh = None
    if args.mesh is not None:  # a mesh the devices cannot hold fails before anything is read
        from llama_jax.sharding import make_mesh

        mesh = make_mesh(*args.mesh)
    if args.workdir is not None:
        problem = run_directory_problem(Path(args.workdir).absolute())  # before importing JAX: refused at once
        if problem is not None:
            raise UserError(problem)
        from llama_jax.evaluate import load_run

        from llama_jax.run import model_tokenizer

        config, params, tokenizer_path, _, _ = load_run(args.workdir, args.step, mesh)
        tokenizer = load_tokenizer(tokenizer_path)
        check_fits(tokenizer, config.vocab_size)
        files = model_tokenizer(args.workdir, Path(tokenizer_path))  # the export's: a fine-tune's end ids too
        end_tokens = generation_end_ids(files, config.vocab_size) if files.is_dir() else []
    else:
        config, tokenizer = load_tokenizer_for(args.model, "pass --tokenizer PATH", args.tokenizer)
        if args.infill:  # before the parameters are read
            infill_pieces(tokenizer)
        end_tokens = generation_end_ids(args.model, config.vocab_size)
        from llama_jax.checkpoint import load_model  # imports JAX: after the checks that need none

        config, params = load_model(args.model, mesh=mesh)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop=args.stop or (), chat=args.chat, mesh=mesh,
                   end_tokens=end_tokens, infill=args.infill)
    # Plain prompts print as prompt + continuation; --chat prints the reply alone, --infill the filling.
    heads = [""] * len(prompts) if args.chat or args.infill else prompts
    if len(prompts) == 1 and not args.no_stream:
        started = False

        def stream(piece: str) -> None:
            nonlocal started
            if not started:
                print(heads[0], end="", flush=True)
                started = True
            print(piece, end="", flush=True)

        texts = complete(config, params, tokenizer, prompts, stream=stream, **options)
        print(heads[0] if not started else "")
        return
    texts = complete(config, params, tokenizer, prompts, **options)
    print("\n\n-----\n\n".join(head + text for head, text in zip(heads, texts)))


def finite_float(text: str) -> float:
    """argparse type: a number that is not NaN or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(minimum: int, maximum: int | None = None, most: str | None = None):
    """argparse type: an integer of at least `minimum` (and at most `maximum`, written `most` in
    messages)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {most or maximum}, got {value}")
        return value

    return parse


positive_int = int_at_least(1)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB' or a plain byte count -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("IB").rstrip("KMG")
    unit = text.strip().upper()[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError):  # OverflowError: inf
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be at least 1 byte, got {text!r}")
    return size


def cmd_convert(args) -> None:
    from llama_jax.convert.pipeline import convert, inapplicable_option

    options = dict(shards=args.shards, max_shard_bytes=args.max_shard_size,
                   rope_scaling_factor=args.rope_scaling_factor)
    inapplicable = inapplicable_option(args.src_format, args.dst_format, options)
    if inapplicable is not None:
        name, side, fmt = inapplicable
        flag = {"max_shard_bytes": "--max-shard-size"}.get(name, "--" + name.replace("_", "-"))
        used = args.dst_format if side == "to" else args.src_format
        raise UserError(f"{flag} applies to --{side} {fmt} only; drop it for --{side} {used}")
    summary = convert(args.src_format, args.src, args.dst_format, args.dst, dtype=args.dtype,
                      overwrite=args.overwrite, verify=args.verify, **options)
    if summary.verify is not None:
        print(summary.verify.line())
    print(summary.line(args.src_format, args.dst_format, args.dst))


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    from llama_jax.convert import FORMATS

    p.add_argument("--from", dest="src_format", required=True, choices=FORMATS,
                   help="hf: config.json + safetensors/.bin; meta: params.json + consolidated.NN.pth; "
                        "jax: a llama_jax model directory")
    p.add_argument("--to", dest="dst_format", required=True, choices=FORMATS)
    p.add_argument("src", help="source directory")
    p.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written weights (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.add_argument("--verify", action="store_true",
                   help="compare source and converted logits on a probe batch; fail beyond tolerance")
    p.add_argument("--shards", type=int, default=None, metavar="N",
                   help="number of consolidated.NN.pth files for --to meta (default 1)")
    p.add_argument("--max-shard-size", type=parse_size, default=None,
                   help="largest safetensors file for --to hf (default 5GB)")
    p.add_argument("--rope-scaling-factor", type=finite_float, default=None, metavar="F",
                   help="LLaMA-3 rope scaling factor for Meta checkpoints with use_scaled_rope "
                        "(default: the factor a conversion to meta recorded in llama_jax.json, or in params.json "
                        "in earlier versions, else 8; LLaMA-3.2 1B/3B use 32)")


def _check_overrides_in_sections(overrides: list[str], sections: tuple[str, ...], command: str, why: str) -> None:
    """UserError for an override of a config section `command` does not read (it would be ignored)."""
    unused = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] not in sections]
    if unused:
        raise UserError(f"--config.{unused[0]}: {command} reads only the {', '.join(sections)} section(s) of the "
                        f"config ({why}); drop the override")


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.a.b=v` (or `--config.a.b v`) overrides from the other arguments."""
    rest, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg == "--":  # what follows is another command line (launch): passed on untouched
            rest += [arg, *it]
            break
        if arg.startswith("--config."):
            item = arg[len("--config."):]
            if "=" not in item:
                value = next(it, None)
                # forgotten, not the next option taken as its text (--config.k --dry-run: a sweep that ran)
                if value is None or value == "--" or re.match(r"--[A-Za-z]", value):
                    hint = f"; give a value that starts with '--' as {arg}=VALUE" if value else ""
                    raise UserError(f"{arg}: missing value{hint}")
                item = f"{item}={value}"
            overrides.append(item)
        else:
            rest.append(arg)
    return rest, overrides


def _attach_mesh_values(argv: list[str]) -> list[str]:
    """`--mesh -1,4,1` as `--mesh=-1,4,1`: argparse reads a separate value that starts with "-" (and
    is not one plain number) as an option, so a mesh whose first size is -1 would be refused."""
    joined = []
    for i, arg in enumerate(argv):
        if arg == "--":  # another command line (launch): passed on untouched
            return joined + argv[i:]
        if joined and joined[-1] == "--mesh" and arg[:1] == "-" and arg[1:2].isdigit():
            joined[-1] = f"--mesh={arg}"
        else:
            joined.append(arg)
    return joined


def cmd_train(args) -> None:
    from llama_jax.experiment import check_experiment, load_config
    from llama_jax.run_files import check_train_workdir

    check_process_flags(args)
    config = load_config(args.config, args.overrides)
    # before importing JAX: a bad config fails at once (a resume takes an init_from model from its checkpoints)
    check_experiment(config, read_init_from=not holds_run(args.workdir))
    if not joins_others(args):  # and a bad --workdir (the processes of a multi-process run check it once joined)
        check_train_workdir(Path(args.workdir).absolute(), config)
    from llama_jax.run import log_line, train_and_evaluate

    join_run(args)
    result = train_and_evaluate(config, args.workdir, resume_from=args.resume_from)
    # trained, or preempted and saved: a signal now would only misreport how the run ended (the
    # handlers `raising_signals` installed are replaced, and it puts back what was there before)
    ignore_signals(tuple(RAISING))
    import jax

    # only process 0 writes the run's metrics; the others say so rather than name a file they did not write
    log = Path(args.workdir) / "metrics.jsonl"
    metrics = (f"metrics in {log}" if jax.process_index() == 0 else
               f"process {jax.process_index()}; process 0 writes {log}")
    last = next((r for r in reversed(result.logged) if "loss" in r), None)
    if last:
        of_last_step = {k: v for r in result.logged if r["step"] == last["step"] for k, v in r.items()}
        print(f"{log_line(last['step'], of_last_step)}; {metrics}")  # with the closing evaluation's record
    elif not result.preempted and result.final_step == config.train.steps:
        held_out = f"held-out loss {result.eval['eval_loss']:.4f}; " if result.eval else ""  # logged, or made now
        print(f"{args.workdir} already holds step {result.final_step} of train.steps={config.train.steps}: nothing "
              f"left to train (a larger train.steps continues it, the learning-rate schedule recomputed over the new "
              f"total); {held_out}{metrics}")


def cmd_export(args) -> None:
    from llama_jax.run_files import check_export

    check_export(Path(args.workdir).absolute(), args.dst, args.overwrite, args.step)  # before importing JAX
    from llama_jax import param_count
    from llama_jax.run import export_model

    path, step, model = export_model(args.workdir, args.dst, args.step, args.overwrite)
    # the model directory is in place, nothing is left to stop (param_count traces the model); the handlers
    # `raising_signals` installed are replaced, and it puts back what was there before
    ignore_signals(tuple(RAISING))
    shown = f"./{path}" if str(path).startswith("-") else str(path)  # (as an argument, not an option)
    print(f"exported step {step} of {args.workdir} ({param_count(model):,} parameters) to {path}; "
          f"llama-jax convert --from jax --to hf {shlex.quote(shown)} DST makes a Hugging Face checkpoint of it")


def _check_run_directory(workdir, config: str | None, for_a_model: str = "") -> None:
    """UserError when --workdir is missing, a file or a model directory rather than a run's directory;
    `for_a_model`: what to do with a model directory instead. Without a --config (`config`), the
    run's own config.json must be intact as well."""
    problem = run_directory_problem(workdir, for_a_model)
    if problem is not None:
        raise UserError(problem)
    if config is None:
        check_run_config(workdir, "give the run's config with --config CONFIG")


def _runs_own_data(args, config) -> bool:
    """Whether a command given --workdir RUN reads the run's own data: no data.* override, and no
    --config or one whose data section is RUN/config.json's (`run_data.runs_own_settings`). An
    override is read from here, as given, even one spelled as the run's own setting: a relative
    path then names what it names here, which may be other data than the run read."""
    from llama_jax.run_data import runs_own_settings

    return args.workdir is not None and not any(o.split("=", 1)[0].startswith("data.") for o in args.overrides) \
        and runs_own_settings(config.data, Path(args.workdir))


EVAL_RESULT_KEYS = ("loss", "perplexity", "tokens")  # what marks a file as an earlier result of eval
LM_EVAL_RESULT_KEYS = ("results", "configs")  # ... of lm-eval


def _check_config_mesh_fits(config, config_file, overrides: list[str]) -> None:
    """UserError where the mesh that `config_file` sets does not fit this host's devices (a run's
    config.json holds the mesh it trained on, over another device count, say), naming the file and
    the overrides that shard the model over the devices here."""
    import jax

    from llama_jax.mesh_axes import resolve_mesh_shape

    if any(o.startswith("mesh.") for o in overrides):  # a mesh given here: its own error says it all
        return
    try:
        resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, jax.device_count())
    except ValueError as e:
        here = _devices(jax.device_count())
        raise UserError(f"{e}; that is the mesh {config_file} sets: --config.mesh.data=1 --config.mesh.fsdp=-1 "
                        f"--config.mesh.tensor=1 shards the model over the {here} here") from None


def _devices(n: int) -> str:
    return "one device" if n == 1 else f"{n} devices"


def cmd_eval(args) -> None:
    from llama_jax.eval_files import model_eval_file, run_eval_file_name
    from llama_jax.experiment import check_train_section, load_config
    from llama_jax.model_dir import broken_model_link

    _check_model_or_run(args)
    if args.output is not None:  # before anything is read: a result that could not be written is refused first
        check_results_file(args.output, "--output", "llama-jax eval", EVAL_RESULT_KEYS)
    if args.workdir is not None:
        _check_run_directory(args.workdir, args.config,
                             f"llama-jax eval {args.workdir} --config CONFIG evaluates a model")
    elif (problem := broken_model_link(args.model)) is not None:  # (the model itself is read after the data checks)
        raise UserError(problem)
    config_file = args.config or (Path(args.workdir) / "config.json" if args.workdir else None)
    if config_file is None:
        raise UserError("--config is required with a model directory: the training config whose data settings "
                        "define the held-out documents (e.g. --config configs/demo.py)")
    _check_overrides_in_sections(args.overrides, ("data", "train", "mesh"), "llama-jax eval",
                                 "the model is the directory's or the checkpoint's own")
    config = load_config(config_file, args.overrides)
    check_train_section(config.train)  # its batch is the default batch
    _check_config_mesh_fits(config, config_file, args.overrides)  # (imports JAX: after the checks that need none)
    from llama_jax.evaluate import evaluate_held_out, held_out_seq_len
    from llama_jax.metrics import nonfinite_as_null

    own_data = _runs_own_data(args, config)
    # before the model is read: the file the result goes to (beside a model: decided by the data settings and
    # seq_len), or for a run (its name waits for the step) the run's directory
    if args.output is None and args.model is not None and Path(args.model).is_dir():
        settings = {"data": config.data.to_dict(), "seq_len": held_out_seq_len(config, args.seq_len)}
        check_results_file(model_eval_file(Path(args.model), settings), "--output", "llama-jax eval",
                           EVAL_RESULT_KEYS)
    elif args.output is None and args.workdir is not None:
        check_writable(Path(args.workdir) / "eval-STEP.json", "--output")
    record = nonfinite_as_null(evaluate_held_out(config, args.model, args.workdir, args.step, args.seq_len,
                                                 args.batch_size, progress=True, run_config=own_data))
    if args.output is not None:
        output = args.output
    elif args.workdir:
        run_seq_len = saved_run_setting(args.workdir, "train", "seq_len")  # None: config.json unreadable
        output = Path(args.workdir) / run_eval_file_name(record, own_data, run_seq_len)
    else:
        output = model_eval_file(Path(args.model), record)
    print(json.dumps(record, indent=2))  # first: a result that cannot be written (a race) is not lost
    output = check_results_file(output, "--output", "llama-jax eval", EVAL_RESULT_KEYS)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, record)

    def shown(key: str, form: str) -> str:  # (null: a model whose outputs are not finite)
        return "n/a" if record[key] is None else format(record[key], form)

    documents = f"{record['documents']:,} document{'s' * (record['documents'] != 1)}"
    print(f"held-out: loss {shown('loss', '.4f')} nats/token, perplexity {shown('perplexity', '.2f')}, "
          f"{shown('bits_per_byte', '.4f')} bits/byte, accuracy {shown('accuracy', '.1%')} over {record['tokens']:,} "
          f"tokens of {documents}; written to {output}", file=sys.stderr)


def _check_lm_eval_arguments(args) -> None:
    """What lm-eval refuses of its arguments alone, also checked by a launcher."""
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot {args.num_fewshot}: valid: 0 or more examples per question")
    _task_names(args.tasks)


def _task_names(text: str) -> list[str]:
    """The task names of `--tasks A,B,...`; UserError for none, an empty one or one given twice."""
    names = [t.strip() for t in text.split(",")]
    if not any(names):
        raise UserError("no task given; pass --tasks NAME[,NAME...] (`lm-eval ls tasks` lists them)")
    if "" in names:
        raise UserError(f"--tasks: empty task name in {text!r}; give names separated by single commas")
    twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if twice is not None:
        raise UserError(f"--tasks: {twice!r} given twice in {text!r}; name each task once")
    return names


LM_EVAL_REQUIREMENT = "lm-eval>=0.4.12"  # as setup.py's `eval` extra: the harness's task index and TaskManager.load


def _check_lm_eval_version() -> None:
    """UserError where an lm-eval older than LM_EVAL_REQUIREMENT is installed (its API differs: it
    fails on import, or halfway through a run); none installed is said on import."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("lm-eval")
    except PackageNotFoundError:
        return
    least = LM_EVAL_REQUIREMENT.split(">=")[1]
    if tuple(map(int, re.findall(r"\d+", installed)[:3])) < tuple(map(int, least.split("."))):
        raise UserError(f"lm-eval {installed} is installed; llama-jax lm-eval needs {LM_EVAL_REQUIREMENT}: "
                        f"pip install -U '{LM_EVAL_REQUIREMENT}'")


def cmd_lm_eval(args) -> None:
    from llama_jax.model_dir import LM_EVAL_FILE

    _check_lm_eval_arguments(args)
    output = Path(args.model) / LM_EVAL_FILE if args.output is None else args.output
    if args.output is not None or Path(args.model).is_dir():  # else the model's own error comes first
        output = check_results_file(output, "--output", "llama-jax lm-eval", LM_EVAL_RESULT_KEYS)
    _check_lm_eval_version()
    try:
        from llama_jax.lm_eval_model import evaluate_tasks
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise UserError(f"lm-eval is not installed; pip install -e '.[eval]' (or '{LM_EVAL_REQUIREMENT}')") from None
    from lm_eval.utils import handle_non_serializable, make_table

    results = evaluate_tasks(args.model, _task_names(args.tasks), num_fewshot=args.num_fewshot, limit=args.limit,
                             batch_size=args.batch_size, include_path=args.include_path, max_length=args.max_length,
                             dtype=args.dtype, mesh=args.mesh, max_gen_toks=args.max_gen_toks)
    kept = {k: results[k] for k in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                                    "higher_is_better", "n-samples", "config") if k in results}
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    output.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output, kept, default=handle_non_serializable)
    print(f"results written to {output}", file=sys.stderr)


def mesh_sizes(text: str) -> tuple[int, int, int]:
    """argparse type of --mesh: three integers DATA,FSDP,TENSOR."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise argparse.ArgumentTypeError(f"expected three integers DATA,FSDP,TENSOR such as 1,-1,1, got {text!r}")
    return sizes


MAX_LIMIT = 2**40  # examples per task: far more than any task holds


def limit_number(text: str) -> int | float:
    """argparse type of --limit: a number of examples per task, or a fraction of them below 1."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of examples or a fraction below 1, got {text!r}")
    if value > MAX_LIMIT:  # (the harness fails on a count beyond 2**63 with a message about islice)
        raise argparse.ArgumentTypeError(f"must be at most 2**40 examples, got {text!r}; leave --limit out to run "
                                         f"every example")
    return value if value < 1 else int(value)


def cmd_sweep(args) -> None:
    from llama_jax import sweep

    if args.report:
        _check_report_arguments(args)
        from llama_jax import results  # (imports JAX, through metrics.py: after the checks)

        print(results.report(args.workdir), end="")
        return
    job = _check_sweep_arguments(args)
    args.config, args.workdir = (os.path.abspath(path) for path in (args.config, args.workdir))
    with contextlib.chdir(sweep.start_directory(args.workdir)):  # trials, and SLURM's jobs, run there too
        _sweep(args, job)


def _sweep(args, job: dict) -> None:
    from llama_jax import sweep
    from llama_jax.devices import devices_per_trial, local_accelerators

    if args.on == "slurm":  # a job per trial (job options out of range: refused when the jobs are made)
        n_devices = job["nodes"] * job["gpus_per_node"] if min(job["nodes"], job["gpus_per_node"]) >= 1 else None
    else:
        sweep.check_local_devices(args.parallel, args.devices_per_run)
        n_devices = devices_per_trial(*local_accelerators(), args.devices_per_run)
    spec, axes, listed = sweep.prepare(args.config, args.workdir, args.sweep or [], args.overrides, args.search,
                                       args.trials, args.seed, probe=not args.dry_run, n_devices=n_devices)
    if args.on == "slurm":
        print(sweep.submit_to_slurm(spec, axes, listed, args.workdir, job, dry_run=args.dry_run))
        return
    if args.dry_run:
        print("\n".join(sweep.describe(spec, axes, listed, args.workdir)))
        return
    sweep.run_sweep(spec, axes, listed, args.workdir, args.parallel, args.devices_per_run)
    from llama_jax import results

    print(results.report(args.workdir), end="")
    print(f"results: {args.workdir}/results.md, results.csv and *.png")
    statuses = sweep.trial_statuses(args.workdir)
    if statuses and all(status == "failed" for status in statuses):
        raise UserError(f"all {len(statuses)} trials failed; the error column of {args.workdir}/results.md says why")


def _check_sweep_arguments(args) -> dict:
    """UserError for `sweep` flags that contradict each other; the SLURM job options, by destination."""
    if not args.config:
        raise UserError("--config is required (or --report to rebuild the results of an existing sweep)")
    if args.search == "grid" and (args.trials is not None or args.seed != 0):
        raise UserError(f"{'--trials' if args.trials is not None else '--seed'} applies to --search random and "
                        f"optuna; a grid search runs every combination of the values given")
    if args.search == "optuna" and args.seed >= 2**32:
        raise UserError(f"--seed {args.seed}: Optuna's sampler takes seeds below 2**32 (4294967296)")
    if args.on != "slurm":
        changed = _changed_slurm_options(args)
        if changed:
            raise UserError(f"{changed[0]} shapes SLURM jobs; it applies with --on slurm only")
    elif args.parallel != 1 or args.devices_per_run is not None:
        raise UserError(f"{'--parallel' if args.parallel != 1 else '--devices-per-run'} shares this host among "
                        f"trials; with --on slurm each trial is a job of its own (--nodes, --gpus-per-node)")
    return _slurm_job(args)


def _slurm_job(args) -> dict:
    """The SLURM job options given to `sweep` or `launch slurm`, by destination."""
    return dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition, time_min=args.time_min,
                account=args.account, qos=args.qos, constraint=args.constraint, cpus_per_node=args.cpus_per_node,
                mem_gb=args.mem_gb, exclusive=args.exclusive, job_name=args.job_name, save_time_s=args.save_time_s,
                gpus_by_gres=args.gpus_by_gres)


def _changed_slurm_options(args) -> list[str]:
    """The SLURM job options given values other than their defaults, as flags."""
    defaults = slurm_job_defaults()
    return [f"--{k.replace('_', '-')}" for k, v in _slurm_job(args).items() if v != defaults[k]]


def _check_report_arguments(args) -> None:
    """UserError for a `sweep --report` given what only a sweep that runs reads: the report is
    rebuilt from the workdir's files alone."""
    given = [flag for flag, value, default in (
        ("--config", args.config, None), ("--sweep", args.sweep, None), ("--search", args.search, "grid"),
        ("--trials", args.trials, None), ("--seed", args.seed, 0), ("--parallel", args.parallel, 1),
        ("--devices-per-run", args.devices_per_run, None), ("--dry-run", args.dry_run, False),
        ("--on", args.on, "local")) if value != default]
    given += _changed_slurm_options(args)
    given += [f"--config.{args.overrides[0]}"] if args.overrides else []
    if given:
        raise UserError(f"--report rebuilds the results from the files in --workdir alone; drop {', '.join(given)}")


def _launched_command(args) -> tuple[list[str], argparse.Namespace]:
    """The llama-jax command line given after `--` (a leading `llama-jax` dropped), checked to name a
    subcommand and to parse; with its parsed arguments."""
    if args.overrides:
        raise UserError(f"--config.{args.overrides[0]}: put --config.* overrides after --, with the command")
    command = list(args.launched)
    if command[:1] != ["--"] and "--" in command:  # (argparse leaves what follows a stray argument to the command)
        raise UserError(f"{command[0]!r} before --: launch {args.target} takes no such argument (its flags such as "
                        f"--dry-run take no value); give its options before -- and the llama-jax command after it")
    if command[:1] != ["--"]:
        raise UserError(f"give the llama-jax command to run after --, e.g. llama-jax launch {args.target} ... "
                        f"-- train --config configs/tiny.py --workdir runs/tiny")
    command = command[2:] if command[1:2] == ["llama-jax"] else command[1:]
    parser = build_parser()
    names = [name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
             for name in action.choices if name != "launch"]
    if not command or command[0] not in names:
        given = ("launch runs on this machine, not on the machines it launches on" if command[:1] == ["launch"] else
                 f"{command[0]!r} is not a llama-jax command" if command else "nothing given")
        raise UserError(f"after --: {given}; expected one of {', '.join(names)}")
    return command, _check_launched_arguments(parser, command)


def _check_launched_arguments(parser: argparse.ArgumentParser, command: list[str]) -> argparse.Namespace:
    """The launched command's flags, parsed here as they will be parsed where it runs, so that a
    typo or a missing --workdir is found before machines are provisioned."""
    rest, overrides = _split_config_overrides(command)
    error = io.StringIO()
    try:
        with contextlib.redirect_stderr(error), contextlib.redirect_stdout(io.StringIO()):
            launched = parser.parse_args(_attach_mesh_values(rest))
    except SystemExit as e:
        if e.code == 0:
            raise UserError(f"after --: {command[0]} would only print its help; drop -h/--help") from None
        lines = error.getvalue().strip().splitlines()
        problem = re.sub(r"^llama-jax[\w -]*: error: (.*) \(see .*\)$", r"\1", lines[-1]) if lines else \
            "its arguments do not parse"
        raise UserError(f"after --: {command[0]}: {problem}") from None
    launched.overrides = overrides
    from llama_jax.launch import INPUT_PATHS, option_value

    for flag in ("--workdir", *INPUT_PATHS):  # the launcher reads these from the command line, as given
        parsed = getattr(launched, flag[2:].replace("-", "_"), None)
        given = any(t.startswith("--") and len(t.split("=", 1)[0]) > 2 and flag.startswith(t.split("=", 1)[0])
                    for t in command)  # the flag, its =form or an abbreviation argparse takes (else: a default)
        if given and isinstance(parsed, str) and option_value(command, flag) != parsed:
            raise UserError(f"after --: {command[0]}: give {flag} once and in full ({flag} {parsed}): the launcher "
                            f"reads it from the command line")
    own_checks = {cmd_generate: _check_generate_arguments, cmd_eval: _check_model_or_run,
                  cmd_lm_eval: _check_lm_eval_arguments, cmd_data_inspect: _check_inspect_arguments,
                  cmd_plan: _check_plan_arguments}.get(launched.func)  # what the command refuses of its arguments
    try:
        _check_command_reads_overrides(launched)
        _check_not_empty(launched)
        if own_checks is not None:
            own_checks(launched)
    except (UserError, ValueError) as e:
        raise UserError(f"after --: {command[0]}: {e}") from None
    given = [flag for flag, dest in (("--num-processes", "num_processes"), ("--coordinator", "coordinator"),
                                     ("--process-id", "process_id")) if getattr(launched, dest, None) is not None]
    if given:
        raise UserError(f"after --: {command[0]}: {given[0]} is the launcher's to set (one process per TPU worker "
                        f"or SLURM node, found by JAX itself); drop {', '.join(given)}")
    return launched


def _check_launched_config(command: list[str], launched: argparse.Namespace, base, n_devices: int, hosts: int,
                           platform: str) -> None:
    """The launched command (`launched`: its parsed arguments), its --config (where it will run:
    under `base` if relative) and its --config.* overrides, checked here as the command will check
    them there; for `train`, every value as well, and the mesh and batch against the `n_devices`
    devices (`platform`) over `hosts` hosts the job will have; for `sweep`, that it runs on one host
    and fits its devices, its search and every trial's config; any other command but `train`, that it
    runs on one host."""
    from llama_jax.experiment import check_experiment, load_config
    from llama_jax.launch import check_input_paths, option_value

    check_input_paths(command, base)
    if command[0] == "sweep":
        _check_launched_sweep(launched, n_devices, hosts, platform)
    elif hosts > 1 and command[0] != "train":  # (each host would run it alone, over the same files)
        raise UserError(f"after --: {_command_name(launched)} runs as one process, and this launch starts one on each "
                        f"of its {hosts} hosts; launch it on one (--nodes 1, or a single-host TPU slice such as "
                        f"v4-8): only train runs across hosts")
    path = option_value(command, "--config")
    try:  # the command's own refusals, named as its
        sweeps = command[0] == "sweep" and not launched.report
        if sweeps:
            _check_sweep_arguments(launched)
        elif command[0] == "sweep":
            _check_report_arguments(launched)
        if path is None or Path(path).is_absolute() and not Path(path).exists():  # e.g. on the slice's bucket only
            return
        config = load_config(Path(base) / path, launched.overrides)
        if sweeps:
            from llama_jax.devices import devices_per_trial
            from llama_jax.sweep import plan_trials

            per_trial = devices_per_trial(platform, n_devices, launched.devices_per_run) if n_devices >= 1 else None
            plan_trials(str(Path(base) / path), launched.sweep or [], launched.overrides, launched.search,
                        launched.trials, launched.seed, read_init_from=False, n_devices=per_trial)
        if command[0] == "train":
            from llama_jax.mesh_axes import check_mesh_and_batch

            model = check_experiment(config, read_init_from=False)  # its files are where the command runs
            if n_devices >= 1:  # else the launcher's own check of --nodes / --gpus-per-node says so
                check_mesh_and_batch(config, n_devices, model)
    except (UserError, ValueError) as e:
        raise UserError(f"after --: {command[0]}: {e}") from None


def _check_launched_sweep(launched, n_devices: int, hosts: int, platform: str) -> None:
    """UserError unless a launched sweep can run where it is sent: on one host (each host would
    run it, in the same workdir; a dry run writes nothing), --on slurm only from a login node, its
    trials' devices within that host's."""
    from llama_jax.sweep import SweepError, check_devices

    if hosts > 1 and not launched.dry_run:
        what = "rebuilds its report" if launched.report else "runs its trials"
        raise UserError(f"after --: sweep {what} on one host, and this launch has {hosts}; launch it on one "
                        f"(--nodes 1, or a single-host TPU slice)")
    if launched.report:
        return
    if launched.on == "slurm":
        raise UserError("after --: sweep --on slurm submits a job per trial from a SLURM login node; run it there "
                        "as it is, not through launch")
    if n_devices >= 1:
        try:
            check_devices(platform, n_devices, launched.parallel, launched.devices_per_run)
        except SweepError as e:
            raise UserError(f"after --: sweep: {e}") from None


def cmd_launch_tpu(args) -> None:
    from llama_jax.launch import INPUT_PATHS, LaunchError, option_value, tpu

    command, launched = _launched_command(args)
    tpu_slice = tpu.tpu_slice(args.accelerator)
    root = tpu.source_root()
    try:  # what a launch ships: the files git lists of the checkout (without git, a launch stops here)
        shipped, unlisted = tpu.shipped_files(root), None
    except LaunchError as e:
        if not args.dry_run:
            raise
        shipped, unlisted = None, str(e)  # (the dry run prints its plan, and says so in it)
    for flag in INPUT_PATHS:  # what the command reads must be in the workers' copy of the checkout
        path = option_value(command, flag)
        if path:
            tpu.check_shipped(root, flag, path, shipped)
    _check_launched_config(command, launched, root, tpu_slice.chips, tpu_slice.workers, "tpu")  # one device per chip
    _check_tpu_workdir(command, tpu_slice, args.max_restarts)
    if args.copy_back:
        check_folder(args.copy_back, "--copy-back", "to receive the run's workdir")
        # now, not after the run: hours of a slice's time (a dry run writes nothing)
        check_writable(args.copy_back, "--copy-back", into=True, probe=not args.dry_run)
    spec = tpu.TpuLaunch(name=args.name, zone=args.zone, slice=tpu_slice,
                         command=tuple(command), runtime_version=args.runtime_version, spot=args.spot,
                         project=args.project, setup=args.setup, copy_back=args.copy_back,
                         delete_after=args.delete_after, max_restarts=args.max_restarts,
                         internal_ip=args.internal_ip)
    if spec.copy_back:
        tpu.check_copy_back(spec)
    if args.dry_run:
        print("\n".join(tpu.dry_run_lines(spec, unlisted)))
        return
    status = tpu.launch(spec)
    if status:
        raise SystemExit(status)


def _check_tpu_workdir(command: list[str], tpu_slice, max_restarts: int) -> None:
    """UserError for a launched train whose relative --workdir (inside each worker's copy of the
    checkout, on its own disk) would lose the run: over several workers, each would hold only its
    own part of every checkpoint; with --max-restarts, the re-created slice starts with empty disks."""
    from llama_jax.launch import option_value, tpu

    workdir = option_value(command, "--workdir")
    if command[0] != "train" or not workdir or workdir.startswith("/") or (tpu_slice.workers == 1 and not max_restarts):
        return
    why = (f"each of this {tpu_slice.accelerator}'s {tpu_slice.workers} workers would write its own part of every "
           f"checkpoint there, so no worker would hold a whole one" if tpu_slice.workers > 1 else
           "a restart after preemption re-creates the slice with empty disks, so --max-restarts would start the run "
           "over")
    raise UserError(f"after --: train: --workdir {workdir} is relative, on each worker's own disk (under "
                    f"~/{tpu.REMOTE_DIR}), and {why}; give a directory on storage every worker mounts and that "
                    f"outlives the slice, e.g. /mnt/gcs/runs/{Path(workdir).name or 'run'} (a bucket mounted with "
                    f"gcsfuse; --setup can mount it)")


def cmd_launch_slurm(args) -> None:
    from llama_jax.launch import option_value, slurm

    command, launched = _launched_command(args)
    _check_launched_config(command, launched, Path.cwd(), args.nodes * args.gpus_per_node, args.nodes, "gpu")
    workdir = option_value(command, "--workdir")
    if command[0] == "train" and workdir and args.folder is None:  # the job's folder goes inside it: seen here
        from llama_jax.run_files import check_workdir

        try:
            check_workdir(Path(workdir).absolute())  # (probed: a dry run too writes its script there)
        except ValueError as e:
            raise UserError(f"after --: train: {e}") from None
    folder = args.folder or (str(Path(workdir) / slurm.WORKDIR_FOLDER) if workdir else None)
    if folder is None:
        raise UserError("--folder is required when the command has no --workdir")
    check_folder(folder, "--folder", "for the job's script and logs")
    check_writable(folder, "--folder", into=True)  # (a dry run too writes its script there)
    submitted = slurm.submit(slurm.llama_jax_command(command), folder, **_slurm_job(args), dry_run=args.dry_run)
    if args.dry_run:
        print(f"# {submitted} (not submitted)\n{Path(submitted).read_text()}", end="")
    else:
        print(f"submitted SLURM job {submitted}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s); logs in {folder}")


def _check_inspect_arguments(args) -> None:
    """What data inspect refuses of its arguments alone, also checked by a launcher."""
    if args.config is None and args.workdir is None:
        raise UserError("give --config CONFIG (prepared data, or a raw source prepared now) or --workdir RUN")
    if (args.step is None) == (not args.epoch):
        raise UserError("give --step S (the rows of one step) or --epoch (coverage of one epoch), one of them")
    if args.epoch and args.rows is not None:
        raise UserError("--rows picks rows of one --step's batch; --epoch reports every row of the epoch")
    _check_overrides_in_sections(args.overrides, ("data", "train"), "llama-jax data inspect",
                                 "a step's rows come from the data, in the train section's batches")


def cmd_data_inspect(args) -> None:
    from llama_jax.data_inspect import coverage_lines, describe_step
    from llama_jax.experiment import check_train_section, load_config

    _check_inspect_arguments(args)
    workdir = Path(args.workdir) if args.workdir else None
    if workdir is not None and (args.config is None or workdir.exists()):  # with --config it may be a new run's
        _check_run_directory(workdir, args.config)
    config_file = args.config or str(workdir / "config.json")
    config = load_config(config_file, args.overrides)
    check_train_section(config.train)  # the rows of a step are train.batch_size x train.seq_len, in seed order
    if config.data.source == "synthetic":
        raise UserError("data.source=synthetic draws random tokens; there are no documents to inspect")
    from llama_jax.run_data import build_data  # imports JAX; after the config checks

    with tempfile.TemporaryDirectory(prefix="llama-jax-inspect-") as scratch:
        own = _runs_own_data(args, config)
        data = build_data(config, None, workdir or Path(scratch), runs_own=own)
        try:
            if own:
                from llama_jax.run import check_named_data, latest_data_stream

                check_named_data(Path(os.path.abspath(workdir)), latest_data_stream(workdir), data.stream, config.data)
            if args.epoch:
                lines = coverage_lines(data.train)
            else:
                index = args.step - 1  # the run's step 1 trains on batch 0
                rows = config.train.batch_size
                lines = [f"step {args.step}: {rows} row{'s' if rows != 1 else ''} of {config.train.seq_len} tokens"]
                lines += describe_step(data.train, index, data.tokenizer, args.rows)
                lines += [f"tokens seen before this step: {data.train.progress(index)['tokens_seen']:,.0f}"]
        finally:
            data.discard()
    print("\n".join(lines))


def _check_prepare_output(given: str) -> None:
    """UserError where prepare-data's --output (`given`) would put the data among a run's or a model
    directory's own files; RUN/RUN_DATA_DIR of a run that reads documents, the run's own copy of
    them, is refused only while that run is running."""
    from llama_jax.data import DOCUMENT_SOURCES

    output = Path(os.path.abspath(given))
    run = output.parent if output.name == RUN_DATA_DIR and holds_run(output.parent) \
        and saved_run_setting(output.parent, "data", "source") in DOCUMENT_SOURCES else None  # its own copy
    # a new or empty folder inside a run or a model directory would put the data among their own files
    # (RUN/checkpoints/99: a checkpoint); one holding something is judged by what it holds (prepare_with_stats)
    fresh = not output.exists() or output.is_dir() and not any(output.iterdir())
    owner = enclosing_run_or_model(output) if fresh else None
    if owner is not None and run is None:
        own = f" (or, for the run's own copy of its documents, {owner / RUN_DATA_DIR} itself)" \
            if saved_run_setting(owner, "data", "source") in DOCUMENT_SOURCES else ""
        kind = "run" if holds_run(owner) else "model directory"
        raise UserError(f"--output {given} is inside the {kind} {owner}; give a directory outside it{own}")
    if run is not None and holds_lock(run):  # (a run's first start moves the copy it prepared there)
        raise UserError(f"--output {given}: the run {run} is running (it holds its directory's lock); "
                        f"wait for it to end")
    check_outside_runs_and_models(given, "--output")  # (an existing folder holding something there too)


def cmd_prepare_data(args) -> None:
    from llama_jax.prepare import DamagedData, prepare_with_stats, redo_advice, summary_lines, verify

    if args.config is None and not args.verify:
        raise UserError("--config is required to prepare data (without it, --verify checks a prepared --output)")
    if args.config is None and args.overrides:
        raise UserError(f"--config.{args.overrides[0]}: overrides need --config")
    unused = next((f for f, v in (("--workers", args.workers), ("--shard-tokens", args.shard_tokens)) if v is not None),
                  None)
    if args.config is None and unused:
        raise UserError(f"{unused}: --verify without --config checks the prepared shards and tokenizes nothing; drop "
                        f"{unused}")
    if args.config is not None:
        from llama_jax.experiment import check_data_section, load_config

        _check_overrides_in_sections(args.overrides, ("data",), "llama-jax prepare-data",
                                     "the documents and the tokenizer")
        config = load_config(args.config, args.overrides)
        check_data_section(config.data)
        _check_prepare_output(args.output)
        manifest, stats = prepare_with_stats(config.data, args.output, workers=args.workers,
                                             shard_tokens=args.shard_tokens, progress=True)
        print("\n".join(summary_lines(manifest, args.output, stats)))
    if args.verify:
        try:
            checked = verify(args.output)
        except DamagedData as e:
            raise UserError(f"{e.problem}; {redo_advice(args.output)}") from None
        print(f"verified {args.output}: the sha256 of all {checked['files']} shard files "
              f"({checked['bytes']:,} bytes) and of the tokenizer match their records")


MAX_PLAN_DEVICES = 4096  # XLA created 1,024 virtual CPU devices in about a second, 8,192 in 100 s and 1 GB


def _check_plan_arguments(args) -> None:
    """What plan refuses of its arguments alone, also checked by a launcher."""
    if args.devices is not None and not 1 <= args.devices <= MAX_PLAN_DEVICES:
        raise UserError(f"--devices must be a positive number of virtual CPU devices, at most {MAX_PLAN_DEVICES} "
                        f"(XLA takes minutes and gigabytes to create more), got {args.devices}")


def _virtual_cpu_devices(n: int, own_process: bool) -> list:
    """`n` of this process's CPU devices, for `plan --devices n`. The `llama-jax` program
    (`own_process`) starts JAX with `n` virtual CPU devices (`devices.set_cpu_devices` sets its
    environment before its backends start). Called in another program (a notebook, a script calling
    `main`), it takes them from the CPU devices that program's JAX has, and changes nothing of the
    process: JAX makes its devices once per process, and the environment is its own and its later
    processes'. Too few of them is a UserError."""
    if own_process:
        from llama_jax.devices import set_cpu_devices

        set_cpu_devices(os.environ, n)
    import jax

    try:
        cpus = jax.devices("cpu")
    except RuntimeError:  # a process whose JAX runs without its CPU backend
        cpus = []
    if len(cpus) < n:
        raise UserError(f"--devices {n}: this process's JAX has {len(cpus)} CPU device(s), and makes its devices "
                        f"once per process; run `llama-jax plan --devices {n}` as a command of its own")
    return cpus[:n]


def cmd_plan(args) -> int:
    _check_plan_arguments(args)
    from llama_jax.experiment import check_experiment, load_config

    config = load_config(args.config, args.overrides)
    model = check_experiment(config)  # before importing JAX: a bad config fails at once
    if args.devices:  # and a mesh that does not fit the devices, the batch or the model
        from llama_jax.mesh_axes import check_mesh_and_batch

        check_mesh_and_batch(config, args.devices, model)
    devices = _virtual_cpu_devices(args.devices, args.own_process) if args.devices else None
    from llama_jax.plan import check_new_run, does_not_fit, format_plan, plan, runnable_config
    from llama_jax.train import validate_config

    check_new_run(config)  # what train refuses of it before reading the data
    if args.devices:  # the attention kernel planned here checked before anything is compiled
        validate_config(runnable_config(config), args.devices)

    figures = plan(config, devices)
    print(format_plan(figures))
    return 1 if does_not_fit(figures) else 0  # (a script that checks a config before renting stops there)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="llama-jax", description="LLaMA models in JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list model presets with their parameter counts")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("convert", help="convert weights between hf, meta and jax checkpoints")
    add_convert_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train a model from an experiment config")
    p.add_argument("--config", required=True, help="Python config file with get_config(), or a run's "
                   "config.json; override any key as --config.section.key=value")
    p.add_argument("--workdir", required=True, help="run directory: checkpoints, metrics, logs; "
                   "rerunning with the same one resumes from its latest checkpoint")
    p.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                   help="continue from this committed checkpoint instead of the latest (e.g. the intact one "
                        "before a damaged step); later checkpoints are moved to WORKDIR/checkpoints-set-aside/")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator host:port")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--join-timeout", type=int_at_least(1, MAX_JOIN_TIMEOUT_S, "86400 (a day)"), default=300,
                   metavar="SECONDS", help="multi-process: how long each process waits for the others to join "
                                           "(default 300)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="continue prompts with a model directory or a run (KV-cache decoding)")
    p.add_argument("model", nargs="?", default=None,
                   help="a llama_jax model directory (convert --to jax, or export); or give --workdir")
    p.add_argument("--workdir", default=None, help="a training run: generate from its checkpoint (no export)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="with --workdir: the checkpoint step (default: latest)")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue; repeat for a batch of prompts")
    p.add_argument("--prompts-file", action="append", default=None, metavar="FILE",
                   help="more prompts: one per non-blank line (.txt; - reads standard input), or a .jsonl file's "
                        "\"prompt\" (or \"text\") fields; they follow the --prompt ones (repeatable, in order)")
    p.add_argument("--stop", action="append", default=None, metavar="STR",
                   help="end each row's text before this string (repeatable; rows stop independently)")
    p.add_argument("--chat", action="store_true",
                   help="format each prompt as one user turn of the tokenizer's chat template (LLaMA-2 [INST], "
                        "LLaMA-3 headers) and stop at the end of the turn; prints the reply")
    p.add_argument("--infill", action="store_true",
                   help="Code Llama infilling: each prompt holds one <FILL_ME>, the text before it the prefix, "
                        "after it the suffix; generates what goes there (until <EOT>) and prints it. Needs a "
                        "Code Llama tokenizer (its <PRE>, <SUF>, <MID> and <EOT> pieces)")
    p.add_argument("--no-stream", action="store_true",
                   help="with a single prompt, print the text at the end instead of as it is produced "
                        "(the text is the same either way)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default 64)")
    p.add_argument("--temperature", type=finite_float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample among the K most likely tokens and those tied with the K-th (default: all)")
    p.add_argument("--top-p", type=finite_float, default=None, metavar="P",
                   help="sample among the fewest most likely tokens whose probabilities add up to P or more "
                        "(0 < P <= 1), after --top-k (default: all)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed, 0 <= S < 2**32 (default 0)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.model (default: the one in the model directory)")
    p.add_argument("--mesh", type=mesh_sizes, default=None, metavar="DATA,FSDP,TENSOR",
                   help="shard the model and the KV cache over a device mesh, for models larger than one "
                   "device (-1 takes the remaining devices); default: the first device")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="write a training run's checkpoint as a model directory (--from jax)")
    p.add_argument("--workdir", required=True, help="the run directory")
    p.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: the latest)")
    p.add_argument("dst", help="model directory to write (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("eval", help="exact held-out loss, perplexity, bits per byte and accuracy of a model or "
                       "a run's checkpoint")
    p.add_argument("model", nargs="?", default=None, help="a llama_jax model directory (or give --workdir)")
    p.add_argument("--workdir", default=None, help="a training run: evaluate its checkpoint (the latest by default)")
    p.add_argument("--step", type=int, default=None, metavar="N", help="with --workdir: the checkpoint step")
    p.add_argument("--config", default=None, metavar="C",
                   help="the training config whose data settings define the held-out "
                   "documents (default with --workdir: its config.json); override as --config.data.key=value")
    p.add_argument("--seq-len", type=positive_int, default=None, metavar="N",
                   help="window length (default: train.seq_len)")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                   help="rows per batch (default: the config's train.batch_size / train.grad_accum)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="JSON file to write (default: MODEL/eval.json, MODEL/eval-TAG.json "
                   "when that holds a score of other data settings or --seq-len; or WORKDIR/eval-STEP.json, "
                   "WORKDIR/eval-STEP-TAG.json for data settings or a --seq-len other than the run's)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a model directory (needs .[eval])")
    p.add_argument("model", help="a llama_jax model directory with its tokenizer.model")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. hellaswag,arc_easy")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="examples in each prompt (default: the task's)")
    p.add_argument("--limit", type=limit_number, default=None, metavar="N",
                   help="examples per task (a number below 1: that fraction of them); for quick checks")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="requests per batch (default 8)")
    p.add_argument("--max-length", type=positive_int, default=None, metavar="L",
                   help="context length in tokens (default: the model's max_seq_len)")
    p.add_argument("--max-gen-toks", type=positive_int, default=None, metavar="N",
                   help="new tokens of generation tasks whose settings do not give max_gen_toks (default 256)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="compute dtype (default: the model's)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a directory of task YAML files of your own")
    p.add_argument("--mesh", type=mesh_sizes, default=(1, -1, 1), metavar="DATA,FSDP,TENSOR",
                   help="device mesh the model is sharded over; -1 takes the remaining devices "
                   "(default 1,-1,1: FSDP over all of them)")
    p.add_argument("--output", default=None, metavar="FILE",
                   help="JSON file of the results (default: MODEL/lm_eval.json)")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("prepare-data", help="tokenize a config's corpus once into token shards for training")
    p.add_argument("--config", default=None, help="experiment config whose data section defines the documents and "
                   "the tokenizer; override as --config.data.key=value")
    p.add_argument("--output", required=True, help="directory to write; rerunning resumes an interrupted "
                   "preparation, and a finished one is left as it is")
    p.add_argument("--workers", type=int_at_least(1, 1024), default=None, metavar="N",
                   help="tokenizer processes (default: the number of CPU cores)")
    p.add_argument("--shard-tokens", type=int_at_least(1, 2**40, "2**40"), default=None, metavar="N",
                   help="a shard closes once it holds N tokens (default 2**26; a resumed or finished --output "
                        "keeps its own)")
    p.add_argument("--verify", action="store_true",
                   help="check the sha256 of every shard file against its record (without --config: only that)")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("data", help="look at a run's training data")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("inspect", help="the rows of a step (documents, text, loss mask), or an epoch's coverage")
    p.add_argument("--config", default=None, help="experiment config (default: RUN/config.json of --workdir); "
                   "override as --config.key=value")
    p.add_argument("--workdir", default=None, help="a run's workdir: its config and the data prepared for it")
    p.add_argument("--step", type=int_at_least(1, 2**40, "2**40"), default=None, metavar="N",
                   help="the step whose global batch to show, counted as the run's logs and checkpoints count "
                        "(its first step is 1)")
    p.add_argument("--rows", type=positive_int, default=None, metavar="N",
                   help="show only the first N rows of the batch")
    p.add_argument("--epoch", action="store_true",
                   help="walk one epoch of every source without the model and report how often each token is seen")
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("plan", help="compile the train step ahead of time; report per-device memory and FLOPs")
    p.add_argument("--config", required=True, help="the experiment config (a Python file or a run's config.json); "
                   "--config.section.key=value overrides a key")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help=f"plan for N virtual CPU devices (1 to {MAX_PLAN_DEVICES})")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("sweep", help="run a hyperparameter sweep of a config: grid, random or Optuna search")
    p.add_argument("--config", default=None, help="the experiment config (its get_sweep() may declare axes); "
                   "--config.section.key=value overrides a key for every trial")
    p.add_argument("--workdir", required=True, help="sweep directory: one sub-directory per trial, results, plots; "
                   "rerunning the same command skips finished trials and resumes the others")
    p.add_argument("--sweep", action="append", metavar="KEY=SPACE",
                   help="an axis: KEY=[v1,v2,...] or KEY=uniform(a,b) | loguniform(a,b) | int(a,b) | "
                        "choice(v1,v2,...); repeat for more axes")
    p.add_argument("--search", default="grid", choices=("grid", "random", "optuna"),
                   help="grid (default): every combination of the lists; random: --trials draws; optuna: TPE "
                        "with pruning")
    p.add_argument("--trials", type=int, default=None, metavar="N",
                   help="number of trials for random and optuna searches")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the random and optuna searches (default 0)")
    p.add_argument("--parallel", type=positive_int, default=1, metavar="N",
                   help="trials running at once on this host (default 1)")
    p.add_argument("--devices-per-run", type=positive_int, default=None, metavar="K",
                   help="give each running trial its own K accelerators (K virtual devices on CPU)")
    p.add_argument("--dry-run", action="store_true", help="print the trials and their commands; run nothing")
    p.add_argument("--report", action="store_true", help="only rebuild results.csv/.md and plots from the runs")
    p.add_argument("--on", default="local", choices=("local", "slurm"),
                   help="local: trials run here; slurm: one job array, a job per trial (grid and random searches; "
                        "--report collects the results later)")
    add_slurm_job_arguments(p.add_argument_group("SLURM jobs (with --on slurm)"))
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("launch", help="run a llama-jax command on a Cloud TPU slice (gcloud) or SLURM (submitit)")
    add_launch_arguments(p)

    p = sub.add_parser("demo", help="train, checkpoint, evaluate and sample a small LLaMA on a built-in corpus",
                       epilog="--config.section.key=value overrides any setting of llama_jax/demo.py's config")
    p.add_argument("--workdir", default="runs/demo",
                   help="run directory (default runs/demo, under the current directory; resumes if it holds "
                        "checkpoints)")
    p.set_defaults(func=cmd_demo)
    return parser


def add_launch_arguments(p: argparse.ArgumentParser) -> None:
    targets = p.add_subparsers(dest="target", required=True)
    example = "-- train --config configs/llama2_7b_v4_32.py --workdir /mnt/gcs/runs/llama2-7b"
    t = targets.add_parser("tpu", help="create or reuse a TPU VM slice, ship this checkout, run the command on "
                           "every worker", description="Example: llama-jax launch tpu --name llama2-7b "
                           f"--zone us-central2-b --accelerator v4-32 {example}")
    t.add_argument("--name", required=True, help="queued resource and TPU VM name; launching again with the same "
                   "name reuses it, or re-creates it if it was preempted, and follows a command of that name "
                   "still running there instead of starting another")
    t.add_argument("--zone", required=True)
    t.add_argument("--accelerator", required=True, metavar="TYPE",
                   help="v4-N, v5p-N (N TensorCores), v5litepod-N, v6e-N (N chips), e.g. v4-32")
    t.add_argument("--runtime-version", default=None, metavar="V", help="TPU VM image (default: the generation's)")
    t.add_argument("--spot", action="store_true", help="Spot TPUs: cheaper, preemptible")
    t.add_argument("--project", default=None, metavar="P", help="Google Cloud project (default: gcloud's)")
    t.add_argument("--internal-ip", action="store_true",
                   help="ssh and scp to the workers' internal IP addresses (gcloud's tpu-vm ssh/scp --internal-ip), "
                        "from a machine in the slice's VPC network")
    t.add_argument("--setup", default=None, metavar="SHELL",
                   help="shell run on every worker after installing (e.g. mount the workdir's bucket)")
    t.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="if the slice is preempted during the run, re-create it and run again, up to N times")
    t.add_argument("--copy-back", default=None, metavar="DIR",
                   help="afterwards, copy the command's --workdir from worker 0 into DIR (as DIR/NAME)")
    t.add_argument("--delete-after", action="store_true", help="afterwards, delete the queued resource")
    t.add_argument("--dry-run", action="store_true", help="print the gcloud commands in order; run nothing")
    t.add_argument("launched", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help=f"the llama-jax command, e.g. {example}")
    t.set_defaults(func=cmd_launch_tpu)

    s = targets.add_parser("slurm", help="submit the command as a SLURM job, one task per node (submitit)")
    add_slurm_job_arguments(s)
    s.add_argument("--folder", default=None, metavar="DIR",
                   help="submitit's folder: sbatch script, logs (default: WORKDIR/slurm)")
    s.add_argument("--dry-run", action="store_true", help="write and print the sbatch script; submit nothing")
    s.add_argument("launched", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="the llama-jax command, e.g. -- train --config configs/tinyllama_1b_8gpu.py --workdir runs/x")
    s.set_defaults(func=cmd_launch_slurm)


def slurm_job_defaults() -> dict:
    """The SLURM job options' defaults, by destination."""
    from llama_jax.launch.slurm import DEFAULT_TIME_MIN, SAVE_TIME_S

    return dict(nodes=1, gpus_per_node=1, cpus_per_node=None, mem_gb=None, exclusive=False, partition=None,
                time_min=DEFAULT_TIME_MIN, account=None, qos=None, constraint=None, job_name="llama-jax",
                save_time_s=SAVE_TIME_S, gpus_by_gres=False)


def add_slurm_job_arguments(p: argparse.ArgumentParser) -> None:
    """The shape of a SLURM job: for `launch slurm` and for sweeps run as a job array."""
    from llama_jax.launch.slurm import MIN_SAVE_TIME_S, REQUEUE_S, min_time_min

    d = slurm_job_defaults()
    p.add_argument("--nodes", type=int, default=d["nodes"], metavar="N")
    p.add_argument("--gpus-per-node", type=int, default=d["gpus_per_node"], metavar="G")
    p.add_argument("--gpus-by-gres", action="store_true", help="request the GPUs as --gres=gpu:G, which clusters "
                   "without SelectType=select/cons_tres take, instead of --gpus-per-node=G")
    p.add_argument("--cpus-per-node", type=int, default=d["cpus_per_node"], metavar="C",
                   help="CPUs of the task on each node (default: SLURM's, often 1)")
    p.add_argument("--mem-gb", type=int, default=d["mem_gb"], metavar="GB",
                   help="memory the job gets on each node, in GB; 0 for all of it (default: SLURM's, often a few "
                        "GB per CPU, beyond which the job is killed)")
    p.add_argument("--exclusive", action="store_true", help="whole nodes, shared with no other job (with --mem-gb 0: "
                   "all of their memory too)")
    p.add_argument("--partition", default=d["partition"], metavar="P")
    p.add_argument("--time-min", type=int, default=d["time_min"], metavar="M",
                   help=f"time limit in minutes, at least {min_time_min(d['save_time_s'])} (default {d['time_min']}; "
                        f"more with a longer --save-time-s); at the limit the job is requeued and the run resumes")
    p.add_argument("--save-time-s", type=int, default=d["save_time_s"], metavar="S",
                   help=f"seconds the command has to save before a requeue, at least {MIN_SAVE_TIME_S} (default "
                        f"{d['save_time_s']}): SLURM warns the job S + {REQUEUE_S} s before its time limit; give a "
                        f"large model's save on shared storage what it needs, or it is killed mid-save")
    p.add_argument("--account", default=d["account"], metavar="A")
    p.add_argument("--qos", default=d["qos"], metavar="Q")
    p.add_argument("--constraint", default=d["constraint"], metavar="FEATURES",
                   help="node features the job needs, e.g. a100 or 'a100&ib'")
    p.add_argument("--job-name", default=d["job_name"], metavar="NAME")


class _LibraryNoise:
    """Keeps stderr to the command's own lines.

    Orbax's notices (absl logging) are not for the command line. Its errors (a checkpoint write
    that failed, with tracebacks from its background threads) are held until the command ends:
    printed after a command that succeeded, dropped after one that failed, which reports the
    failure itself as its error line; so are exceptions that threads and exit handlers raise
    after a failure (a full disk fails TensorBoard's writer thread too). When a damaged checkpoint
    fails one read, Orbax gives up while TensorStore still completes the others on background
    threads, which then hit a closed event loop and print tracebacks of their own: never shown.
    """

    # the loggers' levels while a command runs (asyncio: "Future exception was never retrieved")
    QUIETED = {"absl": logging.ERROR, "asyncio": logging.CRITICAL}

    def __init__(self):
        self.held: list[logging.LogRecord] = []
        self.mode = "hold"  # "hold" while the command runs, then "show" or "drop"
        self.installed = False
        self.depth = 0  # commands running: the demo runs others inside itself, which leave it to decide
        self.levels: dict[str, int] = {}  # the loggers' own levels, before the command quieted them

    def filter(self, record: logging.LogRecord) -> bool:
        if self.mode == "hold":
            self.held.append(record)
        return self.mode == "show"

    def start(self) -> None:
        if not self.depth:
            self.held, self.mode = [], "hold"
            self.levels = {name: logging.getLogger(name).level for name in self.QUIETED}
            for name, level in self.QUIETED.items():
                logging.getLogger(name).setLevel(level)
        self.depth += 1

    def end(self, succeeded: bool, exiting: bool = True) -> None:
        """Show or drop what was held; until the process exits (`exiting`), so are later errors.
        A caller that goes on after the command (not `exiting`) sees its later errors, and its
        loggers have their own levels again (a notebook's asyncio errors too). The end of
        a command run inside another leaves what was held to the outer one's end."""
        self.depth = max(self.depth - 1, 0)
        if self.depth:
            return
        if not exiting:  # a program that called the command goes on with its own logging
            for name, level in self.levels.items():
                logging.getLogger(name).setLevel(level)
        held, self.held, self.mode = self.held, [], "show" if succeeded or not exiting else "drop"
        for record in held if succeeded else ():
            logging.getLogger(record.name).handle(record)

    def install(self) -> None:
        """Once per process."""
        if self.installed:
            return
        self.installed = True
        logging.getLogger("absl").addFilter(self)
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        quiet_abandoned_reads()

        def signal_swallowed(error: BaseException | None) -> bool:
            """Ctrl-C or SIGTERM raised where Python cannot raise (a garbage-collection callback, a
            `__del__`) would be printed and dropped, the command going on as if it never came: the
            signal is sent again, to be raised where the command is."""
            signum = signal.SIGINT if isinstance(error, KeyboardInterrupt) else \
                signal.SIGTERM if isinstance(error, Terminated) else None
            if signum is not None:
                signal_again(signum, after=0.01)
            return signum is not None

        unraisablehook, thread_hook = sys.unraisablehook, threading.excepthook
        sys.unraisablehook = lambda u: None if signal_swallowed(u.exc_value) \
            or type(u.object).__name__ == "coroutine" or self.mode == "drop" else unraisablehook(u)
        threading.excepthook = lambda a: None if self.mode == "drop" else thread_hook(a)


_NOISE = _LibraryNoise()


RUN_COMMANDS = ("train", "sweep", "demo")  # commands that train runs, which a rerun resumes
RESUMES = "a run resumes from its last committed checkpoint"


def _is_os_error(error: BaseException, code: int) -> bool:
    """Whether `error` is the OS error `code`, raised by Python or reported in a library's message."""
    return (isinstance(error, OSError) and error.errno == code) or os.strerror(code) in str(error)


# Commands whose product is what they print: a reader that stops reading (`| head`) only ends them early.
# Any other stopped by it exits with the status of a process killed by SIGPIPE, so that a script
# sees it did not finish (a training run would otherwise end silently at its last checkpoint).
PRINTING_COMMANDS = ("presets", "generate", "data", "plan")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (another broken pipe is an error)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError):  # no file descriptor (stdout replaced)
        return False


def _error_text(error: BaseException, args) -> str:
    """The error line's text. A full disk, or a file past the process's size limit, is said in
    those words: libraries bury it at the end of long messages about their own internals
    (TensorStore) or report it as an internal error."""
    where = next((getattr(args, k) for k in ("dst", "output", "workdir") if getattr(args, k, None)), None)
    if _is_os_error(error, errno.ENOSPC):
        where = (_full_elsewhere(where, error) or where) if where else getattr(error, "filename", None)
        text = "no space left on the device" + (f" holding {where}" if where else "") + "; free some space"
    elif _is_os_error(error, errno.EFBIG):
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        writing = f" while writing {where}" if where else ""
        if limit != resource.RLIM_INFINITY:
            size = f"{limit // 1024} KiB" if limit >= 1024 else f"{limit} bytes"
            text = (f"a file grew past this process's file size limit (ulimit -f: {size}){writing}; "
                    "raise the limit (ulimit -f unlimited)")
        else:  # the file system's own largest file (e.g. 4 GiB on FAT32)
            text = f"a file grew past the largest file its file system holds{writing}; use another file system"
    else:
        return str(error)
    text += " and run the command again"
    return text + (f": {RESUMES}" if getattr(args, "command", None) in RUN_COMMANDS else "")


def _full_elsewhere(where: str | os.PathLike, error: OSError) -> str | None:
    """What filled up when it is not the device holding `where`: the file the error names, standard
    output or TMPDIR, on another device with (almost) no room left. None: the destination's (a
    failed write frees what it wrote, so the destination's own room says nothing)."""
    def existing(path) -> Path:
        return next(p for p in [Path(path).absolute(), *Path(path).absolute().parents] if p.exists())

    def full_elsewhere(target: Path | int) -> bool:  # a path, or a file descriptor
        stat, room = os.stat(target), os.statvfs(target)
        on_a_device = S_ISREG(stat.st_mode) or S_ISDIR(stat.st_mode)  # (not a pipe or terminal)
        return on_a_device and stat.st_dev != home and room.f_bavail * room.f_frsize < 2**20

    home = os.stat(existing(where)).st_dev
    candidates = [(str(error.filename), lambda: existing(error.filename))] if getattr(error, "filename", None) else []
    candidates += [("standard output", lambda: sys.stdout.fileno()), ("TMPDIR", lambda: Path(tempfile.gettempdir()))]
    for name, target in candidates:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # (stdout replaced by another object)
            if full_elsewhere(target()):
                return name
    return None


def _xla_error_text(error: BaseException, args) -> str:
    """One line for a computation that failed while running: a device error, or in a multi-process
    run a peer that stopped (XLA repeats its "Error dispatching computation: " prefix per level)."""
    raw = str(error).strip()
    message = raw.splitlines()[0] if raw else type(error).__name__
    while message.startswith("Error dispatching computation: "):
        message = message[len("Error dispatching computation: "):]
    text = f"the computation failed: {message}"
    if sys.modules["jax"].distributed.is_initialized():
        text += " (in a multi-process run: another process may have stopped first)"
    return text + (f"; {RESUMES}" if getattr(args, "command", None) in RUN_COMMANDS else "")


NOT_EMPTY = {  # argument destinations whose value may not be an empty string -> their names in messages
    "config": "--config", "workdir": "--workdir", "output": "--output", "model": "MODEL", "src": "SRC", "dst": "DST",
    "tokenizer": "--tokenizer", "include_path": "--include-path", "folder": "--folder", "copy_back": "--copy-back",
    "zone": "--zone", "runtime_version": "--runtime-version", "project": "--project", "setup": "--setup",
    "partition": "--partition", "account": "--account", "job_name": "--job-name", "prompts_file": "--prompts-file"}


OVERRIDE_COMMANDS = ("train", "eval", "sweep", "data inspect", "prepare-data", "plan", "demo")  # read --config.*


def _command_name(args) -> str:
    """The command as typed: "train", "data inspect"."""
    return " ".join(filter(None, (args.command, getattr(args, "data_command", None))))


def _check_command_reads_overrides(args) -> None:
    """An override given to a command that reads no experiment config would be ignored: refused."""
    command = _command_name(args)
    if args.overrides and command not in (*OVERRIDE_COMMANDS, "launch"):  # (launch: they go after --)
        raise UserError(f"--config.{args.overrides[0]}: llama-jax {command} reads no experiment config, so the "
                        f"override would be ignored; drop it (--config.* overrides are for "
                        f"{', '.join(OVERRIDE_COMMANDS)})")


def _check_not_empty(args) -> None:
    """An empty path would mean the current directory (or its parent) to the code below: refused."""
    for dest, name in NOT_EMPTY.items():
        value = getattr(args, dest, None)
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"{name} is empty; give a value")


# Global settings of JAX's number types, which the program does not follow: it computes in 32 bits
# with JAX's standard promotion, as without them (64-bit Python numbers made a run's learning rates
# float64, its results not those of the same run without the setting).
JAX_NUMERICS_ENV = ("JAX_ENABLE_X64", "JAX_NUMPY_DTYPE_PROMOTION")


def _open_closed_standard_streams() -> None:
    """Open the null device as each standard stream the program was started without (`>&-`): Python
    leaves sys.stdout None there (the command failed on a traceback at its first flush), and the
    first file the program opened would take the stream's number, so that whatever wrote to the
    stream (a child process, say) would write into that file."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one, or a lower closed one's
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


def main(argv: list[str] | None = None) -> int:
    """The `llama-jax` command; `argv` None: this process's own arguments (run as a program)."""
    if argv is None:  # a program of its own: restart once, before JAX is imported, if that helps
        from llama_jax.backend_tuning import restart_with_huge_pages

        _open_closed_standard_streams()
        restart_with_huge_pages()
        for name in JAX_NUMERICS_ENV:
            os.environ.pop(name, None)
        sys.stdout.reconfigure(errors="backslashreplace")  # (as stderr): text the encoding lacks is escaped
    _NOISE.install()
    status = 1
    try:
        _NOISE.start()
        status = _run(argv)
    finally:
        if argv is None:  # the command is over
            ignore_signals()
        _NOISE.end(succeeded=status == 0, exiting=argv is None)
    if argv is None and status != 0:
        _exit_without_teardown(status)
    return status


def _exit_without_teardown(status: int) -> None:
    """End a failed or interrupted program without the interpreter's teardown. Ctrl-C or SIGTERM
    can stop the command while XLA still compiles in threads of its own, and the teardown then
    frees the XLA client under them (a segmentation fault after the "interrupted" line); in a
    multi-process run, the teardown waits in JAX's shutdown barrier for processes that are gone,
    then aborts (60-100 s later, with pages of C++ logs). What the command opened (checkpoint
    writers, logs, child processes) was closed on its way out."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _backend_unavailable(error: BaseException) -> str | None:
    """The line for a JAX platform that cannot start here (JAX_PLATFORMS naming an unknown backend, or
    one whose plugin is not installed: JAX raises a RuntimeError, or fails an assertion with no
    backend at all); None for any other error."""
    text = str(error).split(" (set JAX_PLATFORMS", 1)[0].rstrip(".")
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, RuntimeError) and text.startswith("Unable to initialize backend"):
        reason = text
    elif isinstance(error, AssertionError) and frames and frames[-1].filename.endswith("xla_bridge.py"):
        reason = "no JAX backend could start"
    else:
        return None
    platforms = os.environ.get("JAX_PLATFORMS")
    if not platforms:
        return f"{reason}; check the JAX installation (pip install -U jax, or the accelerator's jax package)"
    return f"JAX_PLATFORMS={platforms!r}: {reason}; name the backends this machine has (e.g. cpu), or unset it"


def _run(argv: list[str] | None) -> int:
    try:
        rest, overrides = _split_config_overrides(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"llama-jax: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(_attach_mesh_values(rest))
    args.overrides, args.own_process = overrides, argv is None
    try:
        with raising_signals():
            _check_command_reads_overrides(args)
            _check_not_empty(args)
            from llama_jax import backend_tuning

            backend_tuning.enabled()  # a value of LLAMA_JAX_TUNING it does not know: refused
            status = args.func(args)  # None, or the exit status of a step that reported its own failure
    except (UserError, ValueError, OSError, RuntimeError, AssertionError) as e:  # OSError: paths not read or written
        command = _command_name(args)
        unavailable = _backend_unavailable(e)
        if unavailable:
            print(f"llama-jax {command}: error: {unavailable}", file=sys.stderr)
            return 2
        if isinstance(e, AssertionError):  # a bug: its traceback is wanted
            raise
        if isinstance(e, BrokenPipeError) and _stdout_reader_gone():  # piped into `| head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
            if args.command in PRINTING_COMMANDS:  # what it prints is all it makes: not an error
                return 0
            with contextlib.suppress(OSError):  # (stderr may go to the same pipe)
                print(f"llama-jax {command}: error: its standard output was closed (the program reading it "
                      "exited), so it stopped there; redirect the output to a file to let it finish",
                      file=sys.stderr)
            return 128 + signal.SIGPIPE
        from llama_jax.devices import computation_failed

        if computation_failed(e):
            print(f"llama-jax {command}: error: {_xla_error_text(e, args)}", file=sys.stderr)
            return 1
        if isinstance(e, RuntimeError):  # any other is a bug: its traceback is wanted
            raise
        print(f"llama-jax {command}: error: {_error_text(e, args)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        return stopped_status(f"llama-jax {args.command}", e)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
