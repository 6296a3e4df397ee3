"""save_model / load_model: a self-describing Orbax model directory."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LLaMA, LLaMAConfig, init_params, load_model, save_model
from llama_jax.cli import main
from llama_jax.model import unstack_layers


@pytest.fixture(scope="module")
def model():
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    cfg = LLaMAConfig.from_preset("debug", rope_scaling=scaling)
    return cfg, init_params(cfg, 0)


def sentencepiece_model(path, vocab_size: int):
    from llama_jax.data import EmbeddedCorpus
    from llama_jax.tokenizer import train_sentencepiece

    corpus = EmbeddedCorpus()
    return train_sentencepiece((corpus[i] for i in range(len(corpus))), path, vocab_size)


def test_save_load_round_trip(tmp_path, model):
    cfg, params = model
    tokenizer = sentencepiece_model(tmp_path / "tok" / "tokenizer.model", 400)
    save_model(tmp_path / "m", cfg, params, tokenizer=tmp_path / "tok")
    assert (tmp_path / "m" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    cfg2, params2 = load_model(tmp_path / "m")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    tokens = np.arange(12, dtype=np.int32)[None]
    np.testing.assert_array_equal(LLaMA(cfg2).apply({"params": params2}, tokens),
                                  LLaMA(cfg).apply({"params": params}, tokens))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_unscanned_params_saved_in_scanned_layout(tmp_path, model):
    cfg, params = model
    unscanned_cfg = cfg.replace(scan_layers=False)
    save_model(tmp_path / "m", unscanned_cfg, unstack_layers(params, cfg.n_layers))
    cfg2, params2 = load_model(tmp_path / "m")
    assert not cfg2.scan_layers and "layers_0" in params2
    _, scanned = load_model(tmp_path / "m", scan_layers=True)
    jax.tree.map(np.testing.assert_array_equal, scanned, params)


def test_load_onto_a_mesh(tmp_path, model):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    mesh = Mesh(np.array(jax.devices()[:4]), ("fsdp",))
    shardings = jax.tree.map(
        lambda a: NamedSharding(mesh, PartitionSpec("fsdp") if a.shape[0] % 4 == 0 else PartitionSpec()), params)
    _, restored = load_model(tmp_path / "m", shardings=shardings)
    emb = restored["embed"]["embedding"]
    assert emb.sharding == shardings["embed"]["embedding"] and len(emb.addressable_shards) == 4
    np.testing.assert_array_equal(emb, params["embed"]["embedding"])
    one = jax.sharding.SingleDeviceSharding(jax.devices()[1])  # one sharding for every parameter
    _, on_one = load_model(tmp_path / "m", shardings=one)
    assert all(a.sharding == one for a in jax.tree.leaves(on_one))
    with pytest.raises(ValueError, match=r"^shardings must be one jax.sharding.Sharding, or a tree of them shaped as "
                                         r"the parameters"):  # was JAX's multi-line pytree structure error
        load_model(tmp_path / "m", shardings={"embed": one})


def test_existing_destination_is_refused_then_overwritten(tmp_path, model):
    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(tmp_path / "m", cfg.replace(dtype="bfloat16"), params)
    assert load_model(tmp_path / "m")[0] == cfg
    save_model(tmp_path / "m", cfg.replace(dtype="bfloat16"), params, overwrite=True)
    assert load_model(tmp_path / "m")[0].dtype == "bfloat16"


def test_a_model_is_saved_in_the_dtype_its_config_names(tmp_path, model):
    """load_model restores parameters in the config's param_dtype: float32 arrays saved under a
    bfloat16 config came back narrowed without a word, and bfloat16 ones under a float32 config
    were recorded as float32. Both are refused, nothing written; saved in one dtype, they load as saved."""
    cfg, params = model
    halves = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    mixed = {**params, "embed": halves["embed"]}
    for config, tree, found in ((cfg.replace(param_dtype="bfloat16"), params, "float32"), (cfg, halves, "bfloat16"),
                                (cfg, mixed, "bfloat16 and float32")):
        with pytest.raises(ValueError, match=rf"^the parameters are {found} but config.param_dtype is "
                                             rf"'{config.param_dtype}'; save them in one dtype"):
            save_model(tmp_path / "m", config, tree)
        assert not (tmp_path / "m").exists()
    save_model(tmp_path / "m", cfg.replace(param_dtype="bfloat16"), halves)
    config, restored = load_model(tmp_path / "m")
    assert config.param_dtype == "bfloat16" and all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(restored))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(halves)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("fault", ["the rename into place fails", "a signal right after the old one moved aside"])
def test_an_overwrite_stopped_between_its_renames_keeps_the_previous_output(tmp_path, model, monkeypatch, fault):
    """The previous model directory is moved aside only for the instant before the new one takes
    its place; whatever stops the swap there puts it back, and no hidden copy is left."""
    import os

    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    real_replace = os.replace

    def replace(src, dst):
        if fault == "the rename into place fails" and str(src).startswith(str(tmp_path / ".m.tmp-")):
            raise OSError(5, "Input/output error")
        real_replace(src, dst)
        if fault.startswith("a signal") and src == tmp_path / "m":
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError if fault.startswith("the rename") else KeyboardInterrupt):
        save_model(tmp_path / "m", cfg.replace(dtype="bfloat16"), params, overwrite=True)
    monkeypatch.undo()
    assert load_model(tmp_path / "m")[0] == cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_an_overwrite_whose_previous_output_cannot_be_removed_is_done(tmp_path, model, monkeypatch, capsys):
    """A previous output that cannot be removed once the new one is in place (write-protected, by
    another user) failed the command after the swap, the old copy hidden beside it; the overwrite is
    done, and the line says where the previous one is kept."""
    import shutil

    from llama_jax import safe_io

    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".m.old-"):
            raise PermissionError(13, "Permission denied", str(Path(path) / "_CHECKPOINT_METADATA"))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(safe_io.shutil, "rmtree", rmtree)
    save_model(tmp_path / "m", cfg.replace(dtype="bfloat16"), params, overwrite=True)
    monkeypatch.undo()
    assert load_model(tmp_path / "m")[0].dtype == "bfloat16"
    [kept] = [p for p in tmp_path.iterdir() if p.name != "m"]
    assert load_model(kept)[0] == cfg
    assert capsys.readouterr().err == (f"llama-jax: {tmp_path / 'm'} replaced, but the previous one could not be "
                                       f"removed (Permission denied); it is kept at {kept}: remove it by hand\n")


def test_a_model_config_missing_a_field_is_refused_not_defaulted(tmp_path, model):
    """A model_config.json without rope_theta loaded at the default 10000 (a LLaMA-3 model's is
    500000): every field a model directory has always recorded is required."""
    cfg, params = model
    save_model(tmp_path / "m", cfg.replace(rope_theta=500000.0), params)
    fields = json.loads((tmp_path / "m" / "model_config.json").read_text())
    del fields["rope_theta"]
    (tmp_path / "m" / "model_config.json").write_text(json.dumps(fields))
    with pytest.raises(ValueError, match=r"m/model_config.json does not record rope_theta; every model directory's "
                                         r"config records all of vocab_size, .* \(none is taken from a default\)"):
        load_model(tmp_path / "m")


def test_loading_as_float16_refuses_values_beyond_its_range(tmp_path, model):
    """load_model(param_dtype="float16") cast a weight of 1e5 to inf without a word."""
    cfg, params = model
    large = {**params, "final_norm": {"scale": np.full_like(np.asarray(params["final_norm"]["scale"]), 1e5)}}
    save_model(tmp_path / "m", cfg, large)
    with pytest.raises(ValueError, match=r"m: parameter final_norm.scale holds values beyond float16's range \(at most "
                                         r"65504\) or not finite; load it as float32 or bfloat16$"):
        load_model(tmp_path / "m", param_dtype="float16")
    assert load_model(tmp_path / "m", param_dtype="bfloat16")[1]["final_norm"]["scale"].dtype == jnp.bfloat16
    save_model(tmp_path / "usual", cfg, params)  # values within its range load as float16
    assert load_model(tmp_path / "usual", param_dtype="float16")[1]["final_norm"]["scale"].dtype == jnp.float16


def test_only_a_folder_spelled_as_a_step_differently_is_refused(tmp_path):
    """A folder 08 (a copy made by hand) would be read as step 8 at checkpoints/8; a file of that
    name, or a folder of other digits (²), is no step to Orbax and is left alone."""
    from llama_jax.checkpoint import RunCheckpoints

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "07").write_text("notes\n")
    (checkpoints / "\u00b2").mkdir()
    assert RunCheckpoints(checkpoints, 2, read_only=True).all_steps() == []
    (checkpoints / "08").mkdir()
    with pytest.raises(ValueError, match=r"checkpoints/08 is no checkpoint of this run \(a step's folder is named by "
                                         r"its number alone, as 8\) but would be read as step 8"):
        RunCheckpoints(checkpoints, 2, read_only=True)


def test_a_reader_of_a_runs_checkpoints_says_nothing(tmp_path, caplog):
    """Reading a run's checkpoints (a resume's checks, eval, export) through the Python API printed
    Orbax's warnings that each saving option is turned off for a read-only manager, three per reader."""
    from llama_jax.checkpoint import RunCheckpoints

    with caplog.at_level(logging.INFO):
        RunCheckpoints(tmp_path / "checkpoints", 2, max_to_keep=3, keep_every=10, read_only=True).close()
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_mount_table_says_which_checkpoints_lie_on_an_object_store(tmp_path, monkeypatch):
    """A path is on an object store's FUSE mount (gcsfuse, s3fs, rclone) when the innermost mount
    point above it, as /proc/mounts lists them, is one: not a disk mounted inside the bucket's
    mount, nor a name that only begins as the mount point does; a space is written \040 there, and
    of one point mounted twice the later counts. A link is taken where it leads."""
    from llama_jax import checkpoint, checkpoint_steps

    table = tmp_path / "mounts"
    table.write_text("/dev/root / ext4 rw,relatime 0 0\n"
                     "bucket /mnt/gcs fuse.gcsfuse rw,nosuid,nodev,relatime,user_id=0,group_id=0 0 0\n"
                     "/dev/sdb /mnt/gcs/scratch ext4 rw 0 0\n"
                     "other /mnt/my\\040bucket fuse.gcsfuse rw 0 0\n"
                     "tmpfs /mnt/over tmpfs rw 0 0\n"
                     "bucket2 /mnt/over fuse.gcsfuse rw 0 0\n"
                     "remote: /mnt/s3 fuse.rclone rw 0 0\n"
                     "host: /mnt/ssh fuse.sshfs rw 0 0\n")
    monkeypatch.setattr(checkpoint_steps, "MOUNTS_FILE", table)
    on = checkpoint.on_object_store_mount
    assert all(on(p) for p in ("/mnt/gcs", "/mnt/gcs/runs/llama2-7b/checkpoints", "/mnt/my bucket/run",
                               "/mnt/over/run", "/mnt/s3/run"))
    assert not any(on(p) for p in ("/", "/home/run", "/mnt/gcsx/run", "/mnt/gcs/scratch/run", "/mnt/ssh/run",
                                   "/mnt/my"))
    (tmp_path / "link").symlink_to("/mnt/gcs/runs")
    assert on(tmp_path / "link" / "run") and not on(tmp_path / "run")
    assert checkpoint.atomicity_options("/mnt/gcs/run").mode == "commit_file"
    assert checkpoint.atomicity_options("/home/run") is None  # Orbax's default: the rename
    monkeypatch.setattr(checkpoint_steps, "MOUNTS_FILE", tmp_path / "none")  # no mount table
    assert not on("/mnt/gcs/run")


def test_on_an_object_store_mount_a_step_without_its_marker_is_no_checkpoint(tmp_path, monkeypatch):
    """On a gcsfuse mount renaming a directory copies it object by object, so a step committed by
    rename could be left under its final name half copied, and was then listed and resumed as
    committed. There a step is written in place and committed by its marker, written last: a step
    whose save stopped before the marker (its directory in place, part of its files written) is
    neither listed, nor latest, nor in place, and the next run removes it and saves that step
    again (folders of your own left alone); a step committed by rename before (a run saved before
    this) reads on, bit for bit."""
    import shutil

    from llama_jax import checkpoint_steps
    from llama_jax.checkpoint import COMMIT_MARKER, RunCheckpoints
    from llama_jax.run import committed_steps

    def state(step):
        return {"w": jnp.arange(4096, dtype=jnp.float32) * step, "step": jnp.int32(step)}

    def restored(checkpoints, step):
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state(step))
        return checkpoints.restore_state(step, target)

    def same(a, b) -> bool:
        return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((np.asarray(x) == np.asarray(y)).all()), a, b)))

    def opened(**kwargs):
        return RunCheckpoints(tmp_path / "checkpoints", every=1, async_save=False, **kwargs)

    table = tmp_path / "mounts"
    table.write_text("/dev/root / ext4 rw 0 0\n")
    monkeypatch.setattr(checkpoint_steps, "MOUNTS_FILE", table)
    checkpoints = opened()
    checkpoints.save(1, state(1), {"step": 1})  # committed by rename, as on a local disk
    checkpoints.close()
    table.write_text(f"/dev/root / ext4 rw 0 0\nbucket {tmp_path} fuse.gcsfuse rw 0 0\n")
    checkpoints = opened()
    checkpoints.save(2, state(2), {"step": 2})
    checkpoints.close()
    step_2 = tmp_path / "checkpoints" / "2"
    assert (step_2 / COMMIT_MARKER).is_file() and committed_steps(tmp_path) == [1, 2]

    (step_2 / COMMIT_MARKER).unlink()  # the save of step 2 stopped before its marker, with part of its files
    shutil.rmtree(step_2 / "state" / "ocdbt.process_0")
    assert committed_steps(tmp_path) == [1]
    reader = opened(read_only=True)
    assert reader.all_steps() == [1] and reader.latest_step() == 1
    assert reader.in_place(1) and not reader.in_place(2)
    assert same(restored(reader, 1), state(1))
    reader.close()
    assert step_2.is_dir()  # (a reader removes nothing)

    (tmp_path / "checkpoints" / "notes").mkdir()  # a folder of your own, which Orbax's clean-up there removes
    checkpoints = opened()  # a run resuming from step 1: the unfinished step 2 is removed, then saved again
    assert not step_2.exists() and (tmp_path / "checkpoints" / "notes").is_dir()
    checkpoints.save(2, state(2), {"step": 2})
    assert committed_steps(tmp_path) == [1, 2] and checkpoints.in_place(2)
    assert same(restored(checkpoints, 2), state(2))
    checkpoints.close()


@pytest.mark.parametrize("by_marker", [False, True])
def test_committed_steps_are_the_ones_orbax_lists(tmp_path, monkeypatch, by_marker):
    """`checkpoint_steps.committed_steps`, which reads no JAX (export checks its step before it
    imports JAX), lists what the run's Orbax CheckpointManager lists, committed by rename or, on an
    object store's mount, by marker: a step's folder (or a link to one), not a file, a link to
    nothing, a temporary folder, a folder of your own or one named `backup_6`."""
    import orbax.checkpoint as ocp

    from llama_jax import checkpoint_steps
    from llama_jax.checkpoint import RunCheckpoints
    from llama_jax.checkpoint_steps import COMMIT_MARKER, committed_steps

    table = tmp_path / "mounts"
    table.write_text("/dev/root / ext4 rw 0 0\n" + (f"bucket {tmp_path} fuse.gcsfuse rw 0 0\n" if by_marker else ""))
    monkeypatch.setattr(checkpoint_steps, "MOUNTS_FILE", table)
    directory = tmp_path / "run" / "checkpoints"
    for name in ("0", "2", "4", "10", "12", "backup_6", "notes", "14.orbax-checkpoint-tmp-1234", "elsewhere/16"):
        (directory / name).mkdir(parents=True)
    for step in ("0", "2", "10", "elsewhere/16"):  # 4 and 12: a save stopped before its marker (where one counts)
        (directory / step / COMMIT_MARKER).write_text("")
    (directory / "16").symlink_to(directory / "elsewhere" / "16")
    (directory / "18").symlink_to(tmp_path / "gone")
    (directory / "20").write_text("a file\n")
    reader = RunCheckpoints(directory, every=1, read_only=True)
    assert committed_steps(tmp_path / "run") == reader.all_steps() == ([0, 2, 10, 16] if by_marker else
                                                                      [0, 2, 4, 10, 12, 16])
    reader.close()
    assert COMMIT_MARKER == ocp.path.atomicity.COMMIT_SUCCESS_FILE
    assert committed_steps(tmp_path / "nowhere") == committed_steps(table) == []  # no run, or a file


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from llama_jax.model_dir import MODEL_DIR
from llama_jax.safe_io import atomic_directory

dst, when = Path(sys.argv[1]), sys.argv[2]
real_replace = os.replace

def replace(src, target):  # a SIGKILL between moving the previous output aside and the new one in
    real_replace(src, target)
    if when == "between the renames" and Path(src) == dst:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
with atomic_directory(dst, MODEL_DIR, overwrite=True) as tmp:
    (tmp / "model_config.json").write_text("{}")  # half an output
    if when == "while writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("when", ["while writing", "between the renames"])
def test_what_a_killed_writer_left_is_settled_by_the_next(tmp_path, model, when):
    """A process SIGKILLed while writing a model directory leaves hidden siblings of it; the next
    write there removes its unfinished output and puts back the output it was replacing."""
    import signal
    import subprocess
    import sys

    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "m"), when])
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name.split("-")[0] for p in tmp_path.iterdir())  # its hidden output beside the previous one
    assert left == ([".m.tmp", "m"] if when == "while writing" else [".m.old", ".m.tmp"])
    with pytest.raises(FileExistsError, match="already exists"):  # the previous output, in its place again
        save_model(tmp_path / "m", cfg.replace(dtype="bfloat16"), params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert load_model(tmp_path / "m")[0] == cfg


INTERRUPTED_REPLACEMENT = """
import os, shutil, signal, sys, time
from pathlib import Path
from llama_jax import signals
from llama_jax.model_dir import MODEL_DIR
from llama_jax.safe_io import atomic_directory

dst = Path(sys.argv[1])
real_rmtree = shutil.rmtree

def rmtree(path, *args, **kwargs):  # Ctrl-C as the removal of the output just replaced begins
    os.kill(os.getpid(), signal.SIGINT)
    real_rmtree(path, *args, **kwargs)

shutil.rmtree = rmtree
try:
    with signals.raising_signals():
        with atomic_directory(dst, MODEL_DIR, overwrite=True) as tmp:
            (tmp / "model_config.json").write_text("{}")
        time.sleep(5)  # the Ctrl-C, held until the replacement was whole, arrives here
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_as_a_replaced_output_is_removed_waits_for_the_removal(tmp_path, model):
    """Ctrl-C once the new output was in place stopped the removal of the one it replaced halfway,
    which stayed beside it, hidden; the removal is finished first, then the command stops."""
    import subprocess
    import sys

    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    stopped = subprocess.run([sys.executable, "-c", INTERRUPTED_REPLACEMENT, str(tmp_path / "m")])
    assert stopped.returncode == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing of the old output beside it
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model_config.json"]


def test_params_that_do_not_fit_the_config_are_refused_before_writing(tmp_path, model):
    cfg, params = model
    with pytest.raises(ValueError, match=r"\['lm_head'\] has shape \(64, 100\), config expects \(64, 512\)"):
        save_model(tmp_path / "m", cfg, dict(params, lm_head=np.zeros((64, 100), np.float32)))
    with pytest.raises(ValueError, match=r"\['lm_head'\] is missing"):
        save_model(tmp_path / "m", cfg, {k: v for k, v in params.items() if k != "lm_head"})
    deeper = cfg.replace(n_layers=cfg.n_layers + 1)  # unscanned: the layer the config does not list is not dropped
    with pytest.raises(ValueError, match=rf"\['layers_{cfg.n_layers}'\].* is not part of this model"):
        save_model(tmp_path / "m", cfg, unstack_layers(init_params(deeper, 0), deeper.n_layers))
    with pytest.raises(ValueError, match=r"got Flax's variables \(\{'params': ...\}\); pass .* variables\['params'\]"):
        save_model(tmp_path / "m", cfg, {"params": params})
    with pytest.raises(ValueError, match=r"\['layers_1'\].* is missing"):  # (was a bare KeyError)
        unstacked = unstack_layers(params, cfg.n_layers)
        save_model(tmp_path / "m", cfg, {k: v for k, v in unstacked.items() if k != "layers_1"})
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_writing(tmp_path, model):
    cfg, params = model
    tokenizer = sentencepiece_model(tmp_path / "tok" / "tokenizer.model", cfg.vocab_size + 100)
    for given in (tokenizer, tokenizer.parent):  # a file, or a directory holding it
        with pytest.raises(ValueError, match=rf"tokenizer.model: the tokenizer has {cfg.vocab_size + 100} tokens but "
                                             rf"the model's vocab_size is {cfg.vocab_size}"):
            save_model(tmp_path / "m", cfg, params, tokenizer=given)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_save_and_load_options_of_the_wrong_kind_are_refused(tmp_path, model):
    cfg, params = model
    (tmp_path / "m").mkdir()
    (tmp_path / "empty").mkdir()
    tokenizer = sentencepiece_model(tmp_path / "tok" / "tokenizer.model", cfg.vocab_size)
    from llama_jax.tokenizer import load_tokenizer

    for kwargs, error, message in (
            (dict(overwrite="no"), ValueError, r"^overwrite must be True or False, got 'no'$"),  # replaced m/
            (dict(tokenizer=load_tokenizer(tokenizer)), TypeError,
             r"^tokenizer must be the path of a tokenizer file or of a directory holding one \(or None\), got "
             r"SentencePieceTokenizer$"),
            (dict(tokenizer=tmp_path / "empty"), ValueError,  # was a model saved without a tokenizer
             r"empty': the directory holds none of tokenizer.model, tokenizer.json"),
            (dict(config=cfg.to_dict()), TypeError, r"^config must be an LLaMAConfig")):
        with pytest.raises(error, match=message):
            save_model(tmp_path / "m", **(dict(config=cfg, params=params) | kwargs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m", "tok"] and not any((tmp_path / "m").iterdir())
    save_model(tmp_path / "saved", cfg, params)
    with pytest.raises(ValueError, match=r"^as_numpy must be True or False, got 'False'$"):  # was NumPy arrays
        load_model(tmp_path / "saved", as_numpy="False")


def test_a_damaged_model_is_one_error_with_nothing_printed_after_it(tmp_path, model):
    """load_model, the Python API, on a model whose parameters' data file is empty: a ValueError,
    and nothing printed then by the reads Orbax abandoned ("RuntimeError: Event loop is closed"
    tracebacks, which came after the caller had the error)."""
    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    [data] = (tmp_path / "m" / "params" / "d").iterdir()
    data.write_bytes(b"")
    script = ("import gc, sys, time\nfrom llama_jax import load_model\nfor _ in range(3):\n"
              "    try:\n        load_model(sys.argv[1])\n    except ValueError as e:\n"
              "        print(str(e).split(':')[0])\ngc.collect()\ntime.sleep(0.5)\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout == f"model directory {tmp_path / 'm'} is damaged or incomplete\n" * 3
    assert "Traceback" not in run.stderr and "Event loop is closed" not in run.stderr, run.stderr


def test_a_damaged_model_loaded_after_a_command_stopped_by_ctrl_c_is_named_damaged(tmp_path, model, monkeypatch,
                                                                                  capsys):
    """In one process (a notebook, a script calling `main`), a command stopped by Ctrl-C left its
    signal noted: a later load_model of a damaged model raised KeyboardInterrupt instead, its failed
    read taken for one that the Ctrl-C had interrupted."""
    import os
    import signal
    import time

    from llama_jax import cli

    def interrupted(args):  # Ctrl-C while the command runs
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)

    monkeypatch.setattr(cli, "cmd_presets", interrupted)
    assert main(["presets"]) == 130
    assert capsys.readouterr().err == "llama-jax presets: interrupted\n"
    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    [data] = (tmp_path / "m" / "params" / "d").iterdir()
    data.write_bytes(b"")
    with pytest.raises(ValueError, match=f"^model directory {tmp_path / 'm'} is damaged or incomplete"):
        try:
            load_model(tmp_path / "m")
        except KeyboardInterrupt:  # (not let through: it would stop the test session)
            pytest.fail("load_model raised the KeyboardInterrupt of the earlier command")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ValueError, match="not a llama_jax model directory"):
        load_model(tmp_path)


@pytest.mark.parametrize("field, value, difference", [
    ("n_layers", 1, "makes layers.attn.k.kernel of shape (1, 64, 2, 16), but params/ holds it as (2, 64, 2, 16)"),
    ("n_layers", 3, "makes layers.attn.k.kernel of shape (3, 64, 2, 16), but params/ holds it as (2, 64, 2, 16)"),
    ("vocab_size", 256, "makes embed.embedding of shape (256, 64), but params/ holds it as (512, 64)"),
    ("tie_embeddings", True, "has no place for lm_head, which params/ holds"),
])
def test_a_config_that_does_not_describe_the_stored_params(tmp_path, capsys, model, field, value, difference):
    """Restored as numpy arrays (what conversion does), nothing checked the shapes against the config:
    a model with fewer layers was written silently."""
    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    config_file = tmp_path / "m" / "model_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    message = f"{tmp_path / 'm'}: model_config.json {difference}; the config does not describe these parameters"
    for as_numpy in (True, False):
        with pytest.raises(ValueError) as error:
            load_model(tmp_path / "m", as_numpy=as_numpy)
        assert str(error.value) == message
    assert main(["convert", "--from", "jax", "--to", "hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 2
    assert capsys.readouterr().err == f"llama-jax convert: error: {message}\n"
    assert not (tmp_path / "hf").exists()


def test_an_override_that_reshapes_the_params_is_named(tmp_path, model):
    """load_model(path, n_kv_heads=4) blamed the directory's model_config.json ("the config does not
    describe these parameters") for what the caller's override changed; a numerics one still loads."""
    cfg, params = model
    save_model(tmp_path / "m", cfg, params)
    with pytest.raises(ValueError) as error:
        load_model(tmp_path / "m", n_kv_heads=4, dtype="bfloat16")
    assert str(error.value) == (
        f"{tmp_path / 'm'}: load_model(n_kv_heads=4, dtype='bfloat16') makes layers.attn.k.kernel of shape "
        "(2, 64, 4, 16), but the directory's model_config.json holds it as (2, 64, 2, 16); an override may change "
        "how the model computes, not the shapes of its parameters")
    assert load_model(tmp_path / "m", dtype="bfloat16", rope_theta=5e5)[0].rope_theta == 5e5


@pytest.mark.parametrize("max_to_keep, keep_every", [(2, 2), (3, 0), (1, 4), (None, 0)])
def test_the_retention_model_is_orbax_s(tmp_path, max_to_keep, keep_every):
    """`retention_deletes`, which resume checks rely on, names what Orbax itself has deleted of a
    run's checkpoints once it is reopened on them and saves 1, 2, 3 more steps (keep_every's steps
    count in max_to_keep)."""
    from llama_jax.checkpoint import RunCheckpoints, retention_deletes

    state = {"w": np.zeros(3, np.float32)}

    def opened():
        return RunCheckpoints(tmp_path / "checkpoints", every=1, max_to_keep=max_to_keep, keep_every=keep_every,
                              async_save=False)

    checkpoints = opened()
    for step in range(1, 7):
        checkpoints.save(step, state, {"step": step})
    checkpoints.close()
    checkpoints = opened()
    held = sorted(checkpoints.all_steps())
    for saves, step in enumerate((7, 8, 9), start=1):
        checkpoints.save(step, state, {"step": step})
        kept = sorted(checkpoints.all_steps())
        assert sorted(set(held) - set(kept)) == retention_deletes(held, max_to_keep, keep_every, saves)
    checkpoints.close()


def test_an_output_another_process_made_meanwhile_is_not_replaced_without_overwrite(tmp_path, model, monkeypatch):
    """Two saves to one new destination at once: both found none, and the later to finish replaced
    the other's output unasked, both reporting success. The later one is refused at the swap and
    the output in place is left as it is, with nothing hidden beside it."""
    from llama_jax import checkpoint

    cfg, params = model
    other = cfg.replace(dtype="bfloat16")
    real_write = checkpoint.write_model_dir

    def write_while_another_saves(directory, config, tree):
        real_write(directory, config, tree)
        monkeypatch.setattr(checkpoint, "write_model_dir", real_write)
        save_model(tmp_path / "m", other, params)  # the other process, finishing first

    monkeypatch.setattr(checkpoint, "write_model_dir", write_while_another_saves)
    with pytest.raises(FileExistsError, match="was created by another process while this one wrote it"):
        save_model(tmp_path / "m", cfg, params)
    assert load_model(tmp_path / "m")[0] == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
