"""Tokenizers: a small SentencePiece model trained here on Python's own help texts, checked
against sentencepiece and transformers; a toy LLaMA-3 (tiktoken) file checked against tiktoken;
bad files; and the training CLI."""

import base64
import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from pydoc_data.topics import topics
from sentencepiece import sentencepiece_model_pb2

from llama_jax.tokenizer import (
    LLAMA3_SPECIAL_TOKENS, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, _pieces, load_tokenizer,
    train_sentencepiece, unicode_problem,
)
from tests.test_prepare import _children

REPO = Path(__file__).resolve().parent.parent
CORPUS = [topics[k] for k in sorted(topics)]
VOCAB = 500
TEXTS = [
    "The cat sits on the mat.",
    "Numbers 1234567890 and 3.14159; dates 2024-05-17.",
    "  two leading spaces, a  double   gap, trailing  ",
    " one leading space",
    "Unicode: naïve café, Ελληνικά, 日本語, emoji 😀🚀",
    "tabs\tand\nnewlines\n\n\nand a\r\ncarriage return",
    "def f(x):\n    return x ** 2  # code",
    "",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "tokenizer.model", VOCAB)


def test_trained_model_has_llama_settings(sp_model):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == spec.BPE and spec.byte_fallback and spec.split_digits
    assert (spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id) == (0, 1, 2, -1)
    assert spec.allow_whitespace_only_pieces and spec.max_sentence_length == 4192
    assert norm.name == "identity" and norm.add_dummy_prefix and not norm.remove_extra_whitespaces
    assert len(proto.pieces) == VOCAB
    assert not any("\n" in p.piece for p in proto.pieces)
    assert list(sp_model.parent.iterdir()) == [sp_model]  # no temporary files left behind


def test_sentencepiece_round_trip_and_special_ids(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB, 1, 2, -1)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.eos_id not in ids
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=False, eos=True) == ids[1:] + [tok.eos_id]
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.eos_id]) == text
    # Characters outside the training text become UTF-8 byte pieces <0x..> (ids 3..258), not <unk>.
    emoji = tok.encode("😀", bos=False)
    assert 0 not in emoji and all(3 <= i < 259 for i in emoji[1:]) and len(emoji[1:]) == 4
    assert tok.encode("2024", bos=False)[-4:] == [tok.sp.piece_to_id(d) for d in "2024"]  # split_digits
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([VOCAB])
    assert tok.decode(np.asarray(ids)) == tok.decode(iter(ids)) == tok.decode(ids) == TEXTS[-1]  # any iterable
    for ids_, message in (("def", r"one sequence of token ids .* got 'def'"),  # was int('d')
                          (5, r"one sequence of token ids .* got 5"),
                          (np.zeros((2, 2), int), r"one sequence of token ids .* got an array of shape \(2, 2\)"),
                          ([5.7, 6.2], r"^ids to decode must be integers, got 5.7$")):  # was truncated to 5, 6
        with pytest.raises(ValueError, match=message):
            tok.decode(ids_)
    for flags in (dict(bos="no"), dict(eos=0.0), dict(bos=None)):  # "no" was taken as True
        with pytest.raises(ValueError, match=r"^(bos|eos) must be True or False, got "):
            tok.encode("hi", **flags)
    with pytest.raises(ValueError, match=r"^the text to encode is not Unicode text \(a lone surrogate \\ud800 at "
                                         r"character 3\)$"):  # SentencePiece's own error is a pybind11 cast failure
        tok.encode("hi \ud800")


def test_text_that_is_not_unicode_is_named():
    """A lone surrogate is what a JSON escape gives; on the command line, where Python passes an
    undecodable byte on as U+DC80..U+DCFF, it is that byte."""
    assert unicode_problem("caf\u00e9 \U0001f600") is None
    assert unicode_problem("caf\udce9") == "a lone surrogate \\udce9 at character 3"
    assert unicode_problem("caf\udce9", from_argv=True) == "byte 0xe9 at character 3"
    assert unicode_problem("x\ud800", from_argv=True) == "a lone surrogate \\ud800 at character 1"


def test_sentencepiece_training_is_deterministic(sp_model, tmp_path):
    """Also written whole under a name near the 255-byte limit (its temporary name once failed there)."""
    again = train_sentencepiece(iter(CORPUS), tmp_path / ("a" * 244 + ".model"), VOCAB)
    assert again.read_bytes() == sp_model.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [again.name]


def test_sentencepiece_matches_references(sp_model, tmp_path):
    """Meta's rule is `[bos] + sp.encode(text)`. transformers 5 builds its fast tokenizer from the
    .model file; `LlamaTokenizer` there pre-splits on spaces and disagrees with sentencepiece on
    leading or repeated spaces, while the generic `PreTrainedTokenizerFast` keeps sentencepiece's
    behaviour. Built from a bare .model it adds BOS only when asked, as Llama's config does."""
    import transformers

    tok = load_tokenizer(sp_model)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path, add_bos_token=True)
    texts = TEXTS + [para for text in CORPUS[:20] for para in text.split("\n\n")]
    for text in texts:
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text)
        reference = hf.encode(text)
        assert reference[0] == hf.bos_token_id == 1
        assert ids == reference, text


def test_tokenizers_pickle(sp_model, tmp_path):
    (tmp_path / "toy3.model").write_bytes(_tiktoken_file(_toy_ranks()))
    for tok in (load_tokenizer(sp_model), load_tokenizer(tmp_path / "toy3.model")):
        assert pickle.loads(pickle.dumps(tok)).encode(TEXTS[4]) == tok.encode(TEXTS[4])


# LLaMA 3: tiktoken ranks with Meta's split regex (written out here again on purpose).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MERGES = [b"th", b"the", b" t", b" the", b"in", b"ing", b" th", b"er", b"\n\n", b"12", b"123", b"45", b"'s"]


def _toy_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for merge in MERGES:
        ranks[merge] = len(ranks)
    return ranks


def _tiktoken_file(ranks: dict[bytes, int]) -> bytes:
    return b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in ranks.items())


# Ids (after the last rank, 128000 in LLaMA 3.x) that Hugging Face's tokenizer.json of LLaMA 3.1, 3.2 and
# 3.3 gives some of its special tokens; the rest are <|reserved_special_token_3|> to _247|>, in order.
LLAMA31_NAMED = {
    "<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
    "<|reserved_special_token_1|>": 3, "<|finetune_right_pad_id|>": 4, "<|reserved_special_token_2|>": 5,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9, "<|python_tag|>": 10,
    "<|reserved_special_token_3|>": 11, "<|reserved_special_token_4|>": 12, "<|reserved_special_token_247|>": 255,
}


def test_llama3_tiktoken_format(tmp_path):
    import tiktoken

    ranks = _toy_ranks()
    n = len(ranks)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(_tiktoken_file(ranks))
    tok = load_tokenizer(path)
    assert isinstance(tok, TiktokenTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (n + 256, n, n + 1, -1)
    assert len(set(LLAMA3_SPECIAL_TOKENS)) == 256 and set(tok.special_tokens.values()) == set(range(n, n + 256))
    for name, offset in LLAMA31_NAMED.items():
        assert tok.special_tokens[name] == n + offset, name
        assert tok.decode([n + offset]) == ("" if offset < 2 else name)
        # tiktoken reads the name as that token where special tokens are allowed (the chat template)
        assert tok.encoding.encode(f"a{name}", allowed_special="all") == [ord("a"), n + offset]
    assert "<|reserved_special_token_248|>" not in tok.special_tokens  # LLaMA 3.0's names went to 250

    reference = tiktoken.Encoding("toy", pat_str=LLAMA3_REGEX, mergeable_ranks=ranks, special_tokens={})
    texts = TEXTS + ["the theme: the thing's 12345 inner\n\nthere", "<|begin_of_text|>hi<|eot_id|>"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == [n] + reference.encode_ordinary(text)
        assert all(i < n for i in ids[1:])  # special-token text stays text
        assert tok.decode(ids) == text
        assert tok.encode(text, bos=False, eos=True) == ids[1:] + [n + 1]
    assert tok.encode(" the", bos=False) == [ranks[b" the"]]
    assert tok.decode([n, tok.special_tokens["<|eot_id|>"], n + 1]) == "<|eot_id|>"
    with pytest.raises(ValueError, match=r"lone surrogate \\udcff at character 2"):  # tiktoken would encode U+FFFD
        tok.encode("ab\udcffcd")


def test_a_none_among_ids_to_decode_is_named(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(_tiktoken_file(_toy_ranks()))
    with pytest.raises(ValueError, match=r"^ids to decode must be integers, got None$"):  # was int(None)'s TypeError
        load_tokenizer(path).decode([5, None])


def test_long_runs_are_cut_like_meta():
    text = "x" * 60_000 + " " * 30_000 + "end"
    pieces = list(_pieces(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [25_000, 25_000, 35_000, 5_003]


def test_bad_files_raise_one_line_value_error(sp_model, tmp_path):
    model = sp_model.read_bytes()
    files = {
        "missing.model": None,
        "empty.model": b"",
        "text.model": b"hello world\n",
        "truncated.model": model[: len(model) // 2],
        "binary.model": bytes(range(256)) * 8,
        "gap.model": _tiktoken_file({bytes([b]): b + (b > 9) for b in range(256)}),
    }
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as err:
            load_tokenizer(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value), name
    os.mkfifo(tmp_path / "fifo.model")  # reading it waited for a writer forever
    with pytest.raises(ValueError, match=r"fifo.model: not a regular file; give a tokenizer.model file$"):
        load_tokenizer(tmp_path / "fifo.model")


def test_a_damaged_tiktoken_file_names_the_line(tmp_path):
    """A LLaMA-3 file has 128,000 lines; one bad line was reported as "neither a SentencePiece model
    nor a tiktoken rank file", and a token listed twice as ranks that are not 0..N-1."""
    lines = _tiktoken_file(_toy_ranks()).splitlines(keepends=True)
    for name, damaged, message in [
        ("cut.model", lines[:100] + [lines[100][:3] + b"\n"] + lines[101:],  # (a copy cut short inside a line)
         r"line 101 of this tiktoken rank file is not a base64 token, a space and its rank: b'ZA='$"),
        ("extra.model", lines + [b"dGhlbQ== 269 x\n"],
         r"line 270 of this tiktoken rank file is not a base64 token, a space and its rank: b'dGhlbQ== 269 x'$"),
        ("twice.model", lines + [base64.b64encode(b"the") + b" 269\n"],
         r"line 270 lists the token b'the' again \(an earlier line gave it rank 257\); each token has one rank$"),
        ("bom.model", [b"\xef\xbb\xbf" + lines[0]] + lines[1:],  # (was "neither ... nor a tiktoken file (corrupt?)")
         r"a tiktoken rank file that starts with a UTF-8 byte order mark \(written by an editor\?\), which tiktoken "
         r"does not read; remove those first 3 bytes$"),
    ]:
        (tmp_path / name).write_bytes(b"".join(damaged))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}: {message}"):
            load_tokenizer(tmp_path / name)


def test_the_tokenizer_beside_a_model_that_cannot_be_its_own_is_named(sp_model, tmp_path):
    """A model directory whose tokenizer.model was swapped for a larger one: the error named no file,
    and told to use the model's own tokenizer, which is the file named."""
    from llama_jax.config import LLaMAConfig
    from llama_jax.model_dir import load_tokenizer_for

    config = LLaMAConfig(vocab_size=VOCAB - 100, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=128)
    (tmp_path / "model_config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    with pytest.raises(ValueError) as err:
        load_tokenizer_for(tmp_path, "pass --tokenizer PATH")
    assert str(err.value) == (f"{tmp_path}/tokenizer.model: the tokenizer has {VOCAB} tokens but the model's "
                              f"vocab_size is {VOCAB - 100}; it cannot be this model's tokenizer (was it replaced?): "
                              f"put the model's own tokenizer.model back")


def test_directory_without_tokenizer_model_is_named(tmp_path):
    with pytest.raises(ValueError) as err:
        load_tokenizer(tmp_path)
    assert str(err.value) == (f"{tmp_path}: a directory without tokenizer.model; give a tokenizer.model file "
                              "or a directory holding one")


@pytest.mark.parametrize("options, missing", [({"bos_id": -1}, "BOS"), ({"bos_id": -1, "eos_id": -1}, "BOS or EOS")])
def test_a_tokenizer_without_bos_or_eos_is_named(tmp_path, options, missing):
    """LLaMA texts start with BOS (encoding one fails inside SentencePiece, naming no file)."""
    lines = [line for key in sorted(topics)[:40] for line in topics[key].split("\n") if line.strip()]
    path = train_sentencepiece(lines, tmp_path / "tokenizer.model", VOCAB, **options)
    with pytest.raises(ValueError) as err:
        load_tokenizer(path)
    assert str(err.value) == (f"{path}: this SentencePiece model defines no {missing} piece; LLaMA tokenizers "
                              "define both (train one with bos_id and eos_id set, as tools/train_tokenizer.py does)")


def test_training_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece(["", "\n\n"], tmp_path / "x.model", VOCAB)
    for size in (2**31, 3.5, None, 0):  # SentencePiece failed with "cannot parse ... as int" for the first three
        with pytest.raises(ValueError, match=rf"^vocab_size must be a positive integer below 2\*\*31, got {size}$"):
            train_sentencepiece(CORPUS, tmp_path / "x.model", size)
    for size, pieces in [(1, "piece"), (2, "pieces")]:  # fewer than the special pieces: sentencepiece's own
        # failure named no size
        with pytest.raises(ValueError, match=rf"^a vocabulary of {size} {pieces} cannot hold the 3 special pieces \(unk, "
                                             r"bos, eos\) and the 256 byte pieces, let alone the corpus's characters; "
                                             r"give a vocabulary size of at least 260$"):
            train_sentencepiece(CORPUS, tmp_path / "x.model", size)
    with pytest.raises(ValueError, match=r"a vocabulary of 50 pieces cannot hold the \d+ that training needs \(the "
                                         r"corpus's characters, .*; give a vocabulary size of at least \d+$") as err:
        train_sentencepiece(CORPUS, tmp_path / "x.model", 50)
    least = int(str(err.value).split()[-1])
    with pytest.raises(ValueError, match=f"a vocabulary of {least - 1} pieces cannot hold the {least}"):
        train_sentencepiece(CORPUS, tmp_path / "x.model", least - 1)
    fits = train_sentencepiece(CORPUS, tmp_path / "fits.model", least)
    assert load_tokenizer(fits).vocab_size == least
    fits.unlink()
    with pytest.raises(ValueError, match=r"every line of the text is longer than the 4192 bytes SentencePiece "
                                         r"trains on \(it skips longer lines\); break the text into lines"):
        train_sentencepiece([" ".join(" ".join(CORPUS).split())[:5000]] * 3, tmp_path / "x.model", VOCAB)  # 1 line

    def failing():
        yield "some text"
        raise KeyError("the reader's own error")

    with pytest.raises(KeyError, match="own error"):
        train_sentencepiece(failing(), tmp_path / "x.model", VOCAB)

    def failing_at(n):  # a RuntimeError of the reader's own (read as SentencePiece's failure: "no text to train
        yield from CORPUS[:n]  # the tokenizer on", or "sentencepiece training failed: ...")
        raise RuntimeError("the reader's own error")

    for n in (0, 3):
        with pytest.raises(RuntimeError, match="^the reader's own error$"):
            train_sentencepiece(failing_at(n), tmp_path / "x.model", VOCAB)

    def interrupted():  # Ctrl-C (or the command's SIGTERM) while the trainer reads the texts
        yield "some text"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_sentencepiece(interrupted(), tmp_path / "x.model", VOCAB)
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "train_tokenizer.py"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("signum, status, line", [(signal.SIGINT, 130, "train_tokenizer.py: interrupted\n"),
                                                  (signal.SIGTERM, 143, "train_tokenizer.py: terminated (SIGTERM)\n")])
def test_train_tokenizer_cli_stopped_by_a_signal_while_sentencepiece_trains(tmp_path, signum, status, line):
    """SentencePiece trains in native code, where a Python handler runs only once it returns (Ctrl-C
    was acted on only when training was done, minutes on a large corpus, and SIGTERM kept its default
    action, with no line): it trains in a child process, which the tool stops. One line at once, the
    exit status, no --output (not even a temporary one) and no trainer left running. Ctrl-C as a
    terminal sends it, to the whole process group; SIGTERM to the tool alone."""
    rng = np.random.default_rng(0)
    words = ["".join(w) for w in rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=(120_000, 8))]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(words[i:i + 12]) for i in range(0, len(words), 12)))
    out = tmp_path / "out" / "tokenizer.model"  # (a unigram model of 8000 pieces: about 10 s of training)
    process = subprocess.Popen([sys.executable, str(REPO / "tools" / "train_tokenizer.py"), "--input",
                                str(tmp_path / "corpus.txt"), "--vocab-size", "8000", "--model-type", "unigram",
                                "--output", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    trainers = []
    try:
        assert process.stdout.readline().startswith("training a 8000-piece unigram tokenizer")
        time.sleep(1.5)  # (the corpus read by then: training has begun)
        trainers = _children(process.pid)
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        _, err = process.communicate(timeout=3)  # (training would go on for some 10 s)
    finally:
        for pid in [process.pid] + trainers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert (process.returncode, err) == (status, line)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    assert not [pid for pid in trainers if Path(f"/proc/{pid}").exists()]


def test_a_trainer_that_stops_reading_early_is_not_kept_waiting(tmp_path):
    """Without shuffling, SentencePiece reads only its input_sentence_size lines and trains: the lines
    after them must not block the trainer's model (larger than a pipe holds) from coming back (the
    call waited forever). A process of its own, so that a hang fails the test."""
    code = f"""
import numpy as np
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece
rng = np.random.default_rng(0)
words = ["".join(w) for w in rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=(3000, 6))]
lines = (" ".join(rng.choice(words, 20)) for _ in range(40_000))  # 2.8 MB, well past the pipe's buffers
path = train_sentencepiece(lines, {str(tmp_path / "t.model")!r}, 8000, shuffle_input_sentence=False,
                           input_sentence_size=10_000)
assert path.stat().st_size > 1 << 16 and load_tokenizer(path).vocab_size == 8000
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


def test_train_tokenizer_cli(sp_model, tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS[:30]), encoding="utf-8-sig")  # byte-order marks: not text
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8-sig") as f:
        for text in CORPUS[30:]:
            f.write(json.dumps({"body": text, "n": 1}) + "\n")
    out = tmp_path / "out" / "tokenizer.model"
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")  # the same file: read once
    run = _cli("--input", str(tmp_path / "*.txt"), "--input", str(tmp_path / "b.jsonl"), "--jsonl-key", "body",
               "--vocab-size", str(VOCAB), "--output", str(out))
    assert run.returncode == 0, run.stderr
    assert f"{VOCAB} pieces from {1 + len(CORPUS) - 30} documents" in run.stdout
    assert load_tokenizer(out).vocab_size == VOCAB
    assert out.read_bytes() == sp_model.read_bytes()  # same lines as the library call, same model
    small = _cli("--input", str(tmp_path / "a.txt"), "--vocab-size", "60000", "--output", str(tmp_path / "small.model"))
    pieces = load_tokenizer(tmp_path / "small.model").vocab_size  # what the corpus supports: said, not silent
    assert small.returncode == 0 and pieces < 60000, small.stderr
    assert f"{pieces} pieces (fewer than --vocab-size 60000: the corpus supports no more) from " in small.stdout

    text = str(tmp_path / "a.txt")
    model = tmp_path / "model"  # what marks a model directory (its params/ is Orbax's)
    (model / "params").mkdir(parents=True)
    (model / "model_config.json").write_text("{}")
    (tmp_path / "surrogate.jsonl").write_text('{"text": "fine"}\n{"text": "a lone \\ud800"}\n')
    (tmp_path / "latin1.dat").write_bytes("fine\ncafé\n".encode("latin-1"))
    fifo = tmp_path / "fifo.txt"  # (a device such as /dev/null alike: --overwrite put a file in its place)
    os.mkfifo(fifo)
    for args, message in [
        (["--input", str(tmp_path / "surrogate.jsonl")],
         "surrogate.jsonl:2: field 'text' is not valid Unicode (a lone surrogate \\ud800 at character 7)"),
        (["--input", str(tmp_path / "latin1.dat")], "latin1.dat:2: not UTF-8 text (byte 0xe9 at offset 3"),
        (["--input", str(tmp_path / "nothing.txt")], "nothing.txt: no such file"),
        (["--input", str(fifo)], f"{fifo}: not a regular file (a pipe, socket or device); give readable files"),
        (["--input", text, "--output", str(fifo), "--overwrite"],
         f"--output {fifo} is not a regular file (a pipe, socket or device); give the path of the file to write"),
        (["--input", ""], "--input is empty; give a file or a glob pattern, e.g. 'corpus/*.txt'"),  # (": is a dir")
        (["--input", text, "--output", " "], "--output is empty; give the path of the file to write"),
        (["--input", str(tmp_path)], f"{tmp_path}: is a directory; give the files in it, e.g. {tmp_path}/*.txt"),
        (["--input", str(tmp_path / "b.jsonl")],
         "b.jsonl:1: no string field 'text'; set --jsonl-key to the field holding the text"),
        (["--input", text, "--jsonl-key", "body"],
         "--jsonl-key body names a field of .jsonl files, and no --input is one; leave it out"),
        (["--input", text, "--vocab-size", "0"], "--vocab-size must be a positive integer below 2**31, got 0"),
        (["--input", text, "--vocab-size", "2147483648"],
         "--vocab-size must be a positive integer below 2**31, got 2147483648"),
        (["--input", text, "--num-threads", "1025"],  # SentencePiece's limit: its check failed after the start
         "argument --num-threads: must be at most 1024, got 1025"),
        (["--input", text, "--num-threads", "0"], "argument --num-threads: must be at least 1, got 0"),
        (["--input", text, "--output", text], f"--output {text} is one of the --input files; give another path"),
        (["--input", text, "--output", str(out)], f"--output {out} exists; pass --overwrite to replace it"),
        (["--input", text, "--output", str(out.parent)], f"--output {out.parent} is a directory"),
        (["--input", text, "--output", f"{tmp_path}/new/"],  # not written as a file named new
         f"--output {tmp_path}/new/ names a directory (it ends in /); give the path of the file to write, "
         f"e.g. {tmp_path}/new/tokenizer.model"),
        (["--input", text, "--output", f"{text}/x.model"], f"--output {text}/x.model: {text} is a file"),
        (["--input", text, "--output", f"{model}/params/t.model"],  # an --overwrite onto the model would delete it
         f"--output {model}/params/t.model is inside {model}/params, the parameters of the model directory"),
        (["--input", text, "--vocab-size", "many"], "argument --vocab-size: invalid int value: 'many' (see "),
    ]:
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        run = _cli("--vocab-size", str(VOCAB), "--output", str(tmp_path / "bad.model"), *args)
        assert run.returncode == 2
        assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
        assert run.stderr.startswith("train_tokenizer.py: error: ")  # argparse's prefix, and the tool's own alike
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written
        assert fifo.is_fifo()
    # a folder that takes no files, even from root (for whom os.access allows any write): found by
    # trying, before training, and said of --output, not of the temporary file a write would start with
    run = _cli("--input", text, "--vocab-size", "2", "--output", str(tmp_path / "bad.model"))
    assert run.returncode == 2 and run.stdout == "" and "a vocabulary of 2 pieces cannot hold the 3 special" in run.stderr
    for output in ("/proc/x.model", "/proc/sub/x.model"):
        run = _cli("--input", text, "--vocab-size", str(VOCAB), "--output", output)
        assert run.returncode == 2 and run.stdout == ""  # (no "training a ..." line)
        assert re.fullmatch(rf"train_tokenizer.py: error: --output {output}: cannot write a file into /proc \([^)]+\); "
                            rf"choose another --output, in a folder this user may write\n", run.stderr), run.stderr
    assert _cli("--input", text, "--vocab-size", str(VOCAB), "--output", str(out), "--overwrite").returncode == 0


def test_a_long_list_of_user_defined_symbols_is_given_to_the_trainer(tmp_path):
    """The trainer's flags went to its process as one command-line argument, which holds at most
    128 KiB: 20,000 user_defined_symbols failed with OSError "Argument list too long"."""
    symbols = [f"<sym{i:05d}>" for i in range(20_000)]
    path = train_sentencepiece(CORPUS, tmp_path / "x.model", 20_000 + VOCAB, user_defined_symbols=symbols)
    sp = load_tokenizer(path).sp
    assert [sp.id_to_piece(sp.piece_to_id(s)) for s in (symbols[0], symbols[-1])] == [symbols[0], symbols[-1]]


def test_a_trainer_process_that_fails_without_a_message_is_said_by_its_status(tmp_path, monkeypatch):
    """The trainer's process failing on its own (a Python error: exit status 1 after its traceback,
    no message) read "sentencepiece training failed: RuntimeError('')"; it names the exit status."""
    monkeypatch.setattr(sys, "executable", "/bin/false")  # (exits with status 1 at once)
    with pytest.raises(ValueError, match=r"^sentencepiece training failed: its process ended with status 1$"):
        train_sentencepiece(CORPUS, tmp_path / "x.model", VOCAB)
    assert list(tmp_path.iterdir()) == []


def test_train_tokenizer_help_states_its_defaults():
    run = _cli("--help")
    shown = " ".join(run.stdout.split())
    assert run.returncode == 0 and "{bpe,unigram} (default bpe)" in shown and "1 to 1024 (default 2)" in shown
