"""A TFDS dataset built from local .txt/.jsonl files, stored as ArrayRecord, without TensorFlow.

    name = build_text_dataset(["corpus/*.jsonl"], "/data/tfds")    # e.g. "llama_jax_text/1f0c..."
    tfds.data_source(name, data_dir="/data/tfds", split="train")    # random access, no TensorFlow

The builder takes its inputs (files, text_key, validation_fraction) through a `TextConfig`
whose name is a digest of them, so different inputs land in different directories of the same
data_dir and building the same inputs again reuses what is there. Reading needs only the name:
TFDS rebuilds the builder from the files it wrote. The train/validation assignment of each
document depends on a hash of its text (`data.held_out`), so duplicates share a split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from llama_jax.data import expand_files, held_out, read_documents

KEY_ARGUMENT = "build_text_dataset's text_key"  # what names the JSONL field, for the message when a line lacks it


@dataclasses.dataclass(eq=False)
class TextConfig(tfds.core.BuilderConfig):
    """What to build from: `files` (paths, globs expanded), the JSONL `text_key` and the share
    of documents held out as the validation split (0: no validation split)."""

    files: tuple[str, ...] = ()
    text_key: str = "text"
    validation_fraction: float = 0.01


class _LocalDatasetInfo(tfds.core.DatasetInfo):
    def initialize_from_bucket(self) -> None:
        """Nothing to fetch: these datasets exist only where they are built. (TFDS's own method,
        called for every dataset not yet built, makes a temporary directory for metadata from its
        public bucket, and leaves it behind empty when there is none.)"""


class LlamaJaxText(tfds.core.GeneratorBasedBuilder):
    """Documents of local text files as a `text` feature, in `train` and `validation` splits,
    in the order of the files (shuffling disabled: sampling happens when batches are built)."""

    VERSION = tfds.core.Version("1.0.0")
    # Where TFDS looks for a checksums file of downloads; there are none. Overriding it also
    # avoids TFDS's lookup of this module's path, which needs the `importlib_resources` package.
    code_path = None

    def __init__(self, *, config: TextConfig | str | None = None, **kwargs):
        if not isinstance(config, TextConfig):  # asked for by a name that is not in data_dir
            raise ValueError("llama_jax_text datasets are made by build_text_dataset(files, data_dir), "
                             "which returns the name to read them by, llama_jax_text/<digest>, in that data_dir")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Not `dataset_info_from_configs`: it reads metadata files next to this module.
        return _LocalDatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        config = self.builder_config
        documents = read_documents(config.files, config.text_key, KEY_ARGUMENT)
        hashes = np.array([_text_hash(doc) for doc in documents], np.uint64)
        if not len(hashes):
            raise ValueError(f"{list(config.files)} hold no documents; give non-empty .txt/.jsonl files")
        validation = held_out(hashes, config.validation_fraction)
        if validation.all():
            raise ValueError(f"validation_fraction={config.validation_fraction} holds out all "
                             f"{len(hashes)} documents; lower it or add documents (documents are held out by a "
                             f"hash of their text, so copies of one text are held out together)")
        splits = {"train": self._generate_examples(validation, False)}
        if validation.any():
            splits["validation"] = self._generate_examples(validation, True)
        return splits

    def _generate_examples(self, validation: np.ndarray, want: bool):
        config = self.builder_config
        for i, doc in enumerate(read_documents(config.files, config.text_key, KEY_ARGUMENT)):
            if validation[i] == want:
                yield i, {"text": doc}


def _text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def build_text_dataset(files: Sequence[str] | str, data_dir: str, text_key: str = "text",
                       validation_fraction: float = 0.01) -> str:
    """Build (once) the dataset of these files in `data_dir`; returns the name to read it by
    with `tfds.data_source(name, data_dir=data_dir, split=...)` or data.source="tfds"."""
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction} is out of range; valid: 0 <= it < 1")
    paths = tuple(os.path.abspath(p) for p in expand_files(files))
    # The name covers what the contents depend on; a changed file gets a new name (size, mtime).
    digest = hashlib.sha256(repr((text_key, validation_fraction, [
        (p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths])).encode()).hexdigest()[:16]
    config = TextConfig(name=digest, files=paths, text_key=text_key, validation_fraction=validation_fraction)
    builder = LlamaJaxText(config=config, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return f"{builder.name}/{digest}"
