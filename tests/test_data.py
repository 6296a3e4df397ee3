"""Document sources, packed batches, held-out split, TFDS round trip, prefetch and the unigram baseline."""

import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from llama_jax import data
from llama_jax.cli import main
from llama_jax.data import EmbeddedCorpus, Prefetcher, TextFiles, make_source, split_indices
from llama_jax.evaluate import held_out_batches
from llama_jax.text_dataset import build_text_dataset
from llama_jax.tokenizer import SentencePieceTokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus():
    return EmbeddedCorpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    lines = [line for i in range(len(corpus)) for line in corpus[i].splitlines() if line.strip()]
    model = io.BytesIO()
    # 512, not less: byte fallback alone takes 256 ids, and the corpus has ~90 distinct characters.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=512,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return SentencePieceTokenizer(model.getvalue())


def test_embedded_corpus_is_real_english_in_a_fixed_order(corpus):
    from pydoc_data.topics import topics

    docs = [corpus[i] for i in range(len(corpus))]
    assert len(docs) == len(topics) > 50
    assert docs == [topics[k] for k in sorted(topics)] == [EmbeddedCorpus()[i] for i in range(len(corpus))]
    text = " ".join(docs)
    assert len(text) > 100_000 and text.count(" the ") > 2000


def test_pack_row_masks_padding():
    row = data.pack_row([np.array([5, 6, 7]), np.array([8, 9])], seq_len=5)
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 2, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["targets"][:3], [6, 7, 9])
    np.testing.assert_array_equal(row["loss_mask"], [1, 1, 1, 0, 0])
    # a document of one token has no pair and takes no slot; those after it are packed (they were dropped)
    row = data.pack_row([np.array([5, 6]), np.array([7]), np.array([8, 9, 4])], seq_len=5)
    np.testing.assert_array_equal(row["tokens"], [5, 8, 9, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 3, 3, 0, 0])


def write_corpus(tmp_path):
    records = [{"text": f"Document number {i} is about {word}.", "id": i}
               for i, word in enumerate(["apples", "boats", "clouds", "dunes", "eels", "ferns", "gulls", "hills"])]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records[:5]) + "\n\n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records[5:]) + "\n")
    (tmp_path / "c.txt").write_text("A whole file is one document.\nEven with two lines.\n")
    return [r["text"] for r in records] + ["A whole file is one document.\nEven with two lines.\n"]


def test_text_files_and_tfds_round_trip(tmp_path, tokenizer, monkeypatch):
    docs = write_corpus(tmp_path)
    assert list(TextFiles([str(tmp_path / "*.jsonl"), str(tmp_path / "c.txt")])) == docs
    data_dir = str(tmp_path / "tfds")
    files = [str(tmp_path / "*.jsonl"), str(tmp_path / "*.txt")]
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    name = build_text_dataset(files, data_dir, validation_fraction=0.25)
    assert build_text_dataset(files, data_dir, validation_fraction=0.25) == name  # built once, then reused
    assert list((tmp_path / "tmp").iterdir()) == []  # nothing left in the temporary directory
    with pytest.raises(ValueError, match=r"a.jsonl:1: no string field 'body'; set build_text_dataset's text_key to "
                                         r"the field holding the text$"):  # (from Python: not data.text_key)
        build_text_dataset(files, data_dir, text_key="body")
    splits = {s: [r["text"].decode() for r in tfds.data_source(name, data_dir=data_dir, split=s)]
              for s in ("train", "validation")}
    assert len(splits["validation"]) == math.ceil(0.25 * len(docs))
    assert sorted(splits["train"] + splits["validation"]) == sorted(docs)
    assert splits["train"] == [d for d in docs if d in splits["train"]]  # file order kept

    config = ConfigDict(dict(source="tfds", tfds_name=name, data_dir=data_dir, tfds_eval_split="validation"))
    train, held = make_source(config)
    assert list(train) == splits["train"] and list(held) == splits["validation"]
    for key, split in (("tfds_split", "test"), ("tfds_eval_split", "train[:200%]")):  # TFDS's own errors: several lines
        with pytest.raises(ValueError) as error:
            make_source(ConfigDict({**config.to_dict(), key: split}))
        assert re.fullmatch(rf"data.tfds_name='{name}' with data.{key}='{re.escape(split)}': [^\n]*split[^\n]*",
                            str(error.value)), str(error.value)
    # held-out records the training split also reads would be trained on
    for split, eval_split, shared in (("train", "train", 6), ("train[:60%]", "train[50%:]", 1),
                                      ("train+validation", "validation", 3)):
        with pytest.raises(ValueError, match=rf"^data.tfds_eval_split='{re.escape(eval_split)}' reads {shared} of the "
                                             rf"records data.tfds_split='{re.escape(split)}' trains on; give splits "
                                             rf"with no record in common \(e.g. "):
            make_source(ConfigDict({**config.to_dict(), "tfds_split": split, "tfds_eval_split": eval_split}))
    train, held = make_source(ConfigDict({**config.to_dict(), "tfds_split": "train[:50%]", "tfds_eval_split":
                                          "train[-50%:]+validation"}))
    assert list(train) + list(held) == splits["train"] + splits["validation"]
    assert list(make_source(ConfigDict(dict(source="jsonl", files=[str(tmp_path / "*.jsonl")])))[0]) == docs[:8]
    assert make_source(ConfigDict(dict(source="synthetic"))) == (None, None)
    assert "tensorflow" not in sys.modules  # built and read without TensorFlow


class RecordsWithANumber(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset whose records hold a text feature beside a number, a vector, a nested feature, a
    sequence of texts and bytes that are not UTF-8."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # no checksums file to look up

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "body": tfds.features.Text(), "year": np.int64,
            "vector": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "nested": tfds.features.FeaturesDict({"inner": tfds.features.Text()}),
            "texts": tfds.features.Sequence(tfds.features.Text()),
            "raw": tfds.features.Tensor(shape=(), dtype=np.object_)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield i, {"body": f"document {i}", "year": 2000 + i, "vector": np.zeros(2, np.float32),
                      "nested": {"inner": "x"}, "texts": ["a", "b"], "raw": b"caf\xe9"}


def test_a_tfds_feature_that_is_not_text_is_named(tmp_path):
    RecordsWithANumber(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = dict(source="tfds", tfds_name="records_with_a_number", data_dir=str(tmp_path))
    assert list(make_source(ConfigDict({**config, "text_key": "body"}))[0]) == [f"document {i}" for i in range(3)]
    for key, kind in (("year", "Tensor of int64 with shape ()"), ("vector", "Tensor of float32 with shape (2,)"),
                      ("nested", "FeaturesDict"), ("texts", "Sequence of object with shape (None,)")):
        with pytest.raises(ValueError) as error:
            make_source(ConfigDict({**config, "text_key": key}))
        assert str(error.value) == (f"TFDS dataset 'records_with_a_number': feature {key!r} is not text ({kind}); "
                                    f"set data.text_key to a text feature (valid: ['body', 'raw'])")
    with pytest.raises(ValueError) as error:  # (a UnicodeDecodeError naming neither the dataset nor the record)
        make_source(ConfigDict({**config, "text_key": "raw"}))[0][1]
    assert str(error.value) == ("data.tfds_name='records_with_a_number' with data.tfds_split='train': record 1, "
                                "feature 'raw': not UTF-8 text (byte 0xe9 at offset 3: unexpected end of data); "
                                "set data.text_key to a feature of UTF-8 text")
    # A reversed slice: TFDS read record 2 for these (of 3 records; of 4, train[3:1] failed in len(), a negative
    # count); a slice that selects nothing beside one that does was no error.
    for split in ("train[2:1]", "train[-1:1]", "train[:1]+train[1:1]"):
        with pytest.raises(ValueError) as error:
            make_source(ConfigDict({**config, "text_key": "body", "tfds_eval_split": split}))
        assert str(error.value) == (f"data.tfds_name='records_with_a_number' with data.tfds_eval_split={split!r}: a "
                                    f"slice whose start is not before its end selects no records; give slices that "
                                    f"do, e.g. 'train[:90%]'")
    assert list(make_source(ConfigDict({**config, "text_key": "body", "tfds_split": "train[1:]+train[:-2]"}))[0]) \
        == ["document 1", "document 2", "document 0"]


def test_a_damaged_tfds_dataset_is_named(tmp_path):
    """ArrayRecord files cut short, emptied or missing, and a dataset_info.json of a newer TFDS
    (a field this one does not know) or damaged, are one line naming the dataset (they were a
    RuntimeError or protobuf's ParseError, a traceback)."""
    RecordsWithANumber(data_dir=str(tmp_path / "built"), file_format="array_record").download_and_prepare()
    config = dict(source="tfds", tfds_name="records_with_a_number", text_key="body")
    where = "data.tfds_name='records_with_a_number' with data.tfds_split='train'"

    def damaged(case: str, damage) -> str:
        data_dir = tmp_path / case
        shutil.copytree(tmp_path / "built", data_dir)
        version = data_dir / "records_with_a_number" / "1.0.0"
        damage(version / "records_with_a_number-train.array_record-00000-of-00001", version / "dataset_info.json")
        with pytest.raises(ValueError) as error:
            train, _ = make_source(ConfigDict({**config, "data_dir": str(data_dir)}))
            train[0]
        return str(error.value)

    def newer_info(records, info):
        info.write_text(json.dumps({**json.loads(info.read_text()), "futureField": 1}))

    def not_json(records, info):
        info.write_text("{not json")

    for case, damage in (("cut-short", lambda records, info: os.truncate(records, records.stat().st_size // 2)),
                         ("empty", lambda records, info: os.truncate(records, 0)),
                         ("missing", lambda records, info: records.unlink())):
        message = damaged(case, damage)
        assert re.fullmatch(rf"{re.escape(where)}: record 0 cannot be read \([^\n]+\); the dataset's files in "
                            rf"data_dir='\S+/{case}' are damaged or incomplete: build it again", message), message
    for case, damage, reason in (("newer-info", newer_info, 'has no field named "futureField"'),
                                 ("info-not-json", not_json, "Failed to load JSON")):
        message = damaged(case, damage)
        assert re.fullmatch(rf"{re.escape(where)}: its dataset_info.json in data_dir='\S+/{case}' cannot be read "
                            rf"\([^\n]*{reason}[^\n]*\); it was written by another TFDS release than this one "
                            rf"\({re.escape(tfds.__version__)}\) or is damaged: build the dataset again with this one",
                            message), message


def test_a_tfds_data_dir_or_version_that_is_not_there_is_named(tmp_path):
    """A missing data_dir, one that is a file, and a version not built there all said the dataset was
    not found, as if its name were wrong."""
    RecordsWithANumber(data_dir=str(tmp_path / "built"), file_format="array_record").download_and_prepare()
    # as a dataset whose builder this process does not know is found (one built by build_text_dataset, say)
    (tmp_path / "built" / "records_with_a_number").rename(tmp_path / "built" / "elsewhere_built")
    (tmp_path / "a-file").write_text("")
    base = dict(source="tfds", text_key="body")
    for data_dir, name, message in (
            (tmp_path / "nowhere", "elsewhere_built", "does not exist"),
            (tmp_path / "a-file", "elsewhere_built", "is not a directory"),
            (tmp_path / "built", "elsewhere_built:2.0.0",
             "TFDS dataset 'elsewhere_built:2.0.0': version 2.0.0 is not built in data_dir='{}'; built there: 1.0.0")):
        expected = message.format(data_dir) if message.startswith("TFDS") else (
            f"data.data_dir='{data_dir}' {message}; give the directory the TFDS dataset {name!r} was built in")
        with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
            make_source(ConfigDict({**base, "tfds_name": name, "data_dir": str(data_dir)}))


def test_each_file_is_read_once_and_a_byte_order_mark_is_not_text(tmp_path):
    """Patterns that match the same file read it once (read twice, the copy of a held-out document
    was trained on); a leading UTF-8 byte-order mark is dropped from .txt and .jsonl files alike."""
    docs = write_corpus(tmp_path)
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    patterns = [str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl"), str(tmp_path / "c.txt"), str(tmp_path / "*")]
    assert list(TextFiles(patterns)) == docs
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf\n{"text": "first"}\r\n{"text": "second"}\n')  # then blank
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")
    assert list(TextFiles([str(tmp_path / "bom.*")])) == ["first", "second", "one\ntwo\nthree\n"]


def test_a_double_star_pattern_matches_files_at_any_depth(tmp_path):
    """(`docs/**/*.txt` matched only docs/*/*.txt, as `*` does: the files in docs/ and those
    deeper were silently left out of the corpus.)"""
    (tmp_path / "docs" / "a" / "b").mkdir(parents=True)
    for path in ("docs/top.txt", "docs/a/one.txt", "docs/a/b/two.txt"):
        (tmp_path / path).write_text(path)
    assert sorted(TextFiles([str(tmp_path / "docs" / "**" / "*.txt")])) == [
        "docs/a/b/two.txt", "docs/a/one.txt", "docs/top.txt"]


@pytest.mark.parametrize("case, message", [
    ("unknown source", r"data.source='parquet' is not supported; valid: embedded, stdlib, text"),
    ("no match", r"no file matches '.*missing\*.txt'"),
    ("all empty", r"holds no non-empty document"),
    ("missing key", r"a.jsonl:2: no string field 'text'; set data.text_key to the field holding the text"),
    ("not json", r"bad.jsonl:1: not valid JSON"),
    ("not an object", r"list.jsonl:1: a JSON list, not an object; each line must be a JSON object"),
    ("nested too deeply", r"deep.jsonl:2: JSON nested too deeply to read \(thousands of levels\)"),  # a traceback
    ("number as text", r"digits.jsonl:2: no string field 'text'"),  # digits beyond int's limit: Python's own advice
    ("dangling link", r"broken.txt: a symbolic link to /nonexistent/file.txt, which does not exist"),
    ("pipe", r"pipe.txt: not a regular file \(a pipe, socket or device\); give readable files"),
    ("txt not utf-8", r"latin1.txt: not UTF-8 text \(byte 0xe9 at offset 3: invalid continuation byte\); "
                      r"the file must be UTF-8$"),
    ("jsonl not utf-8", r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9 at offset 13"),
    ("file type", r"\.csv: unsupported file type; valid: .txt"),
    ("eval_fraction", r"eval_fraction=1.0 is out of range"),
    # "lower it" was the advice, but every value above 0 holds out one of one document
    ("eval_fraction of one document", r"data.eval_fraction=0.0001 holds out the corpus's only document \(any value "
                                      r"above 0 holds out at least one\); set data.eval_fraction=0 or add documents$"),
    ("eval_fraction of all", r"data.eval_fraction=0.7 holds out all 3 documents \(it holds out ceil\(eval_fraction "
                             r"x 3\)\); valid: 0 <= eval_fraction <= 2/3, or add documents$"),
])
def test_bad_input_is_named(case, message, tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text key"}\n')
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    (tmp_path / "deep.jsonl").write_text('{"text": "ok"}\n{"text": "hi", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (tmp_path / "digits.jsonl").write_text('{"text": "read", "id": ' + "9" * 5000 + '}\n{"text": ' + "9" * 5000 + "}\n")
    (tmp_path / "broken.txt").symlink_to("/nonexistent/file.txt")
    (tmp_path / "empty.txt").write_text("")
    os.mkfifo(tmp_path / "pipe.txt")  # reading it would wait for a writer forever
    (tmp_path / "x.csv").write_text("a,b\n")
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "fine"}\n{"text": "café"}\n'.encode("latin-1"))
    make = {
        "unknown source": lambda: make_source(ConfigDict(dict(source="parquet"))),
        "no match": lambda: TextFiles([str(tmp_path / "missing*.txt")]),
        "all empty": lambda: TextFiles(str(tmp_path / "empty.txt")),
        "missing key": lambda: TextFiles(str(tmp_path / "a.jsonl")),
        "not json": lambda: TextFiles(str(tmp_path / "bad.jsonl")),
        "not an object": lambda: TextFiles(str(tmp_path / "list.jsonl")),
        "nested too deeply": lambda: TextFiles(str(tmp_path / "deep.jsonl")),
        "number as text": lambda: TextFiles(str(tmp_path / "digits.jsonl")),
        "dangling link": lambda: TextFiles(str(tmp_path / "broken.txt")),
        "pipe": lambda: TextFiles(str(tmp_path / "pipe.txt")),
        "txt not utf-8": lambda: TextFiles(str(tmp_path / "latin1.txt")),
        "jsonl not utf-8": lambda: TextFiles(str(tmp_path / "latin1.jsonl")),
        "file type": lambda: TextFiles(str(tmp_path / "x.csv")),
        "eval_fraction": lambda: split_indices(10, 1.0),
        "eval_fraction of one document": lambda: split_indices(1, 0.0001),
        "eval_fraction of all": lambda: split_indices(3, 0.7),
    }[case]
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_train_command_names_a_data_file_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "notes.txt").write_bytes(b"fine\n\xff\xfe")
    args = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(tmp_path / "w"),
            "--config.data.source=text", f"--config.data.files=['{tmp_path / 'notes.txt'}']",
            "--config.data.tokenizer=train"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"llama-jax train: error: {tmp_path / 'notes.txt'}: not UTF-8 text (byte 0xff at offset 5: "
                   "invalid start byte); the file must be UTF-8\n")


def test_prefetcher_matches_direct_calls_and_closes():
    before = set(threading.enumerate())
    calls = []

    def batch(step):
        return {"tokens": np.arange(6).reshape(2, 3) * step}

    def fn(step):
        calls.append(step)
        return batch(step)

    with Prefetcher(fn, start=3) as prefetcher:
        for step in range(3, 8):
            got, want = prefetcher.next(step), batch(step)
            assert all(np.array_equal(got[k], want[k]) for k in want)
        with pytest.raises(ValueError, match="next prefetched step is 8"):
            prefetcher.next(9)
    assert set(threading.enumerate()) == before
    assert calls == list(range(3, 3 + len(calls))) and len(calls) <= 5 + 2 + 1  # consumed, queued, in hand
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.next(8)

    def failing(step):
        if step == 1:
            raise KeyError("broken step")
        return {}

    with Prefetcher(failing, start=0) as prefetcher:
        assert prefetcher.next(0) == {}
        with pytest.raises(KeyError, match="broken step"):
            prefetcher.next(1)
        with pytest.raises(RuntimeError, match="closed"):
            prefetcher.next(2)


def test_eval_fraction_holds_out_its_share_of_documents_as_written():
    """ceil(eval_fraction x n) documents, the product exact: 0.07 x 100 is 7 (as floats it is 7.000000000000001)."""
    for n, fraction, count in ((100, 0.07, 7), (300, 0.07, 21), (101, 0.07, 8), (10, 0.9, 9), (3, 2 / 3, 2)):
        train, held = split_indices(n, fraction)
        assert len(held) == count and sorted([*train, *held]) == list(range(n))


def test_unigram_perplexity_by_hand():
    # Add-one smoothing over 3 ids with counts 3, 1, 0: p = 4/7, 2/7, 1/7. Targets 0, 1, 2 count,
    # the last is masked: perplexity = (7/4 * 7/2 * 7/1) ** (1/3) = 7/2.
    batch = {"targets": np.array([[0, 1], [2, 0]]), "loss_mask": np.array([[1.0, 1.0], [1.0, 0.0]])}
    assert data.unigram_perplexity(np.array([3, 1, 0]), [batch]) == pytest.approx(3.5)
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    assert data.unigram_perplexity(np.array([3, 1, 0]), halves) == pytest.approx(3.5)


def test_unigram_baseline_on_the_embedded_corpus(corpus, tokenizer, tmp_path):
    from llama_jax.experiment import base_config
    from llama_jax.prepare import open_prepared, prepare
    from llama_jax.run_data import split_documents, target_counts

    (tmp_path / "tokenizer.model").write_bytes(tokenizer.sp.serialized_model_proto())
    config = base_config("debug").data
    config.update(source="embedded", tokenizer=str(tmp_path / "tokenizer.model"), eval_fraction=0.2)
    prepare(config, tmp_path / "data", workers=1, progress=False)
    splits = open_prepared(tmp_path / "data").splits
    counts = target_counts(splits["train"], tokenizer)
    train_docs = [corpus[i] for i in split_indices(len(corpus), 0.2)[0]]
    assert counts.sum() == sum(len(tokenizer.encode(d, bos=True, eos=True)) - 1 for d in train_docs)
    assert counts[tokenizer.bos_id] == 0 and counts[tokenizer.eos_id] == len(train_docs)
    held_out = (tokens for tokens, _ in split_documents(splits["held_out"]))
    perplexity = data.unigram_perplexity(counts, list(held_out_batches(held_out, 64, 8)))
    assert 30 < perplexity < 0.5 * tokenizer.vocab_size  # far better than uniform, far from a real model
