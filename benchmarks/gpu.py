"""GPU benchmarks for one NVIDIA H200: cuDNN attention against XLA, MFU of a ~1B LLaMA train step,
and batch-1 greedy decoding against the HBM roofline.

It was written on CPU (`--dry-run`, which builds every part with a tiny shape and runs one step
of each, with XLA standing in for cuDNN, is in the test suite) and first ran on an H200 on
2026-12-04 (jax 0.11.2, cuDNN 9.19, flax 0.12.10, orbax-checkpoint 0.12.4: 246 s for all four
parts; the figures are in benchmarks/README.md). It fits a 10-minute slot.

On the GPU machine (a CUDA build of jax already installed), from the repository root:

    pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda.*|flax|optax|orbax-checkpoint|ml.collections|sentencepiece|numpy) '
    pip install --no-deps -e .
    # only the packages `pip list` lacks; jax pinned so that pip leaves the CUDA build alone:
    pip install "jax==$(python -c 'import jax; print(jax.__version__)')" \
        "flax>=0.12.8,<0.13" optax "orbax-checkpoint>=0.12.8,<0.13" ml_collections sentencepiece
    python benchmarks/gpu.py --out gpu_results.json

Those five (and numpy, which jax brings) are all this script imports: llama_jax's other
dependencies (grain, tiktoken, tensorboardX, matplotlib, ...) are not needed, which was checked
by blocking their imports during a dry run. setup.py pins jax<0.11; `--no-deps` sidesteps that
check for a newer CUDA jax. If pip cannot satisfy the flax/orbax pins with the installed jax,
drop the pins. Without network access, skip both installs if `pip list` shows the five
packages (the script puts the checkout on sys.path itself), or bring the missing ones' wheels
along: on 2026-12-04 the H200 machine lacked only ml_collections, installed there with
`pip install --no-index --no-deps --target /tmp/site ml_collections-*.whl` and
`PYTHONPATH=/tmp/site`, and every part ran with its jax 0.11.2 (which still accepts the
`with mesh:` llama_jax enters its mesh with) and orbax-checkpoint 0.12.4. The script's own code
tolerates other jax versions: the cuDNN variants are looked up with `inspect` and skipped with a
note, and the float32 reference's precision switch is optional. Here, on CPU:

    python benchmarks/gpu.py --dry-run --out /tmp/gpu_dry.json

Every figure is written to `--out` (JSON, rewritten atomically after each measurement), so a run
cut short by the slot's end still leaves what it measured; a part that fails records its error
and the next part runs. Parts, in this order (`--parts a b c d e` to choose):

a. Attention kernels of `llama_jax.attention`, bf16, B=4, S=2048, H=16 query / K=8 K/V heads
   (GQA), head dim 128, on packed rows (2-5 documents per row, segment ids as training uses).
   Correctness: max |difference| of the outputs and of the gradients (dq, dk, dv of a fixed
   random cotangent) of `cudnn` against `xla`, each also against a float32 `xla` reference.
   Speed, forward + backward (median of `--repeats-attention` after warm-up; compile apart), and
   model TFLOP/s: the causal attention FLOPs of full rows as part b's MFU counts them
   (`llama_jax.metrics.attention_flops_per_token`, backward 2 x forward), whatever the packing:
     xla                      the project's `xla` kernel (einsums) with the dense [B,S,T] mask;
     cudnn, is_causal + dense mask  `jax.nn.dot_product_attention(implementation="cudnn",
                              is_causal=True)` with the [B,1,S,T] boolean mask (cuDNN receives it
                              as a bias tensor and knows it is causal, so it may skip the blocks
                              above the diagonal): the project's `cudnn` kernel until 12-04, now
                              its fallback for rows of more documents than it makes room for;
     cudnn, dense mask only   the same call without `is_causal` (the project's form before
                              it passed `is_causal`): cuDNN computes every block;
     cudnn, project kernel    `llama_jax.attention.cudnn_packed_attention`: the packed layout built
                              from the segment ids on the device, with room for 32 documents per
                              row (behind a `lax.cond` to the dense form); where it would run the
                              dense form (a jax without the packed entry point, rows of more
                              documents), it records why instead of timing that under its name;
     cudnn, is_causal         the same call with `is_causal=True` and no mask: one document
                              per row, no packing (the kernel's best case);
     cudnn, is_causal + seq lengths  `query_seq_lengths`/`key_value_seq_lengths`, if the
                              installed jax's signature has them (checked with inspect): the only
                              segment information the public API takes for cuDNN; it means
                              padding (one document per row), so it is timed on full rows;
     cudnn, packed offsets    jax's internal cuDNN entry point
                              (`jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`,
                              `q_offsets`/`kv_offsets` + per-document lengths: cuDNN's packed
                              layout, Hopper and cuDNN >= 9.6), if present; checked against the
                              xla kernel on the same packed rows, and retried with K/V repeated
                              to 16 heads if the GQA call disagrees.
   Ratios to the project's cudnn kernel (room for 32) and to xla.
b. MFU of a ~1B LLaMA train step (dim 2048, 16 layers, 16 heads, 8 K/V heads, FFN 5632, vocab
   32000, 0.89B parameters; bf16 compute, float32 master weights, AdamW) at seq 2048 with
   `attention_impl="cudnn"`: `llama_jax.train.build_trainer` (config from
   `llama_jax.experiment.base_config`), the jitted train step compiled ahead of time; the first
   (batch, remat policy) of `--mfu-candidates` whose compiled peak memory fits the device is run
   on synthetic packed rows. MFU = tokens/s x `llama_jax.metrics.flops_per_token` / peak, the
   peak from `llama_jax.metrics.peak_flops_for_kind(device_kind)` (H200: 989 TFLOP/s dense
   bf16); if the device is not in that table, `--peak-tflops` is used and the output says so.
c. Batch-1 greedy decoding of the same model (the parameters part b trained, cast to bf16) with
   `llama_jax.generate.generate`: 128-token prompt, 256 new tokens, tokens/s of the whole call
   (prefill included) and of decoding alone (the 256-token call minus a 1-token call), against
   the HBM roofline (bytes read per token: the bf16 weights, all but one row of the input
   embedding table, and the whole bf16 K/V cache of prompt + new tokens slots, as `decode.py`
   counts them): at the datasheet bandwidth (`llama_jax.metrics.hbm_bandwidth_for_kind`, H200:
   4.8 TB/s; `--hbm-tbps` for a device not in its table) and at the bandwidth measured in the
   same run (a 4 GiB device-to-device `x + 1`, read + write bytes, and a bf16 matrix-vector
   product over 2 GiB, read bytes).
d. Reference for b: the same train step with `attention_impl="xla"` (first fitting candidate,
   from b's on); b's tokens/s over d's (and over e's) only where both ran the same candidate.
e. The same train step with `attention_impl="cudnn_packed"` (cuDNN's packed layout; its
   compiled peak memory is recorded beside b's: without remat it keeps both forms' residuals).
   The part fails, saying why, where the kernel would run its dense fallback instead.

The train steps use scanned layers, the project's default; `--scan-layers false` unrolls them
(on an H200, 1.07 x the scanned step: the scan copies each layer's slices). `--profile DIR`
also traces two train steps of b, d and e and one decoding call of c with `jax.profiler` into
DIR/PART (with the step's optimized HLO as DIR/PART/hlo.txt) and records a kernel-time summary
of each (`trace_summary.py`: by kind and by kernel, per step or per token) in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # llama_jax from this checkout, installed or not: before its first import

from decode import bytes_per_token  # noqa: E402
from llama_jax.cli import OneLineParser, positive_int  # noqa: E402
from timing import timed  # noqa: E402
from llama_jax.profiling import render, summarize  # noqa: E402
from llama_jax.safe_io import file_in_the_way  # noqa: E402

FULL = dict(attn=dict(B=4, S=2048, H=16, K=8, Dh=128),
            model=dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, ffn_dim=5632),
            seq_len=2048, prompt=128, new_tokens=256, copy_bytes=4 << 30, matvec_n=32768)
TINY = dict(attn=dict(B=2, S=256, H=4, K=2, Dh=64),
            model=dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=352),
            seq_len=128, prompt=8, new_tokens=8, copy_bytes=16 << 20, matvec_n=1024)

SHARED: dict = {}  # what part b hands to part c: the trained params and the model config


class Recorder:
    """The results JSON, rewritten atomically after every figure."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.data: dict = {}

    def put(self, part: str, key: str, value) -> None:
        self.data.setdefault(part, {})[key] = value
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        os.replace(tmp, self.path)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def log(msg: str) -> None:
    print(msg, flush=True)


def profiled(args, rec: Recorder, part: str, fn, per: int, unit: str, compiled=None) -> None:
    """With --profile: trace one call of `fn` with jax.profiler into DIR/PART and record where its
    device time went (`llama_jax.profiling.summarize`), divided by `per` (`unit`s: steps or tokens); the
    optimized HLO of `compiled` goes to DIR/PART/hlo.txt, to find the operations behind kernel
    names (a fusion `loop_add_fusion.3` runs as the kernel `loop_add_fusion_3`)."""
    if not args.profile:
        return
    import jax

    trace_dir = Path(args.profile) / part
    if compiled is not None:
        trace_dir.mkdir(parents=True, exist_ok=True)
        (trace_dir / "hlo.txt").write_text(compiled.as_text())
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        fn()
    try:
        summary = summarize(trace_dir, per=per)
    except (OSError, ValueError) as e:  # the part's figures stand; only the summary is missing
        rec.put(part, "profile_error", f"{type(e).__name__}: {e}")
        log(f"  {part}: no profile summary: {e}")
        return
    summary["per_unit"] = unit
    rec.put(part, "profile", summary)
    log(render(summary))


# ---- environment -------------------------------------------------------------------------------

def environment(args, rec: Recorder) -> None:
    import jax

    dev = jax.devices()[0]
    env = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": dev.device_kind,
           "device_count": jax.device_count(), "dry_run": args.dry_run, "argv": sys.argv[1:]}
    try:
        import jaxlib

        env["jaxlib"] = jaxlib.__version__
    except Exception:
        pass
    for name in ("flax", "optax", "orbax.checkpoint"):
        try:
            env[name] = __import__(name, fromlist=["__version__"]).__version__
        except Exception as e:
            env[name] = f"unavailable: {e}"
    try:
        from jax._src.lib import cuda_versions

        env["cudnn_version"] = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception as e:
        env["cudnn_version"] = f"unknown: {type(e).__name__}"
    stats = _memory_stats(dev)
    env["memory_bytes_limit"] = stats.get("bytes_limit")
    if jax.default_backend() == "gpu":
        try:
            env["compute_capability"] = dev.compute_capability
        except Exception:
            pass
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version",
                 "--format=csv"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    for key, value in env.items():
        rec.put("environment", key, value)
    log(f"environment: {json.dumps(env, default=str)}")


def _memory_stats(dev) -> dict:
    try:
        return dev.memory_stats() or {}
    except Exception:
        return {}


# ---- a. attention ------------------------------------------------------------------------------

DENSE_FORM = "cudnn, is_causal + dense mask (project kernel `cudnn`)"
PACKED_FORM = "cudnn, packed layout from segment ids, room for {} documents (project kernel `cudnn_packed`)"


def packed_segments(B: int, S: int, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """Segment ids [B, S] of rows holding 2, 3, 4, 5, 2, ... documents (no padding), and the
    document lengths of each row."""
    rng = np.random.default_rng(seed)
    seg, lengths = np.zeros((B, S), np.int32), []
    for b in range(B):
        n_docs = 2 + b % 4
        cuts = np.sort(rng.choice(np.arange(1, S), n_docs - 1, replace=False))
        row = np.diff(np.concatenate([[0], cuts, [S]])).astype(int).tolist()
        seg[b] = np.repeat(np.arange(1, n_docs + 1), row)
        lengths.append(row)
    return seg, lengths


def packed_offsets(lengths: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(seqlen [B, M], offsets [B, M + 1]) as jax's cuDNN packed layout takes them: per row, each
    document's length and start, padded with -1 (M = most documents in a row)."""
    M = max(len(r) for r in lengths)
    seqlen = np.full((len(lengths), M), -1, np.int32)
    offsets = np.full((len(lengths), M + 1), -1, np.int32)
    for b, row in enumerate(lengths):
        seqlen[b, :len(row)] = row
        offsets[b, :len(row)] = np.cumsum([0] + row[:-1])
    return seqlen, offsets


def packed_fallback(segment_ids: np.ndarray) -> str | None:
    """Why `llama_jax.attention.cudnn_packed_attention` would run these rows [B, S] through its
    fallback, the dense-mask `cudnn` form, instead of cuDNN's packed layout; None when it would
    not. Timed under the packed kernel's name, the fallback's figures would pass for its own."""
    from llama_jax.attention import PACKED_DOCUMENTS, _cudnn_packed_entry, packed_layout

    if _cudnn_packed_entry() is None:
        return ("this jax has no cuDNN packed-layout entry point (jax._src.cudnn.fused_attention_stablehlo"
                ".dot_product_attention with q_offsets/kv_offsets), so cudnn_packed runs the dense cudnn form")
    room = min(PACKED_DOCUMENTS, segment_ids.shape[1])
    documents = int(packed_layout(segment_ids, room)[2].max())  # (the kernel's own count)
    if documents > room:
        return (f"a row holds {documents} documents, more than the {PACKED_DOCUMENTS} cudnn_packed makes room "
                f"for, so it runs the dense cudnn form")
    return None


def segments_from_offsets(seqlen: np.ndarray, offsets: np.ndarray, S: int) -> np.ndarray:
    """The segment ids the packed-layout arguments describe (1-based, 0 for uncovered slots)."""
    seg = np.zeros((seqlen.shape[0], S), np.int32)
    for b in range(seqlen.shape[0]):
        for i, (n, start) in enumerate(zip(seqlen[b], offsets[b])):
            if n >= 0 and start >= 0:
                seg[b, start:start + n] = i + 1
    return seg


def _highest_precision():
    """Full float32 matmuls (no TF32) where this jax has the switch."""
    import contextlib

    import jax

    switch = getattr(jax, "default_matmul_precision", None)
    return switch("highest") if switch is not None else contextlib.nullcontext()


def part_attention(args, rec: Recorder) -> None:
    import jax
    import jax.numpy as jnp

    from llama_jax import metrics
    from llama_jax.attention import PACKED_DOCUMENTS, KERNELS, attention_mask, cudnn_packed_attention, xla_attention

    P = "a_attention"
    shape = (TINY if args.dry_run else FULL)["attn"]
    B, S, H, K, Dh = (shape[k] for k in ("B", "S", "H", "K", "Dh"))
    impl = "xla" if args.dry_run else "cudnn"  # what jax.nn.dot_product_attention is asked for
    rec.put(P, "shape", shape)
    rec.put(P, "implementation_requested", impl)
    bf16, f32 = jnp.bfloat16, jnp.float32
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, S, H, Dh), f32).astype(bf16)
    k = jax.random.normal(keys[1], (B, S, K, Dh), f32).astype(bf16)
    v = jax.random.normal(keys[2], (B, S, K, Dh), f32).astype(bf16)
    cotangent = jax.random.normal(keys[3], (B, S, H, Dh), f32).astype(bf16)

    seg_np, lengths = packed_segments(B, S)
    rec.put(P, "documents_per_row", [len(r) for r in lengths])
    seqlen_np, offsets_np = packed_offsets(lengths)
    roundtrip = bool((segments_from_offsets(seqlen_np, offsets_np, S) == seg_np).all())
    rec.put(P, "packed_offsets_describe_the_segments", roundtrip)
    slots = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    seg = jnp.asarray(seg_np)
    packed_mask = attention_mask(slots, seg, seg)  # [B, S, T]: causal within documents
    causal_mask = attention_mask(slots, jnp.ones_like(seg), jnp.ones_like(seg))

    project_cudnn = KERNELS["dot_product" if args.dry_run else "cudnn"][0]  # (q, k, v, mask) -> out
    params = inspect.signature(jax.nn.dot_product_attention).parameters
    has_seq_lengths = "query_seq_lengths" in params and "key_value_seq_lengths" in params
    rec.put(P, "jax_nn_dot_product_attention_parameters", list(params))
    full_lengths = jnp.full((B,), S, jnp.int32)

    variants = {  # name -> (fn(q, k, v), semantics: "packed" or "causal")
        "xla (project kernel, dense mask)": (lambda q, k, v: xla_attention(q, k, v, packed_mask), "packed"),
        DENSE_FORM: (lambda q, k, v: project_cudnn(q, k, v, packed_mask), "packed"),
        "cudnn, dense mask only (no is_causal)": (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=packed_mask[:, None], implementation=impl),
            "packed"),
        "cudnn, is_causal, no mask (no packing)": (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl), "causal"),
    }
    if has_seq_lengths:
        variants["cudnn, is_causal + seq lengths (full rows)"] = (
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=full_lengths,
                                                         key_value_seq_lengths=full_lengths, implementation=impl),
            "causal")
    else:
        rec.put(P, "note_seq_lengths", "jax.nn.dot_product_attention of this jax takes no query_seq_lengths/"
                                       "key_value_seq_lengths: variant skipped")

    def loss_and_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(out.astype(f32) * cotangent.astype(f32)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    # references: the xla kernel in float32 on both mask semantics, and in bf16 (the kernel under test's dtype)
    refs, ref_max = {}, {}
    for sem, mask in (("packed", packed_mask), ("causal", causal_mask)):
        with _highest_precision():  # no TF32 in the float32 reference
            (_, out32), g32 = loss_and_grads(lambda q, k, v, m=mask: xla_attention(q, k, v, m))(
                q.astype(f32), k.astype(f32), v.astype(f32))
        (_, out16), g16 = loss_and_grads(lambda q, k, v, m=mask: xla_attention(q, k, v, m))(q, k, v)
        refs[sem] = {"f32": (out32, *g32), "bf16": (out16, *g16)}
        ref_max[sem] = {n: float(jnp.max(jnp.abs(x))) for n, x in zip(("out", "dq", "dk", "dv"), refs[sem]["f32"])}
        rec.put(P, f"reference_{sem}_max_abs", ref_max[sem])
    del out32, g32, out16, g16

    def diffs(result, sem):
        out = {}
        for ref_name, ref in refs[sem].items():
            out[f"vs_xla_{ref_name}"] = {n: float(jnp.max(jnp.abs(a.astype(f32) - b.astype(f32))))
                                         for n, a, b in zip(("out", "dq", "dk", "dv"), result, ref)}
        return out

    def flops_fwd_bwd():  # causal full rows, as part b's MFU counts attention (backward 2 x forward)
        return metrics.attention_flops_per_token(S, H, Dh) * B * S

    def measure(name, fn, sem):
        step = loss_and_grads(fn)
        start = time.perf_counter()
        (_, out), grads = step(q, k, v)
        jax.block_until_ready(grads)
        compile_s = time.perf_counter() - start
        entry = {"semantics": sem, "compile_and_first_call_s": compile_s, **diffs((out, *grads), sem)}
        del out, grads
        median, times = timed(lambda: jax.block_until_ready(step(q, k, v)), args.repeats_attention, warmup=2)
        entry.update(fwd_bwd_ms=median * 1e3, fwd_bwd_ms_all=[t * 1e3 for t in times],
                     model_tflops_per_s=flops_fwd_bwd() / median / 1e12)
        rec.put(P, name, entry)
        log(f"  a. {name}: {median * 1e3:.2f} ms fwd+bwd; max|d out| vs xla bf16 "
            f"{entry['vs_xla_bf16']['out']:.3g}, vs f32 {entry['vs_xla_f32']['out']:.3g}; "
            f"max|d dq| vs f32 {entry['vs_xla_f32']['dq']:.3g}")
        return entry

    results = {}
    for name, (fn, sem) in variants.items():
        try:
            results[name] = measure(name, fn, sem)
        except Exception as e:
            rec.put(P, name, {"error": f"{type(e).__name__}: {e}"[:2000]})
            log(f"  a. {name}: FAILED {type(e).__name__}: {str(e)[:300]}")

    # the project's `cudnn_packed` kernel: the packed layout built from segment ids on the device, room
    # for PACKED_DOCUMENTS per row behind a lax.cond to the dense form (room for all S slots ran out of
    # memory on 12-04: cuDNN's workspace grows with the room)
    name = PACKED_FORM.format(PACKED_DOCUMENTS)
    try:
        fallback = packed_fallback(seg_np)
        if fallback is not None:
            raise RuntimeError(fallback)
        results[name] = measure(name, lambda q, k, v: cudnn_packed_attention(q, k, v, seg), "packed")
    except Exception as e:  # (--dry-run: it needs CUDA and cuDNN)
        rec.put(P, name, {"error": f"{type(e).__name__}: {e}"[:2000]})
        log(f"  a. {name}: FAILED {type(e).__name__}: {str(e)[:300]}")

    # cuDNN's packed layout through jax's internal entry point (not public API; may be absent)
    if args.dry_run:  # exercised all the same; the calls fail without CUDA and record why
        rec.put(P, "note_packed_offsets", "--dry-run: the packed-offsets calls need CUDA and cuDNN and fail here")
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        needed = {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "mask_type", "scale", "qkv_layout"}
        missing = needed - set(inspect.signature(fa.dot_product_attention).parameters)
        if missing:
            raise NotImplementedError(f"internal dot_product_attention lacks {sorted(missing)}")
        seqlen, offsets = jnp.asarray(seqlen_np), jnp.asarray(offsets_np)
        # agreement: every difference to the f32 reference within 4x the dense form's own
        # (bf16 rounding), or within 2% of the reference's largest value
        dense = results.get(DENSE_FORM, {}).get("vs_xla_f32", {})
        tolerance = {n: max(4 * dense.get(n, 0.0), 0.02 * ref_max["packed"][n]) for n in ("out", "dq", "dk", "dv")}
        rec.put(P, "packed_offsets_tolerance", tolerance)

        def packed(mask_type, repeat_kv):
            def fn(q, k, v):
                if repeat_kv:
                    k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
                return fa.dot_product_attention(q, k, v, q_seqlen=seqlen, kv_seqlen=seqlen, q_offsets=offsets,
                                                kv_offsets=offsets, scale=1.0 / math.sqrt(Dh),
                                                mask_type=getattr(fa.MaskType, mask_type), qkv_layout="BTNH")
            return fn

        for repeat_kv in (False, True):
            agreed = False
            for mask_type in ("PADDING_CAUSAL", "CAUSAL"):
                name = f"cudnn, packed offsets, {mask_type}" + (", K/V repeated to H heads" if repeat_kv else "")
                try:
                    entry = measure(name, packed(mask_type, repeat_kv), "packed")
                    results[name] = entry
                    entry["agrees_with_xla"] = all(entry["vs_xla_f32"][n] <= t for n, t in tolerance.items())
                    rec.put(P, name, entry)
                    agreed = agreed or entry["agrees_with_xla"]
                    log(f"     agrees with xla (out, dq, dk, dv within tolerance): {entry['agrees_with_xla']}; "
                        f"differences {entry['vs_xla_f32']}")
                except Exception as e:
                    rec.put(P, name, {"error": f"{type(e).__name__}: {e}"[:2000]})
                    log(f"  a. {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            if agreed:
                break
    except Exception as e:
        rec.put(P, "note_packed_offsets", f"skipped: {type(e).__name__}: {e}"[:2000])
        log(f"  a. packed offsets skipped: {type(e).__name__}: {str(e)[:300]}")

    base = results.get(DENSE_FORM)
    xla = results.get("xla (project kernel, dense mask)")
    ratios = {}
    for name, entry in results.items():
        ratios[name] = {"x_project_cudnn_time": entry["fwd_bwd_ms"] / base["fwd_bwd_ms"] if base else None,
                        "x_xla_time": entry["fwd_bwd_ms"] / xla["fwd_bwd_ms"] if xla else None}
    rec.put(P, "time_ratios", ratios)


# ---- b / d. MFU of a ~1B train step ------------------------------------------------------------

def _yes_no(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _candidates(text: str) -> list[tuple[int, str]]:
    """argparse type of --mfu-candidates: BATCH:REMAT pairs (REMAT defaults to none)."""
    from llama_jax.config import REMAT_POLICIES

    out = []
    for item in text.split(","):
        batch, _, remat = item.strip().partition(":")
        remat = remat or "none"
        if not batch.isdigit() or int(batch) < 1 or remat not in REMAT_POLICIES:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not BATCH:REMAT with a positive BATCH and REMAT "
                                             f"one of {', '.join(REMAT_POLICIES)}")
        out.append((int(batch), remat))
    return out


def against_b(b: dict, result: dict, attention_impl: str) -> dict:
    """Part b's tokens/s over a later part's (d: xla, e: cudnn_packed), the attention kernels'
    ratio: only when both ran the same batch and remat policy (a part whose first candidate did not
    fit runs another), else a note of why there is none."""
    ran = [(r["batch"], r["remat_policy"]) for r in (b, result)]
    if ran[0] != ran[1]:
        return {f"cudnn_over_{attention_impl}_note": f"not compared: part b ran batch {ran[0][0]}, remat "
                                                     f"{ran[0][1]}; this part batch {ran[1][0]}, remat {ran[1][1]}"}
    return {f"cudnn_over_{attention_impl}_tokens_per_s": b["tokens_per_s"] / result["tokens_per_s"]}


def part_mfu(args, rec: Recorder, attention_impl: str, part: str) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from llama_jax import metrics
    from llama_jax.data import synthetic_batch
    from llama_jax.experiment import base_config
    from llama_jax.sharding import batch_sharding
    from llama_jax.train import build_trainer, global_batch

    sizes = TINY if args.dry_run else FULL
    S = sizes["seq_len"]
    impl = "xla" if args.dry_run and attention_impl.startswith("cudnn") else attention_impl
    dev = jax.devices()[0]
    known = metrics.peak_flops_for_kind(dev.device_kind)
    if known is not None:
        peak, source = known, f"llama_jax.metrics table for {dev.device_kind!r}"
    elif args.dry_run:
        peak, source = metrics.peak_flops_per_device(dev), "measured float32 matmul (dry run on CPU)"
    else:
        peak, source = args.peak_tflops * 1e12, (f"--peak-tflops {args.peak_tflops} (device_kind {dev.device_kind!r} "
                                                 f"is not in llama_jax.metrics.PEAK_TFLOPS)")
    rec.put(part, "attention_impl", impl)
    rec.put(part, "scan_layers", args.scan_layers)
    rec.put(part, "peak_flops", peak)
    rec.put(part, "peak_flops_source", source)
    log(f"  {part}: peak {peak / 1e12:.0f} TFLOP/s from {source}")
    limit = _memory_stats(dev).get("bytes_limit")
    candidates = [(2, "none")] if args.dry_run else args.mfu_candidates
    if part[0] in "de" and SHARED.get("mfu_choice") in candidates:  # d and e start where b ran
        candidates = candidates[candidates.index(SHARED["mfu_choice"]):]
    tried = []
    for batch, remat in candidates:
        attempt = {"batch": batch, "remat_policy": remat}
        tried.append(attempt)
        rec.put(part, "attempts", tried)
        config = base_config("debug", **sizes["model"], max_seq_len=S, dtype="bfloat16", param_dtype="float32",
                             attention_impl=impl, remat_policy=remat, scan_layers=args.scan_layers)
        config.train.update(batch_size=batch, seq_len=S, steps=1000)
        config.optimizer.update(warmup_steps=0)
        rows = synthetic_batch(0, 0, range(batch), S, config.model.vocab_size)
        fallback = packed_fallback(rows["segment_ids"]) if attention_impl == "cudnn_packed" else None
        if fallback is not None:  # its figures would be the dense form's, under the packed kernel's name
            raise RuntimeError(fallback)
        trainer = build_trainer(config)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                nn.meta.unbox(trainer.abstract_state), trainer.state_shardings)
        abatch = {key: jax.ShapeDtypeStruct((batch, S), jnp.float32 if key == "loss_mask" else jnp.int32,
                                            sharding=batch_sharding(trainer.mesh))
                  for key in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
        start = time.perf_counter()
        try:
            with trainer.context():
                compiled = trainer.jit_train_step.lower(abstract, abatch).compile()
        except Exception as e:
            attempt["error"] = f"compile: {type(e).__name__}: {e}"[:1500]
            rec.put(part, "attempts", tried)
            log(f"  {part}: batch {batch}, remat {remat}: compile failed: {str(e)[:200]}")
            continue
        attempt["compile_s"] = time.perf_counter() - start
        memory = compiled.memory_analysis()
        if memory is not None:
            est = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                   + memory.temp_size_in_bytes)
            attempt["estimated_peak_bytes"] = est
            attempt["temp_bytes"] = memory.temp_size_in_bytes
            if limit and est > 0.92 * limit:
                attempt["skipped"] = f"estimated peak {est / 2**30:.1f} GiB > 92% of {limit / 2**30:.1f} GiB"
                rec.put(part, "attempts", tried)
                log(f"  {part}: batch {batch}, remat {remat}: {attempt['skipped']}")
                continue
        rec.put(part, "attempts", tried)
        state = None
        try:
            state = trainer.init_state(0)
            data = global_batch(trainer.mesh, rows)
            losses = []

            def step():
                nonlocal state
                state, m = compiled(state, data)
                losses.append(m["loss"])
                jax.block_until_ready(m)

            start = time.perf_counter()
            step()
            attempt["first_step_s"] = time.perf_counter() - start
            median, times = timed(step, 1 if args.dry_run else args.steps, warmup=0 if args.dry_run else 2)
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            attempt["error"] = text[:1500]
            rec.put(part, "attempts", tried)
            log(f"  {part}: batch {batch}, remat {remat}: FAILED {text[:300]}")
            state = None
            gc.collect()
            if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
                continue
            raise
        profiled(args, rec, part, lambda: [step() for _ in range(2)], 2, "train step", compiled)
        cfg = trainer.model_config
        tokens_per_s = batch * S / median
        per_token = metrics.flops_per_token(cfg, S)
        result = {"batch": batch, "seq_len": S, "remat_policy": remat, "step_s": median, "step_s_all": times,
                  "tokens_per_s": tokens_per_s, "model_flops_per_token": per_token,
                  "tflops_per_s": tokens_per_s * per_token / 1e12, "mfu": tokens_per_s * per_token / peak,
                  "param_count": sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)),
                  "loss_first_last": [float(losses[0]), float(losses[-1])],
                  "compile_s": attempt["compile_s"]}
        if "estimated_peak_bytes" in attempt:
            result["estimated_peak_gib"] = attempt["estimated_peak_bytes"] / 2**30
        try:
            result["device_peak_bytes_in_use"] = _memory_stats(dev).get("peak_bytes_in_use")
        except Exception:
            pass
        rec.put(part, "result", result)
        log(f"  {part}: {impl} attention, batch {batch} x {S}, remat {remat}: {median:.3f} s/step, "
            f"{tokens_per_s:,.0f} tokens/s, {result['tflops_per_s']:.0f} TFLOP/s, MFU {result['mfu']:.1%}")
        if part.startswith("b"):
            SHARED.update(params=state.params, model_config=cfg, mfu_choice=(batch, remat), mfu_result=result)
        elif SHARED.get("mfu_result"):
            for key, value in against_b(SHARED["mfu_result"], result, attention_impl).items():
                rec.put(part, key, value)
        state = data = compiled = None  # free the device memory before the next part
        gc.collect()
        return
    raise RuntimeError(f"no candidate of {candidates} fitted or ran")


# ---- c. decoding -------------------------------------------------------------------------------

def bandwidth(sizes: dict, repeats: int) -> tuple[float, float]:
    """(bytes/s of a float32 `x + 1` over `copy_bytes`, read + write; bytes/s read by a bf16
    matrix-vector product over a `matvec_n` square matrix)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((sizes["copy_bytes"] // 4,), jnp.float32)
    add = jax.jit(lambda x: x + 1)
    jax.block_until_ready(add(x))
    copy_s, _ = timed(lambda: jax.block_until_ready(add(x)), repeats)
    m = jnp.ones((sizes["matvec_n"], sizes["matvec_n"]), jnp.bfloat16)
    vec = jnp.ones((sizes["matvec_n"],), jnp.bfloat16)
    matvec = jax.jit(lambda m, v: m @ v)
    jax.block_until_ready(matvec(m, vec))
    matvec_s, _ = timed(lambda: jax.block_until_ready(matvec(m, vec)), repeats)
    return 2 * x.nbytes / copy_s, m.nbytes / matvec_s


def datasheet_bandwidth(device_kind: str, hbm_tbps: float) -> tuple[float, str]:
    """(bytes/s, where from) of the device's HBM: `llama_jax.metrics`' table, else `hbm_tbps`."""
    from llama_jax import metrics

    known = metrics.hbm_bandwidth_for_kind(device_kind)
    if known is not None:
        return known, f"llama_jax.metrics table for {device_kind!r}"
    return hbm_tbps * 1e12, f"--hbm-tbps {hbm_tbps} (device_kind {device_kind!r} is not in llama_jax.metrics.HBM_TBPS)"


def part_decode(args, rec: Recorder) -> None:
    import jax
    import jax.numpy as jnp

    from llama_jax.config import LLaMAConfig
    from llama_jax.generate import generate
    from llama_jax.model import init_params

    P = "c_decode"
    sizes = TINY if args.dry_run else FULL
    repeats = 1 if args.dry_run else args.repeats
    if "params" in SHARED:
        cfg = SHARED["model_config"].replace(dtype="bfloat16", param_dtype="bfloat16")
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), SHARED.pop("params"))
        rec.put(P, "params", "part b's trained parameters, cast to bf16")
    else:
        cfg = LLaMAConfig(**sizes["model"], max_seq_len=sizes["seq_len"], dtype="bfloat16", param_dtype="bfloat16")
        params = init_params(cfg, 0)
        rec.put(P, "params", "random initialisation in bf16 (part b did not run)")
    gc.collect()
    jax.block_until_ready(params)
    rec.put(P, "weight_bytes", sum(x.nbytes for x in jax.tree.leaves(params)))
    read = bytes_per_token(cfg, params, sizes["prompt"] + sizes["new_tokens"])
    read_bytes = read["weights"] + read["kv_cache"]
    rec.put(P, "streamed_weight_bytes_per_token", read["weights"])
    rec.put(P, "kv_cache_bytes_per_token", read["kv_cache"])
    rec.put(P, "streamed_bytes_per_token", read_bytes)

    copy_rate, matvec_rate = bandwidth(sizes, max(3, repeats * 4))
    datasheet, source = datasheet_bandwidth(jax.devices()[0].device_kind, args.hbm_tbps)
    rec.put(P, "bandwidth", {"copy_read_plus_write_bytes_per_s": copy_rate, "matvec_read_bytes_per_s": matvec_rate,
                             "datasheet_bytes_per_s": datasheet, "datasheet_source": source})
    log(f"  c. bandwidth: copy {copy_rate / 1e12:.2f} TB/s (read + write), bf16 matvec {matvec_rate / 1e12:.2f} TB/s, "
        f"datasheet {datasheet / 1e12:.1f} TB/s; read per token {read_bytes / 1e9:.2f} GB (K/V cache "
        f"{read['kv_cache'] / 1e9:.3f} GB of it)")

    rng = np.random.default_rng(0)
    prompts = rng.integers(3, cfg.vocab_size, (1, sizes["prompt"])).tolist()
    new = sizes["new_tokens"]

    def call(n_new):
        return generate(cfg, params, prompts, n_new)

    start = time.perf_counter()
    tokens = call(new)
    first = time.perf_counter() - start
    if len(tokens[0]) != new:  # (recorded as the part's error)
        raise RuntimeError(f"expected {new} new tokens, got {len(tokens[0])}")
    t_new, times = timed(lambda: call(new), repeats, warmup=0)
    rates = {"datasheet": datasheet / read_bytes, "measured_copy": copy_rate / read_bytes,
             "measured_matvec": matvec_rate / read_bytes}
    whole = new / t_new
    result = {"prompt_tokens": sizes["prompt"], "new_tokens": new, "compile_and_first_call_s": first,
              "call_s": t_new, "call_s_all": times, "tokens_per_s_whole_call": whole,
              "roofline_tokens_per_s": rates,
              "whole_call_vs_roofline": {k: whole / r for k, r in rates.items()}}
    rec.put(P, "result", result)
    log(f"  c. {new} new tokens in {t_new:.3f} s: {whole:,.0f} tokens/s (prefill included); roofline "
        f"{rates['datasheet']:,.0f} (datasheet) / {rates['measured_matvec']:,.0f} (matvec) tokens/s")

    # decoding alone: minus a call that only prefills and picks one token
    start = time.perf_counter()
    call(1)
    result["prefill_only_compile_and_first_call_s"] = time.perf_counter() - start
    t_one, _ = timed(lambda: call(1), repeats, warmup=0)
    decode_rate = (new - 1) / max(t_new - t_one, 1e-9)
    result.update(prefill_call_s=t_one, tokens_per_s_decode_only=decode_rate,
                  decode_only_vs_roofline={k: decode_rate / r for k, r in rates.items()})
    rec.put(P, "result", result)
    log(f"  c. decoding alone: {decode_rate:,.0f} tokens/s = {decode_rate / rates['datasheet']:.0%} of the datasheet "
        f"roofline, {decode_rate / rates['measured_matvec']:.0%} of the measured (matvec) one")
    profiled(args, rec, P, lambda: call(new), new, "new token (one whole call: prefill included)")


# ---- main --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_results.json", help="results JSON, rewritten as figures come in")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, one step of each part")
    parser.add_argument("--parts", nargs="+", default=list("abcde"), choices=list("abcde"))
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed repeats of decoding calls")
    parser.add_argument("--repeats-attention", type=positive_int, default=20, help="timed repeats of attention calls")
    parser.add_argument("--steps", type=positive_int, default=8, help="timed train steps (after 2 warm-up steps)")
    parser.add_argument("--mfu-candidates", type=_candidates, default="16:none,8:none,16:dots,8:dots,8:full,4:full",
                        help="batch:remat_policy pairs tried in order until one fits")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak, used only if llama_jax.metrics does not know the device")
    parser.add_argument("--hbm-tbps", type=float, default=4.8,
                        help="datasheet HBM bandwidth, TB/s, used only if llama_jax.metrics does not know the device")
    parser.add_argument("--scan-layers", type=_yes_no, default=True, metavar="{true,false}",
                        help="train steps with scanned layers (the project's default) or unrolled ones")
    parser.add_argument("--profile", metavar="DIR", help="also trace each train step and decoding part into "
                        "DIR/PART with jax.profiler and record a kernel-time summary (benchmarks/trace_summary.py)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="parts not yet started when this many seconds have passed are skipped")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_dir():
        parser.error(f"--out {out} is a directory; give the path of the results file, e.g. {out / 'gpu_results.json'}")
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder of the path should be, or no permission
        parser.error(f"--out {out}: cannot create its folder ({e.strerror}); give a writable path")
    if args.profile is not None:
        blocking = file_in_the_way(Path(args.profile))
        if blocking is not None:
            parser.error(f"--profile {args.profile}: {blocking} is a file; give a folder for the traces")
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    if jax.device_count() > 1:  # the train step would shard over them all, and MFU is of one device's peak
        parser.error(f"it measures one device and this process sees {jax.device_count()}; give it one "
                     f"(CUDA_VISIBLE_DEVICES=0 on a GPU host; on CPU, XLA_FLAGS without "
                     f"--xla_force_host_platform_device_count)")
    start = time.perf_counter()
    rec = Recorder(args.out)
    rec.put("meta", "status", "running")
    rec.put("meta", "note", "--dry-run: tiny shapes on CPU, not GPU figures" if args.dry_run
            else "measured by benchmarks/gpu.py")
    environment(args, rec)
    if not args.dry_run and jax.default_backend() != "gpu":
        log(f"warning: backend is {jax.default_backend()!r}, not gpu; cuDNN parts will fail (use --dry-run on CPU)")
    parts = {"a": ("a_attention", lambda: part_attention(args, rec)),
             "b": ("b_mfu_cudnn", lambda: part_mfu(args, rec, "cudnn", "b_mfu_cudnn")),
             "c": ("c_decode", lambda: part_decode(args, rec)),
             "d": ("d_mfu_xla_reference", lambda: part_mfu(args, rec, "xla", "d_mfu_xla_reference")),
             "e": ("e_mfu_cudnn_packed", lambda: part_mfu(args, rec, "cudnn_packed", "e_mfu_cudnn_packed"))}
    for key in "abcde":
        if key not in args.parts:
            continue
        name, fn = parts[key]
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            rec.put(name, "skipped", f"time budget: {elapsed:.0f} s > --budget-s {args.budget_s:.0f}")
            log(f"{name}: skipped (time budget)")
            continue
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            fn()
            rec.put(name, "status", "ok")
        except Exception as e:
            rec.put(name, "status", "failed")
            rec.put(name, "error", f"{type(e).__name__}: {e}"[:3000])
            rec.put(name, "traceback", traceback.format_exc()[-6000:])
            log(f"{name}: FAILED {type(e).__name__}: {str(e)[:500]}")
        rec.put(name, "part_seconds", time.perf_counter() - t0)
        gc.collect()
        try:
            jax.clear_caches()
        except Exception:
            pass
    rec.put("meta", "status", "done")
    rec.put("meta", "total_seconds", time.perf_counter() - start)
    log(f"done in {time.perf_counter() - start:.0f} s; results in {args.out}")
    summary(rec.data)
    return 0


def summary(data: dict) -> None:
    """A markdown table of the headline figures."""
    rows = []
    a = data.get("a_attention", {})
    for name, ratio in (a.get("time_ratios") or {}).items():
        entry = a.get(name, {})
        rows.append((f"attention fwd+bwd: {name}", f"{entry.get('fwd_bwd_ms', float('nan')):.2f} ms",
                     f"x project cudnn {ratio['x_project_cudnn_time'] or float('nan'):.2f}, "
                     f"x xla {ratio['x_xla_time'] or float('nan'):.2f}; output max abs diff vs f32 "
                     f"{entry.get('vs_xla_f32', {}).get('out', float('nan')):.3g}"))
    for part in ("b_mfu_cudnn", "d_mfu_xla_reference", "e_mfu_cudnn_packed"):
        r = data.get(part, {}).get("result")
        if r:
            rows.append((f"train step ({data[part]['attention_impl']} attention), batch {r['batch']} x {r['seq_len']}, "
                         f"remat {r['remat_policy']}", f"{r['tokens_per_s']:,.0f} tokens/s",
                         f"MFU {r['mfu']:.1%} ({r['tflops_per_s']:.0f} TFLOP/s)"))
    r = data.get("c_decode", {}).get("result")
    if r:
        rows.append(("batch-1 greedy decode, whole call", f"{r['tokens_per_s_whole_call']:,.0f} tokens/s",
                     f"x datasheet roofline {r['whole_call_vs_roofline']['datasheet']:.2f}"))
        if "tokens_per_s_decode_only" in r:
            rows.append(("batch-1 greedy decode, decoding alone", f"{r['tokens_per_s_decode_only']:,.0f} tokens/s",
                         f"x datasheet roofline {r['decode_only_vs_roofline']['datasheet']:.2f}, x measured (matvec) "
                         f"{r['decode_only_vs_roofline']['measured_matvec']:.2f}"))
    print("\n| measurement | figure | against |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
