"""`llama-jax generate` extras: stop strings, chat templates, prompt files, --workdir, streaming."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
import sentencepiece as spm

from llama_jax import LLaMAConfig, init_params, save_model
from llama_jax import prompts as prompts_lib
from llama_jax.cli import main
from llama_jax.data import EmbeddedCorpus
from llama_jax.generate import generate, generate_text
from llama_jax.prompts import STREAM_CHUNK, chat_ids, complete, cut_at_stop, end_ids, read_prompts_file
from llama_jax.tokenizer import load_tokenizer, train_sentencepiece
from tests.test_tokenizer import _tiktoken_file, _toy_ranks

ROOT = Path(__file__).parents[1]
PROMPTS = ["The for statement", "Class definitions are"]


def _sharp(cfg, seed=0):
    # Larger weights: sharper, less repetitive greedy output with real gaps between logits.
    return jax.tree.map(lambda a: a * 10 if a.ndim > 1 else a, init_params(cfg, seed))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """(directory, config, params, tokenizer) of a tiny model with a SentencePiece tokenizer."""
    root = tmp_path_factory.mktemp("gen_cli")
    corpus = EmbeddedCorpus()
    train_sentencepiece((corpus[i] for i in range(len(corpus))), root / "tok" / "tokenizer.model", 512)
    tok = load_tokenizer(root / "tok")
    cfg = LLaMAConfig.from_preset("debug", vocab_size=512)
    params = _sharp(cfg)
    save_model(root / "model", cfg, params, tokenizer=root / "tok")
    return root / "model", cfg, params, tok


def test_cut_at_stop():
    assert cut_at_stop("abc\ndef.", ["\n", "."]) == "abc"
    assert cut_at_stop("abc.def\n", ["\n", "."]) == "abc"
    assert cut_at_stop("abc", ["x"]) == "abc" and cut_at_stop("abc", []) == "abc"
    assert cut_at_stop("abc", "b") == "a"


def test_stop_strings_end_rows_independently(sp_model, capsys):
    path, cfg, params, tok = sp_model
    full = generate_text(cfg, params, tok, PROMPTS, max_new_tokens=24, temperature=0.0)
    # A stop string that occurs in row 0's text but not in row 1's.
    stop = next(full[0][i:i + 3] for i in range(2, len(full[0]) - 3) if full[0][i:i + 3] not in full[1])
    cut = generate_text(cfg, params, tok, PROMPTS, max_new_tokens=24, temperature=0.0, stop=[stop, "\x00never"])
    assert cut == [full[0][:full[0].index(stop)], full[1]]
    assert len(cut[0]) < len(full[0])
    args = ["generate", str(path), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "24",
            "--temperature", "0", "--stop", stop, "--stop", "\x00never"]
    assert main(args) == 0
    assert capsys.readouterr().out == "\n\n-----\n\n".join(p + t for p, t in zip(PROMPTS, cut)) + "\n"
    assert main(args[:-4] + ["--stop", ""]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["llama-jax generate: error: --stop must not be empty"]


def test_generated_unknown_pieces_are_not_text(sp_model):
    """transformers' decode(..., skip_special_tokens=True) prints no text for <unk>; SentencePiece's
    own decoding gives " ⁇ " for it."""
    _, cfg, params, tok = sp_model
    silent = dict(params, final_norm={"scale": params["final_norm"]["scale"] * 0})  # every logit 0: argmax is id 0
    assert tok.sp.unk_id() == 0 and "⁇" in tok.decode([0, 0])
    assert generate_text(cfg, silent, tok, PROMPTS, max_new_tokens=4, temperature=0.0) == ["", ""]
    assert generate_text(cfg, params, tok, PROMPTS[0], max_new_tokens=4, temperature=0.0) != ""  # others are text


def test_padded_batch_rows_equal_single_prompts(sp_model):
    _, cfg, params, tok = sp_model
    prompts = ["x", PROMPTS[1] + " a long prompt that needs no padding at all"]
    batch = generate_text(cfg, params, tok, prompts, max_new_tokens=20, temperature=0.0)
    assert batch == [generate_text(cfg, params, tok, p, max_new_tokens=20, temperature=0.0) for p in prompts]


def test_llama2_chat_template(sp_model, capsys):
    path, cfg, params, tok = sp_model
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    ids = chat_ids(tok, "  What is a class?\n")
    assert ids == [1] + sp.encode("[INST] What is a class? [/INST]")
    assert ids[:3] == [1] + sp.encode("[INST]")[:2] and ids[-1] == sp.encode(" [/INST]")[-1]
    raw = generate(cfg, params, [ids], 20, eos_id=tok.eos_id, n_tokens=tok.vocab_size)[0]
    reply = complete(cfg, params, tok, ["  What is a class?\n"], max_new_tokens=20, temperature=0.0, chat=True)
    assert reply == [tok.decode(raw[:raw.index(2)] if 2 in raw else raw)]
    assert main(["generate", str(path), "--chat", "--prompt", "  What is a class?\n", "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == reply[0] + "\n"


def test_llama3_chat_template_and_end_of_turn(tmp_path, capsys):
    import tiktoken

    ranks = _toy_ranks()
    n = len(ranks)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(_tiktoken_file(ranks))
    tok = load_tokenizer(tmp_path / "tok")
    bos, start, end, eot = n, n + 6, n + 7, n + 9
    enc = tiktoken.Encoding("toy", pat_str=tok.encoding._pat_str, mergeable_ranks=ranks, special_tokens={})
    ids = chat_ids(tok, " the thing ")
    expected = ([bos, start] + enc.encode("user") + [end] + enc.encode("\n\n") + enc.encode("the thing")
                + [eot, start] + enc.encode("assistant") + [end] + enc.encode("\n\n"))
    assert ids == expected
    assert enc.encode("\n\n") == [ranks[b"\n\n"]]
    template = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nthe thing<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.encoding.encode(template, allowed_special="all") == ids
    assert tok.encode(template, bos=False) != ids[1:]  # plain encode keeps special-token text as text

    cfg = LLaMAConfig.from_preset("debug", vocab_size=tok.vocab_size)
    params = _sharp(cfg)
    # Zero output columns give the special tokens logit 0, below the largest ordinary logit.
    params = dict(params, lm_head=params["lm_head"].at[:, n:].set(0.0))
    plain = generate(cfg, params, [ids], 12, n_tokens=tok.vocab_size)[0]
    # Make <|eot_id|> the greedy pick by step 3 at the latest: its output column is twice that of the
    # token chosen there (whose logit, the maximum, is positive).
    assert max(plain) < n
    params = dict(params, lm_head=params["lm_head"].at[:, eot].set(2 * params["lm_head"][:, plain[3]]))
    raw = generate(cfg, params, [ids], 12, n_tokens=tok.vocab_size)[0]
    assert eot in raw[:4] and len(raw) == 12  # without an eos_id the row runs on past the end of turn
    reply = complete(cfg, params, tok, [" the thing "], max_new_tokens=12, temperature=0.0, chat=True)
    assert reply == [tok.decode(raw[:raw.index(eot)])] and "<|" not in reply[0]
    # special pieces are no text, so a stop string naming one ends its row as that token does
    assert end_ids(tok, False, (), ["<|eot_id|>", "x"]) == [tok.eos_id, eot]
    assert end_ids(tok, True, (), ["<|eot_id|>"]) == [eot, tok.eos_id]
    save_model(tmp_path / "model", cfg, params, tokenizer=tmp_path / "tok")
    for extra in ([], ["--prompt", "more"]):
        assert main(["generate", str(tmp_path / "model"), "--chat", "--prompt", " the thing ", *extra,
                     "--max-new-tokens", "12", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.split("\n\n-----\n\n")[0].rstrip("\n") == reply[0]


def test_llama3_1_stop_names_end_of_message(tmp_path, capsys):
    """LLaMA 3.1's <|eom_id|> (end of message, the 9th special token: id 128008 after 128000 ranks) is
    a stop a user can name: `--stop "<|eom_id|>"` ends the row at that token, which is no text."""
    ranks = _toy_ranks()
    n = len(ranks)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.model").write_bytes(_tiktoken_file(ranks))
    tok = load_tokenizer(tmp_path / "tok")
    eom = n + 8
    assert end_ids(tok, False, (), ["<|eom_id|>"]) == [tok.eos_id, eom]
    cfg = LLaMAConfig.from_preset("debug", vocab_size=tok.vocab_size)
    params = _sharp(cfg)
    params = dict(params, lm_head=params["lm_head"].at[:, n:].set(0.0))  # special tokens: logit 0
    prompt = tok.encode("the thing")
    plain = generate(cfg, params, [prompt], 8, n_tokens=tok.vocab_size)[0]
    assert max(plain) < n
    # <|eom_id|> becomes the greedy pick by step 3 at the latest (as <|eot_id|> in the test above)
    params = dict(params, lm_head=params["lm_head"].at[:, eom].set(2 * params["lm_head"][:, plain[3]]))
    raw = generate(cfg, params, [prompt], 8, n_tokens=tok.vocab_size)[0]
    assert eom in raw[:4] and len(raw) == 8
    save_model(tmp_path / "model", cfg, params, tokenizer=tmp_path / "tok")
    assert main(["generate", str(tmp_path / "model"), "--prompt", "the thing", "--stop", "<|eom_id|>",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tok.decode(prompt + raw[:raw.index(eom)]) + "\n"

def test_prompts_file(sp_model, tmp_path, capsys, monkeypatch):
    path, cfg, params, tok = sp_model
    (tmp_path / "p.txt").write_text("first prompt\n\n  second one\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "from json"}\n\n{"text": "text field", "id": 3}\n')
    assert read_prompts_file(tmp_path / "p.txt") == ["first prompt", "  second one"]
    assert read_prompts_file(tmp_path / "p.jsonl") == ["from json", "text field"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbffirst prompt\n")  # as some editors save it
    assert read_prompts_file(tmp_path / "bom.txt") == ["first prompt"]
    # lines end at "\n" (and "\r\n"), not at the other breaks str.splitlines knows: JSON writes U+2028 unescaped
    (tmp_path / "sep.jsonl").write_text(json.dumps({"prompt": "first\u2028second"}, ensure_ascii=False) + "\r\n")
    (tmp_path / "sep.txt").write_text("a form feed\x0cinside\r\nnext\n")
    assert read_prompts_file(tmp_path / "sep.jsonl") == ["first\u2028second"]
    assert read_prompts_file(tmp_path / "sep.txt") == ["a form feed\x0cinside", "next"]
    prompts = ["cli prompt", "from json", "text field", "first prompt", "  second one", "piped in"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfpiped in\n\n")))
    assert main(["generate", str(path), "--prompt", "cli prompt", "--prompts-file", str(tmp_path / "p.jsonl"),
                 "--prompts-file", str(tmp_path / "p.txt"), "--prompts-file", "-", "--max-new-tokens", "8",
                 "--seed", "3"]) == 0
    texts = generate_text(cfg, params, tok, prompts, max_new_tokens=8, temperature=0.8, seed=3)
    assert capsys.readouterr().out == "\n\n-----\n\n".join(p + t for p, t in zip(prompts, texts)) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9\n")))  # Latin-1
    with pytest.raises(ValueError, match=r"^standard input: not UTF-8 text \(byte 0xe9 at offset 3: invalid "
                                         r"continuation byte\); the file must be UTF-8$"):
        read_prompts_file("-")

    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (tmp_path / "nofield.jsonl").write_text('{"prompt": "ok"}\n["x"]\n')
    (tmp_path / "list.json").write_text('["a", "b"]\n')  # its one line was taken as a prompt
    (tmp_path / "deep.jsonl").write_text('{"prompt": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (tmp_path / "digits.jsonl").write_text('{"prompt": "read", "id": ' + "9" * 5000 + "}\n")  # (beyond int's digits)
    (tmp_path / "latin1.txt").write_bytes("first\ncafé\n".encode("latin-1"))
    assert read_prompts_file(tmp_path / "digits.jsonl") == ["read"]
    for name, message in [("empty.txt", "empty.txt: no prompts"), ("bad.jsonl", "bad.jsonl, line 2: not valid JSON"),
                          ("list.json", "list.json: a .json file; give a text file (one prompt per line) or a .jsonl"),
                          ("deep.jsonl", "deep.jsonl, line 1: JSON nested too deeply to read (thousands of levels)"),
                          ("nofield.jsonl", "nofield.jsonl, line 2: expected a JSON object with a string"),
                          ("latin1.txt", "latin1.txt: not UTF-8 text (byte 0xe9 at offset 9: invalid continuation "
                                         "byte); the file must be UTF-8"),
                          ("missing.txt", "missing.txt: no such file (`-` reads the prompts from standard input)")]:
        assert main(["generate", str(path), "--prompts-file", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # more than the limit is refused once read that far: a device that never ends (it filled the memory) or a stream
    monkeypatch.setattr(prompts_lib, "MAX_PROMPTS_BYTES", 4096)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a prompt\n" * 1000)))
    for source, where in (("/dev/zero", "/dev/zero"), ("-", "standard input")):
        assert main(["generate", str(path), "--prompts-file", source]) == 2
        assert capsys.readouterr().err == (f"llama-jax generate: error: {where}: more than 4096 bytes of prompts (a "
                                           f"corpus or a device given by mistake?); give at most 4096 bytes per file\n")
    (tmp_path / "at_limit.txt").write_bytes(b"x" * 4095 + b"\n")
    assert read_prompts_file(tmp_path / "at_limit.txt") == ["x" * 4095]
    for args, message in [([str(path)], "no prompts; give --prompt"),
                          ([], "give a model directory or --workdir RUN"),
                          ([str(path), "--workdir", str(tmp_path)], "give a model directory or --workdir RUN"),
                          ([str(path), "--step", "1", "--prompt", "x"], "--step needs --workdir")]:
        assert main(["generate", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_standard_input_as_two_prompts_files_is_refused(monkeypatch, capsys):
    """(The second read found standard input used up: "standard input: no prompts (the file is empty or blank)".)"""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"piped in\n")))
    assert main(["generate", "model", "--prompts-file", "-", "--prompts-file", "-"]) == 2
    assert capsys.readouterr().err == ("llama-jax generate: error: --prompts-file - is given more than once; standard "
                                       "input is read once, so give it once\n")


def test_streaming_equals_one_call(sp_model, capsys):
    path, cfg, params, tok = sp_model
    steps = 2 * STREAM_CHUNK + 5  # two full chunks and a short one
    expected = generate_text(cfg, params, tok, PROMPTS[0], max_new_tokens=steps, temperature=0.0)
    ids = generate(cfg, params, [tok.encode(PROMPTS[0])], steps, eos_id=tok.eos_id)[0]
    assert len(ids) == steps and len(tok.encode(PROMPTS[0] + expected)) > 2 * STREAM_CHUNK  # runs through all chunks
    pieces = []
    assert complete(cfg, params, tok, [PROMPTS[0]], steps, temperature=0.0, stream=pieces.append) == [expected]
    assert "".join(pieces) == expected and len(pieces) >= 3
    stop = expected[STREAM_CHUNK * 2:STREAM_CHUNK * 2 + 4]
    pieces = []
    out = complete(cfg, params, tok, [PROMPTS[0]], steps, temperature=0.0, stop=[stop], stream=pieces.append)
    assert out == ["".join(pieces)] == [expected[:expected.index(stop)]]
    sampled, pieces = dict(temperature=0.9, seed=7), []  # a sampled stream draws what one call draws
    streamed_text = complete(cfg, params, tok, [PROMPTS[0]], steps, stream=pieces.append, **sampled)
    assert streamed_text == complete(cfg, params, tok, [PROMPTS[0]], steps, **sampled) == ["".join(pieces)]
    assert streamed_text != [expected]
    assert main(["generate", str(path), "--prompt", PROMPTS[0], "--max-new-tokens", str(steps),
                 "--temperature", "0"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", str(path), "--prompt", PROMPTS[0], "--max-new-tokens", str(steps),
                 "--temperature", "0", "--no-stream"]) == 0
    assert streamed == capsys.readouterr().out == PROMPTS[0] + expected + "\n"


def test_mesh_shards_the_model(sp_model, capsys):
    """--mesh decodes sharded over the 8 test devices (fsdp 4 x tensor 2) and prints what one device
    samples; a mesh that does not fit the model or the devices is one line naming the problem."""
    path, cfg, params, tok = sp_model
    args = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "12", "--seed", "4"]
    assert main(["generate", str(path), *args, "--mesh", "1,4,2"]) == 0
    texts = generate_text(cfg, params, tok, PROMPTS, max_new_tokens=12, temperature=0.8, seed=4)
    assert capsys.readouterr().out == "\n\n-----\n\n".join(p + t for p, t in zip(PROMPTS, texts)) + "\n"
    for mesh, message in [("1,1,8", "model.n_heads=4 is not divisible by mesh.tensor=8"),
                          ("-1,1,8", "model.n_heads=4 is not divisible by mesh.tensor=8"),  # read as a value
                          ("1,3,1", "1 x 3 x 1 = 3, but the device count is 8")]:
        assert main(["generate", str(path), *args, "--mesh", mesh]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_workdir_equals_its_export(sp_model, tmp_path, capsys):
    path, _, _, _ = sp_model
    config = tmp_path / "config.py"
    config.write_text(
        "from llama_jax.experiment import base_config\n\n"
        "def get_config():\n"
        "    config = base_config('debug', vocab_size=512, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,\n"
        "                         ffn_dim=64, max_seq_len=128)\n"
        f"    config.data.update(source='embedded', tokenizer={str(path / 'tokenizer.model')!r})\n"
        "    config.train.update(seq_len=32, batch_size=8, steps=2)\n"
        "    config.checkpoint.update(every=1, async_save=False)\n"
        "    config.optimizer.update(warmup_steps=0)\n"
        "    return config\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--workdir", str(run)]) == 0
    args = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "10", "--seed", "2"]
    for step in (["--step", "1"], []):  # step 1, then the latest (2)
        assert main(["export", "--workdir", str(run), *step, str(tmp_path / f"exported{len(step)}")]) == 0
        capsys.readouterr()
        assert main(["generate", str(tmp_path / f"exported{len(step)}"), *args]) == 0
        of_export = capsys.readouterr().out
        assert main(["generate", "--workdir", str(run), *step, *args]) == 0
        assert capsys.readouterr().out == of_export
    assert main(["generate", "--workdir", str(run), *args, "--mesh", "1,-1,1"]) == 0  # restored sharded, fsdp 8
    assert capsys.readouterr().out == of_export
    for extra, message in [(["--step", "7"], "has no checkpoint of step 7"),
                           (["--tokenizer", str(path)], "--tokenizer is for a model directory")]:
        assert main(["generate", "--workdir", str(run), *extra, *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    synthetic = tmp_path / "synthetic"  # no tokenizer: the line says how to get text out of it
    assert main(["train", "--config", str(config), "--workdir", str(synthetic), "--config.data.source=synthetic",
                 "--config.data.tokenizer=", "--config.train.steps=1"]) == 0
    capsys.readouterr()
    assert main(["generate", "--workdir", str(synthetic), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("has no tokenizer.model (a run on synthetic data); generating or "
                                             "evaluating text needs one: export the run (llama-jax export) and give "
                                             "the model directory a tokenizer.model of its vocabulary (or generate "
                                             "--tokenizer FILE)"), err


def test_converted_hugging_face_directory_generates_what_transformers_generates(sp_model, tmp_path, capsys):
    """What a reader tries first: a Hugging Face LLaMA directory (weights, config.json, its
    tokenizer.model), `llama-jax convert --from hf --to jax`, then greedy `llama-jax generate`:
    the printed text is transformers' greedy generate, decoded, for the same directory and prompt."""
    import shutil

    import torch
    import transformers

    from tests.reference import hf_config_dict, make_hf_model

    tokenizer_dir = sp_model[0]  # the model directory holds its tokenizer.model
    hf = tmp_path / "hf"
    hf_tokenizer = transformers.LlamaTokenizer.from_pretrained(tokenizer_dir, add_bos_token=True)
    hf_tokenizer.save_pretrained(hf)  # tokenizer_config.json and tokenizer.json, as on the Hub
    shutil.copy(tokenizer_dir / "tokenizer.model", hf / "tokenizer.model")
    model = make_hf_model(hf_config_dict("gqa_llama3", vocab_size=512))
    with torch.no_grad():  # sharper logits: a continuation with few near-ties
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(8)
        # Byte-fallback pieces get logit 0, far below the best of the others, so none is chosen:
        # random bytes are rarely valid UTF-8, and SentencePiece and HF's tokenizers replace an
        # invalid sequence by different numbers of U+FFFD.
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
        model.lm_head.weight[[i for i in range(sp.get_piece_size()) if sp.is_byte(i)]] = 0
    model.save_pretrained(hf)

    prompt, steps = "The cat sits on the mat.", 24
    inputs = hf_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0)
    expected = hf_tokenizer.decode(out[0], skip_special_tokens=True)
    assert out.shape[1] - inputs.input_ids.shape[1] > 10 and inputs.input_ids[0, 0] == 1  # BOS, a real continuation

    assert main(["convert", "--from", "hf", "--to", "jax", str(hf), str(tmp_path / "jax")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "jax"), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", str(steps)]) == 0
    printed = capsys.readouterr().out
    assert printed == expected + "\n", (printed, expected)

    # A generation_config.json listing a second end-of-text id (as LLaMA 3 instruct models list
    # <|eot_id|>): the row ends where transformers stops; the id, an ordinary piece here, is text, as
    # transformers' decode has it (only special pieces are dropped; its text was cut off).
    new = out[0, inputs.input_ids.shape[1]:].tolist()
    end = next(t for k, t in enumerate(new) if k >= 3 and t not in new[:k])
    (hf / "generation_config.json").write_text(f'{{"bos_token_id": 1, "eos_token_id": [2, {end}]}}')
    with torch.no_grad():
        stopped = model.generate(**inputs, max_new_tokens=steps, do_sample=False, pad_token_id=0, eos_token_id=[2, end])
    assert stopped[0, -1] == end and stopped.shape[1] < out.shape[1]
    assert main(["convert", "--from", "hf", "--to", "jax", str(hf), str(tmp_path / "jax"), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "jax"), "--prompt", prompt, "--temperature", "0",
                 "--max-new-tokens", str(steps)]) == 0
    assert end not in hf_tokenizer.all_special_ids
    assert capsys.readouterr().out == hf_tokenizer.decode(stopped[0], skip_special_tokens=True) + "\n"


def test_text_the_output_encoding_lacks_is_escaped(sp_model, tmp_path):
    """With an ASCII standard output (PYTHONIOENCODING=ascii) a prompt or continuation of other
    characters is printed escaped, as Python's stderr prints it; the command once failed on it
    ("'ascii' codec can't encode character"), as did `train`'s sample after its last step."""
    path, cfg, params, tok = sp_model
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-m", "llama_jax.cli", "generate", str(path), "--prompt", "Caf\u00e9 \u65e5",
                          "--max-new-tokens", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**env, "PYTHONIOENCODING": "ascii", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("Caf\\xe9 \\u65e5")


# ---- Code Llama infilling ----

INFILL = ["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"]


@pytest.fixture(scope="module")
def code_llama(tmp_path_factory):
    """(tokenizer directory, tokenizer, sentencepiece processor) of a tokenizer with Code Llama's four
    infilling pieces, user-defined pieces as transformers' converter takes them. "☺" is a piece of its
    own too, as in Code Llama's vocabulary, on which Meta's encode_infilling relies."""
    root = tmp_path_factory.mktemp("code_llama")
    corpus = EmbeddedCorpus()
    train_sentencepiece((corpus[i] for i in range(len(corpus))), root / "tok" / "tokenizer.model", 512,
                        user_defined_symbols=INFILL + ["☺"])
    sp = spm.SentencePieceProcessor(model_file=str(root / "tok" / "tokenizer.model"))
    assert sp.encode("☺") == [sp.piece_to_id("▁"), sp.piece_to_id("☺")]  # what Meta drops
    return root / "tok", load_tokenizer(root / "tok"), sp


def _meta_infill_ids(sp, prefix: str, suffix: str) -> list[int]:
    """Meta's codellama infilling_prompt_tokens (prefix-suffix-middle), written out again."""
    pre, suf, mid = (sp.piece_to_id(p) for p in INFILL[:3])
    return [sp.bos_id(), pre] + sp.encode(prefix) + [suf] + sp.encode("☺" + suffix)[2:] + [mid]


def _meta_decode_infilling(sp, ids: list[int]) -> str:
    return sp.decode([sp.piece_to_id("☺")] + ids)[1:]


INFILL_CASES = [("def add(a, b):\n    ", "\n    return c\n"), ("", "    return x\n"), ("x = [1, 2", ""),
                ("", ""), ("s = 'héllo", " wörld ☺ 日本'\n"), ("if a:", "  b()\n"), ("a =", "\n\nb = 2")]


def test_infill_prompt_ids_are_metas(code_llama):
    """The ids are Meta's infilling_prompt_tokens: the suffix without a leading space. transformers
    5's CodeLlamaTokenizer agrees where the prefix is not empty and the suffix starts with a space;
    elsewhere its Metaspace pre-tokenizer, left on for the infilling pair, puts a "▁" piece first
    (before an empty prefix, or a suffix that starts otherwise), which Meta's format has not; and an
    empty suffix it does not format as infilling at all."""
    import transformers

    tok_dir, tok, sp = code_llama
    hf = transformers.CodeLlamaTokenizer.from_pretrained(tok_dir)
    space = sp.piece_to_id("▁")
    for prefix, suffix in INFILL_CASES:
        ids = prompts_lib.infill_ids(tok, prefix + "<FILL_ME>" + suffix)
        assert ids == _meta_infill_ids(sp, prefix, suffix), (prefix, suffix)
        if suffix:
            at_suffix = ids.index(hf.suffix_id) + 1
            theirs = ids[:at_suffix] + [space] * (not suffix.startswith(" ")) + ids[at_suffix:]
            theirs = theirs[:2] + [space] * (prefix == "") + theirs[2:]
            assert hf(prefix + "<FILL_ME>" + suffix)["input_ids"] == theirs, (prefix, suffix)
    assert [hf.prefix_id, hf.suffix_id, hf.middle_id, hf.eot_id] == prompts_lib.infill_pieces(tok)
    suffix = " wörld ☺ 日本'\n"  # decoded as what continues a text: its leading space kept
    suffix_ids = tok.encode_infilling(suffix)
    assert tok.decode_infilling(suffix_ids) == _meta_decode_infilling(sp, suffix_ids) == suffix
    assert tok.decode(suffix_ids) == suffix[1:]


def test_infill_is_refused_without_the_pieces(sp_model, tmp_path):
    (tmp_path / "toy3.model").write_bytes(_tiktoken_file(_toy_ranks()))
    with pytest.raises(ValueError, match=r"^this tokenizer cannot infill: it lacks ▁<PRE>, ▁<SUF>, ▁<MID>, ▁<EOT>; "):
        prompts_lib.infill_ids(sp_model[3], "a<FILL_ME>b")
    with pytest.raises(ValueError, match=r"^a LLaMA 3 \(tiktoken\) tokenizer cannot infill; infilling needs a Code"):
        prompts_lib.infill_ids(load_tokenizer(tmp_path / "toy3.model"), "a<FILL_ME>b")
    for prompt, held in (("ab", "none"), ("a<FILL_ME>b<FILL_ME>", "it 2 times")):
        with pytest.raises(ValueError, match=f"holds <FILL_ME> once, .*; this one holds {held}: "):
            prompts_lib.infill_ids(sp_model[3], prompt)
    path, cfg, params, tok = sp_model
    with pytest.raises(ValueError, match="chat and infill exclude each other"):
        complete(cfg, params, tok, ["a<FILL_ME>b"], chat=True, infill=True)


def test_greedy_infill_equals_transformers(code_llama, tmp_path, capsys):
    """`generate --infill` of a Code Llama converted from Hugging Face: the filling is transformers'
    greedy generate on the same ids, up to ▁<EOT>, decoded as Meta's decode_infilling (its own
    leading space kept); batches, stop strings and the stream keep working."""
    import shutil

    import torch

    from tests.reference import hf_config_dict, make_hf_model

    tok_dir, tok, sp = code_llama
    hf, eot = tmp_path / "hf", sp.piece_to_id("▁<EOT>")
    model = make_hf_model(hf_config_dict("gqa_llama3", vocab_size=512))
    prompts = ["for i in<FILL_ME>:\n    pass\n", "<FILL_ME> = 1"]
    ids = [prompts_lib.infill_ids(tok, p) for p in prompts]

    def hf_greedy(row: list[int], steps: int) -> list[int]:
        out = model.generate(torch.tensor([row]), max_new_tokens=steps, do_sample=False, pad_token_id=0,
                             eos_token_id=[eot, 2])
        return out[0, len(row):].tolist()

    with torch.no_grad():
        for p in model.parameters():  # sharper logits: few near-ties
            if p.ndim > 1:
                p.mul_(8)
        model.lm_head.weight[[i for i in range(512) if sp.is_byte(i)]] = 0  # no stray bytes: U+FFFD
        free = hf_greedy(ids[0], 16)
        k = next(k for k, t in enumerate(free) if k >= 4 and t not in free[:k])
        model.lm_head.weight[eot] = model.lm_head.weight[free[k]] * 1.01  # ▁<EOT> where free[k] was chosen
        fillings = [hf_greedy(row, 16) for row in ids]
    model.save_pretrained(hf)
    shutil.copy(tok_dir / "tokenizer.model", hf / "tokenizer.model")
    assert fillings[0] == free[:k] + [eot]
    expected = [_meta_decode_infilling(sp, [t for t in f if t != eot]) for f in fillings]
    assert expected[0].startswith(" ") and "<EOT>" not in expected[0], expected  # (its leading space is the filling's)

    assert main(["convert", "--from", "hf", "--to", "jax", str(hf), str(tmp_path / "jax")]) == 0
    capsys.readouterr()
    command = ["generate", str(tmp_path / "jax"), "--infill", "--temperature", "0", "--max-new-tokens", "16"]
    assert main(command + ["--prompt", prompts[0]]) == 0  # streamed
    assert capsys.readouterr().out == expected[0] + "\n"
    assert main(command + ["--prompt", prompts[0], "--prompt", prompts[1]]) == 0  # a batch
    assert capsys.readouterr().out == "\n\n-----\n\n".join(expected) + "\n"
    stop = expected[0][2:4]
    assert main(command + ["--prompt", prompts[0], "--stop", stop]) == 0
    assert capsys.readouterr().out == expected[0][:expected[0].index(stop)] + "\n"
    sampled = command[:3] + ["--temperature", "0.9", "--seed", "3", "--prompt", prompts[1]]
    assert main(sampled) == 0
    streamed = capsys.readouterr().out
    assert main(sampled + ["--no-stream"]) == 0
    assert capsys.readouterr().out == streamed != expected[1] + "\n"


def test_help_states_the_sampling_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS (default 64)" in shown and "0 is greedy (default 0.8)" in shown
    assert "with the K-th (default: all)" in shown and "after --top-k (default: all)" in shown
    assert "--seed S sampling seed, 0 <= S < 2**32 (default 0)" in shown
