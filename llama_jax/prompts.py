"""Prompts for `llama-jax generate`: chat templates, stop strings, prompt files and streaming.

`chat_ids` formats one user turn with the template of the tokenizer's family, exactly as Meta's
reference code does: LLaMA 2 (SentencePiece) `BOS [INST] {prompt} [/INST]`; LLaMA 3 (tiktoken)
`<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>`
`<|start_header_id|>assistant<|end_header_id|>\\n\\n`, with the special tokens as their ids (never
as text) and each piece encoded on its own, as Meta's `ChatFormat` does. The prompt is stripped of
surrounding whitespace in both. The reply ends at the family's end-of-turn token: `<|eot_id|>`
(or `<|end_of_text|>`) for LLaMA 3, EOS for LLaMA 2.

`complete` is what the command runs: it encodes the prompts (plain or chat), decodes them with
`generate`, cuts each row at its end token and at the first stop string, and can stream a single
prompt. Streaming calls `generate` repeatedly for `STREAM_CHUNK` new tokens at a time, feeding
the prompt plus what was produced so far back in as the next prompt (left-padded to one fixed
length, so every full chunk reuses one compiled function). The decode loop is untouched.
Greedy decoding gives the same tokens as one call, up to float rounding between the prefill
and the one-token decode step (tested to be identical on the test models). Sampled streams would
draw chunk k with seed `(seed + k) % 2**63`, reproducible but not the draw of one call, so the
command streams greedy decoding only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from llama_jax.config import LLaMAConfig
from llama_jax.tokenizer import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer

STREAM_CHUNK = 16


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any of `stop`; all of it if none occurs."""
    if isinstance(stop, str):
        stop = [stop]
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[:min(cuts)] if cuts else text


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


def end_ids(tokenizer: Tokenizer, chat: bool) -> list[int]:
    """Ids that end a row: the first is the one the decode loop stops at."""
    if chat and isinstance(tokenizer, TiktokenTokenizer):
        return [tokenizer.special_tokens["<|eot_id|>"], tokenizer.eos_id]
    return [tokenizer.eos_id]


def _cut_ids(ids: Sequence[int], ends: Sequence[int]) -> list[int]:
    """`ids` before the first end id (the end id itself is dropped)."""
    ids = list(ids)
    cuts = [ids.index(e) for e in ends if e in ids]
    return ids[:min(cuts)] if cuts else ids


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts of a file: one per non-blank line of a text file, or the "prompt" (else "text")
    string field of each non-blank line of a `.jsonl` file. Bad input: ValueError with one line
    naming the file (and the line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    prompts = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        value = None
        if isinstance(record, dict):
            value = record.get("prompt", record.get("text"))
        if not isinstance(value, str):
            raise ValueError(f"{path}, line {number}: expected a JSON object with a string \"prompt\" "
                             f"(or \"text\") field")
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
             stream: Callable[[str], None] | None = None) -> list[str]:
    """Continuations (chat: replies) of `prompts`, each cut at its end token and first stop string.

    `stream`: with a single prompt, called with each new piece of text as it is produced; the
    pieces join to the returned text.
    """
    from llama_jax.generate import generate

    if any(s == "" for s in stop):
        raise ValueError("a stop string must not be empty")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts; give --prompt TEXT or --prompts-file FILE")
    ids = [chat_ids(tokenizer, p) if chat else tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    ends = end_ids(tokenizer, chat)
    options = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=ends[0], n_tokens=tokenizer.vocab_size)

    def finish(new: Sequence[int]) -> str:
        return cut_at_stop(tokenizer.decode(_cut_ids(new, ends)), stop)

    if stream is None or len(prompts) != 1:
        return [finish(row) for row in generate(config, params, ids, max_new_tokens, seed=seed, **options)]

    prompt, new, printed = ids[0], [], ""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if len(prompt) + max_new_tokens > config.max_seq_len:  # checked before anything is printed
        raise ValueError(f"longest prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) = "
                         f"{len(prompt) + max_new_tokens} exceeds the model's max_seq_len ({config.max_seq_len})")
    chunks = math.ceil(max_new_tokens / STREAM_CHUNK)
    # Every chunk's prompt is left-padded to the last one's length, so full chunks share one compile.
    pad_to = min(len(prompt) + (chunks - 1) * STREAM_CHUNK, config.max_seq_len - STREAM_CHUNK)
    for k in range(chunks):
        n = min(STREAM_CHUNK, max_new_tokens - len(new))
        new += generate(config, params, [prompt + new], n, seed=(seed + k) % 2**63, pad_to=pad_to, **options)[0]
        done = any(e in new for e in ends)
        text = tokenizer.decode(_cut_ids(new, ends))
        stopped = cut_at_stop(text, stop)
        done = done or len(stopped) < len(text)
        upto = len(stopped) if done or k == chunks - 1 else _stream_safe(stopped, stop)
        if upto > len(printed) and stopped.startswith(printed):
            stream(stopped[len(printed):upto])
            printed = stopped[:upto]
        if done:
            break
    final = finish(new)
    if final != printed and final.startswith(printed):
        stream(final[len(printed):])
    return [final]


__all__ = ["STREAM_CHUNK", "chat_ids", "complete", "cut_at_stop", "end_ids", "read_prompts_file"]
