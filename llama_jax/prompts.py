"""Prompts for `llama-jax generate`: chat templates, stop strings, prompt files and streaming.

`chat_ids` formats one user turn with the template of the tokenizer's family, exactly as Meta's
reference code does: LLaMA 2 (SentencePiece) `BOS [INST] {prompt} [/INST]`; LLaMA 3 (tiktoken)
`<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>`
`<|start_header_id|>assistant<|end_header_id|>\\n\\n`, with the special tokens as their ids (never
as text) and each piece encoded on its own, as Meta's `ChatFormat` does. The prompt is stripped of
surrounding whitespace in both. The reply ends at the family's end-of-turn token: `<|eot_id|>`
(or `<|end_of_text|>`) for LLaMA 3, EOS for LLaMA 2.

`infill_ids` formats a Code Llama infilling problem (a prompt with one `<FILL_ME>`) as Meta's
`infilling_prompt_tokens` does (prefix-suffix-middle); the filling ends at `▁<EOT>`.

`complete` is what the command runs: it encodes the prompts (plain, chat or infilling), decodes
them with `generate`, cuts each row at its end token and at the first stop string, and can stream a
single prompt. A plain prompt's continuation is decoded in the context of the prompt
(`continuation_text`), so that prompt + continuation reads as transformers decodes the whole
sequence. With stop strings, a second end token or a stream, `generate` hands over the tokens
every `STREAM_CHUNK` steps: rows whose text holds a stop string are finished there (they stop
early, and the batch ends once every row has), and the stream prints what cannot change any more.
The tokens are those of one uninterrupted call, sampled or greedy.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from llama_jax.config import LLaMAConfig, check_flag, check_model_config, is_int
from llama_jax.data import parse_json_line, utf8_text
from llama_jax.tokenizer import (SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, check_fits, check_tokenizer,
                                 unicode_problem)

STREAM_CHUNK = 16


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of `stop`; all of it if none occurs."""
    if isinstance(stop, str):
        stop = [stop]
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


def continuation_text(tokenizer: Tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text `new_ids` add after the prompt, decoded in context: decoded alone, a SentencePiece
    continuation would lose the space its first word piece starts with ("The cat sat." + "▁It"
    must read "The cat sat. It", as transformers decodes the whole sequence)."""
    before = tokenizer.decode(prompt_ids)
    whole = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return whole[len(before):] if whole.startswith(before) else tokenizer.decode(new_ids)


def chat_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as a single user turn in the tokenizer family's chat template,
    ending where the assistant's reply begins."""
    if isinstance(tokenizer, TiktokenTokenizer):
        special = tokenizer.special_tokens

        def header(role: str) -> list[int]:
            return ([special["<|start_header_id|>"]] + tokenizer.encode(role, bos=False)
                    + [special["<|end_header_id|>"]] + tokenizer.encode("\n\n", bos=False))

        return ([tokenizer.bos_id] + header("user") + tokenizer.encode(prompt.strip(), bos=False)
                + [special["<|eot_id|>"]] + header("assistant"))
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.encode(f"[INST] {prompt.strip()} [/INST]", bos=True, eos=False)
    raise ValueError(f"--chat needs a LLaMA 2 (SentencePiece) or LLaMA 3 (tiktoken) tokenizer, "
                     f"not {type(tokenizer).__name__}")


FILL_MARK = "<FILL_ME>"  # where an infilling prompt's filling goes (transformers' CodeLlamaTokenizer's marker)
INFILL_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")  # Code Llama's (ids 32007-32010 in its tokenizer.model)


def infill_pieces(tokenizer: Tokenizer) -> list[int]:
    """Ids of Code Llama's ▁<PRE>, ▁<SUF>, ▁<MID> and ▁<EOT> pieces; ValueError naming those the
    tokenizer lacks (a LLaMA 3 tokenizer has none)."""
    needed = f"infilling needs a Code Llama tokenizer.model, which holds {', '.join(INFILL_PIECES)}"
    if not isinstance(tokenizer, SentencePieceTokenizer):
        kind = "LLaMA 3 (tiktoken)" if isinstance(tokenizer, TiktokenTokenizer) else type(tokenizer).__name__
        raise ValueError(f"a {kind} tokenizer cannot infill; {needed}")
    sp = tokenizer.sp
    missing = [piece for piece in INFILL_PIECES if sp.id_to_piece(sp.piece_to_id(piece)) != piece]  # else unk's id
    if missing:
        raise ValueError(f"this tokenizer cannot infill: it lacks {', '.join(missing)}; {needed}")
    return [sp.piece_to_id(piece) for piece in INFILL_PIECES]


def check_infill_prompt(prompt: str) -> None:
    """ValueError unless `prompt` holds exactly one FILL_MARK."""
    count = prompt.count(FILL_MARK)
    if count != 1:
        held = f"it {count} times" if count else "none"
        raise ValueError(f"an infilling prompt holds {FILL_MARK} once, where the filling goes (the text before it is "
                         f"the prefix, after it the suffix); this one holds {held}: {prompt[:60]!r}")


def infill_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` (prefix FILL_MARK suffix) as a Code Llama infilling problem, in Meta's
    prefix-suffix-middle format: BOS ▁<PRE> prefix ▁<SUF> suffix ▁<MID>, the prefix encoded as any
    text (the space SentencePiece puts first included), the suffix without that space, as it
    continues the filling. The filling that follows ends at ▁<EOT>."""
    check_infill_prompt(prompt)
    prefix, suffix = prompt.split(FILL_MARK)
    pre, suf, mid, _ = infill_pieces(tokenizer)
    return ([tokenizer.bos_id, pre] + tokenizer.encode(prefix, bos=False) + [suf] + tokenizer.encode_infilling(suffix)
            + [mid])


def _string_list(value: object, name: str) -> list[str]:
    """`value` as a list of strings: an iterable of them (a lone string is one)."""
    if isinstance(value, str):
        return [value]
    items = list(value) if hasattr(value, "__iter__") and not isinstance(value, bytes) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    return items


def _id_list(value: object, name: str, vocab_size: int) -> list[int]:
    """`value` (an iterable: a list, a 1-D array) as a list of token ids below `vocab_size`."""
    items = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else None
    if items is None or not all(is_int(v) and 0 <= int(v) < vocab_size for v in items):
        raise ValueError(f"{name} must be a list of token ids in [0, {vocab_size}), got {value!r}")
    return [int(v) for v in items]


def end_ids(tokenizer: Tokenizer, chat: bool, listed: Sequence[int] = (), stop: Sequence[str] = (),
            infill: bool = False) -> list[int]:
    """Ids that end a row: the first is the one the decode loop stops at. `listed`: more of them,
    from the model's generation config (`model_dir.generation_end_ids`); a `stop` string that is a
    special token's text (`<|eot_id|>`) ends a row as that token, since special pieces are no text.
    `infill`: a filling ends at ▁<EOT> (or EOS)."""
    if infill:
        ends = [infill_pieces(tokenizer)[3], tokenizer.eos_id]
    elif chat and isinstance(tokenizer, TiktokenTokenizer):
        ends = [tokenizer.special_tokens["<|eot_id|>"], tokenizer.eos_id]
    else:
        ends = [tokenizer.eos_id]
    named = getattr(tokenizer, "special_tokens", {})
    return ends + [i for i in dict.fromkeys([*listed, *(named[s] for s in stop if s in named)]) if i not in ends]


def through_end(ids: Sequence[int], ends: Sequence[int]) -> list[int]:
    """`ids` up to the first end id, that id included (what follows a row's end is filler). Decoding
    them as text drops the special ids (EOS, chat markers) as transformers' skip_special_tokens does;
    an end id that is an ordinary piece (a generation_config.json may list one) stays text, as there."""
    ids = list(ids)
    cuts = [ids.index(e) for e in ends if e in ids]
    return ids[:min(cuts) + 1] if cuts else ids


MAX_PROMPTS_BYTES = 256 * 2**20  # a prompts file larger than this is a corpus or a device given by mistake


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts of a file: one per non-blank line of a text file (`-`: standard input), or the
    "prompt" (else "text") string field of each non-blank line of a `.jsonl` file. Bad input:
    ValueError with one line naming the file (and the line), also for more than
    MAX_PROMPTS_BYTES, which is not read further (`/dev/zero` filled the memory)."""
    if str(path) == "-":
        data = _read_capped(sys.stdin.buffer, "standard input")
        return _prompts_of_text(utf8_text(data, "standard input"), "standard input", jsonl=False)
    path = Path(path)
    wanted = "a text file (one prompt per line) or a .jsonl file (one JSON object with a \"prompt\" field per line)"
    if path.suffix.lower() == ".json":  # a JSON document read line by line would give its lines as prompts
        raise ValueError(f"{path}: a .json file; give {wanted}")
    try:
        with open(path, "rb") as f:
            text = utf8_text(_read_capped(f, str(path)), str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (`-` reads the prompts from standard input)") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory; give {wanted}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    return _prompts_of_text(text, path, jsonl=path.suffix.lower() == ".jsonl")


def _read_capped(f, where: str) -> bytes:
    data = f.read(MAX_PROMPTS_BYTES + 1)
    if len(data) > MAX_PROMPTS_BYTES:
        most = f"{MAX_PROMPTS_BYTES // 2**20} MiB" if MAX_PROMPTS_BYTES >= 2**20 else f"{MAX_PROMPTS_BYTES} bytes"
        raise ValueError(f"{where}: more than {most} of prompts (a corpus or a device given by mistake?); give at "
                         f"most {most} per file")
    return data


def _prompts_of_text(text: str, path, jsonl: bool) -> list[str]:
    """`read_prompts_file`'s prompts of `text`, read from `path` (for the messages)."""
    prompts = []
    # lines end at "\n" only: splitlines() also splits at U+2028, form feeds and others, which JSON
    # strings may hold unescaped and text prompts may contain
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            record = parse_json_line(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: {e}") from None
        value = None
        if isinstance(record, dict):
            value = record.get("prompt", record.get("text"))
        if not isinstance(value, str):
            raise ValueError(f"{path}, line {number}: expected a JSON object with a string \"prompt\" "
                             f"(or \"text\") field")
        problem = unicode_problem(value)
        if problem:
            raise ValueError(f"{path}, line {number}: the prompt is not valid Unicode ({problem})")
        prompts.append(value)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or blank)")
    return prompts


def _stream_safe(text: str, stop: Sequence[str]) -> int:
    """How much of a partial continuation can be printed: not a trailing U+FFFD (bytes a later
    token may complete), nor a tail that may be the start of a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return max(end, 0)


def complete(config: LLaMAConfig, params: Mapping, tokenizer: Tokenizer, prompts: Sequence[str],
             max_new_tokens: int = 64, temperature: float = 0.8, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop: Sequence[str] = (), chat: bool = False,
             stream: Callable[[str], None] | None = None, mesh=None, end_tokens: Sequence[int] = (),
             infill: bool = False) -> list[str]:
    """Continuations (chat: replies; infill: fillings) of `prompts`, each cut at its end token and
    first stop string.

    `stream`: with a single prompt, called with each new piece of text as it is produced; the
    pieces join to the returned text. `mesh`: decode sharded over it (`generate`'s `mesh`).
    `end_tokens`: ids that end a row besides the tokenizer's (`model_dir.generation_end_ids`).
    `stop`: a list of strings (a lone string is one stop string). `infill`: each prompt holds one
    FILL_MARK; the text returned is what goes there (`infill_ids`; a Code Llama tokenizer).
    """
    from llama_jax.generate import generate

    check_model_config(config)
    check_tokenizer(tokenizer)
    check_fits(tokenizer, config.vocab_size)  # (else a prompt's id past the model's was the error)
    check_flag(chat, "chat")
    check_flag(infill, "infill")
    if chat and infill:
        raise ValueError("chat and infill exclude each other: a prompt is a user turn or an infilling problem")
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a function called with each new piece of text, or None; got {stream!r}")
    stop, end_tokens = _string_list(stop, "stop"), _id_list(end_tokens, "end_tokens", config.vocab_size)
    if any(s == "" for s in stop):
        raise ValueError("a stop string must not be empty")
    if isinstance(prompts, str):  # its characters would be the prompts
        raise ValueError(f"prompts is a list of strings, got the string {prompts[:40]!r}; wrap it: [prompt]")
    if isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a list of strings, got {prompts!r}"[:200])
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; give at least one prompt")
    bad = next((p for p in prompts if not isinstance(p, str)), None)
    if bad is not None:
        raise ValueError(f"prompts must be strings (for token ids, use llama_jax.generate.generate), got {bad!r}"[:200])

    def encode(prompt: str) -> list[int]:
        if infill:
            return infill_ids(tokenizer, prompt)
        return chat_ids(tokenizer, prompt) if chat else tokenizer.encode(prompt, bos=True, eos=False)

    ids = [encode(p) for p in prompts]
    ends = end_ids(tokenizer, chat, end_tokens, stop, infill)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=ends[0], n_tokens=tokenizer.vocab_size,
                   mesh=mesh)

    def text_of(prompt_ids: Sequence[int], new: Sequence[int]) -> str:
        new = through_end(new, ends)
        if infill:  # the filling ends before ▁<EOT> (an ordinary piece), and starts with its own space
            return tokenizer.decode_infilling([t for t in new if t not in tokenizer.special_ids and t not in ends])
        # special pieces (EOS, unknown, chat markers) are no text, as transformers' skip_special_tokens has it
        new = [t for t in new if t not in tokenizer.special_ids]
        return tokenizer.decode(new) if chat else continuation_text(tokenizer, prompt_ids, new)

    def finish(prompt_ids: Sequence[int], new: Sequence[int]) -> str:
        return cut_at_stop(text_of(prompt_ids, new), stop)

    streaming, printed = stream is not None and len(prompts) == 1, ""

    def watch(rows: list[list[int]]) -> list[bool]:
        """After each chunk: which rows are finished; a stream prints what is safe to print."""
        nonlocal printed
        finished = []
        for prompt_ids, new in zip(ids, rows):
            text = text_of(prompt_ids, new)
            stopped = cut_at_stop(text, stop)
            finished.append(len(stopped) < len(text) or any(e in new for e in ends))
        if streaming:
            last = finished[0] or len(rows[0]) == max_new_tokens
            upto = len(stopped) if last else _stream_safe(stopped, stop)
            if upto > len(printed) and stopped.startswith(printed):
                stream(stopped[len(printed):upto])
                printed = stopped[:upto]
        return finished

    rows = generate(config, params, ids, max_new_tokens, seed=seed, chunk=STREAM_CHUNK,
                    on_tokens=watch if streaming or stop or len(ends) > 1 else None, **options)
    texts = [finish(prompt_ids, new) for prompt_ids, new in zip(ids, rows)]
    if streaming and texts[0] != printed and texts[0].startswith(printed):
        stream(texts[0][len(printed):])
    return texts


__all__ = ["FILL_MARK", "INFILL_PIECES", "STREAM_CHUNK", "chat_ids", "check_infill_prompt", "complete",
           "continuation_text", "cut_at_stop", "end_ids", "infill_ids", "infill_pieces", "read_prompts_file",
           "through_end"]
