"""Training: sharded state, the jitted train step, and the loop.

The state is created directly sharded: `jax.eval_shape` of the initialiser gives the abstract
(logically partitioned) state, the rules table turns it into shardings, and `jit(init,
out_shardings=...)` materialises each shard on its device. The train step is one `jax.jit` with
explicit in/out shardings and the state donated (on CPU two, gradients then update:
`Trainer.step`); one step consumes one global batch, split into `grad_accum` micro-batches
accumulated with `lax.scan`. A batch is a dict of [global_batch, seq_len] arrays (int32 tokens,
targets, positions and segment_ids, a float32 loss_mask); batches of prepared data also hold "source"
[global_batch], the index of the mixture source each row comes from.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import loss as loss_lib
from llama_jax import optim
from llama_jax import backend_tuning
from llama_jax.config import LLaMAConfig, check_seed
from llama_jax.model import LLaMA, check_params, initial_params
from llama_jax.sharding import BATCH_AXES, LOGICAL_AXIS_RULES, batch_sharding, mesh_context, tree_shardings


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array  # steps whose loss or gradient was not finite (their update was not applied)


AUX_KEYS = ("nll", "z_loss", "tokens", "accuracy")
BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")  # each [batch, seq]


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything the step needs that is not an array: model, optimizer, mesh and settings.
    `sources`: the names of a mixture's sources, in the order of a batch's "source" ids; with two
    or more, the step also returns each source's summed token losses and targets
    ("source_nll", "source_tokens"; `per_source_nll` turns them into means)."""

    model_config: LLaMAConfig
    optimizer: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]
    mesh: Mesh
    grad_accum: int = 1
    z_loss: float = 0.0
    rules: tuple = LOGICAL_AXIS_RULES
    sources: tuple[str, ...] = ()

    def context(self, per_device_attention: bool = True):
        """The trainer's mesh and rules for tracing the model (`sharding.mesh_context`)."""
        return mesh_context(self.mesh, self.rules, per_device_attention)

    # ---- state -----------------------------------------------------------------------------
    def _init(self, rng):
        params = initial_params(self.model_config, rng)
        return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params), jnp.zeros((), jnp.int32))

    @functools.cached_property
    def abstract_state(self):
        """The boxed (logically partitioned) abstract state; nothing is allocated. Traced as `init_state`
        runs it, whatever context it is first asked for in (inside `context()`, per-device attention
        would be given the 1-token dummy batch, which the batch axes cannot divide)."""
        with self.context(per_device_attention=False):
            return jax.eval_shape(self._init, jax.random.key(0))

    @functools.cached_property
    def state_shardings(self):
        return tree_shardings(self.mesh, self.abstract_state, self.rules)

    def init_state(self, seed: int) -> TrainState:
        """A freshly initialised state, created shard by shard on its devices; ValueError (one line)
        for a state that does not fit in their memory."""
        check_seed(seed)
        init = jax.jit(lambda rng: nn.meta.unbox(self._init(rng)), out_shardings=self.state_shardings)
        try:  # (a GPU or TPU may refuse the call itself; on CPU, reading one output of a computation
            # that could not allocate another waits forever, so the whole state is waited for here)
            with self.context(per_device_attention=False):  # initialised on a 1-token dummy batch
                return jax.block_until_ready(init(jax.random.key(seed)))
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            gib = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nn.meta.unbox(self.abstract_state))) / 2**30
            devices = f"{self.mesh.size} {self.mesh.devices.flat[0].platform.upper()} device(s)"
            reason = str(e).splitlines()[0].rstrip(".")
            raise ValueError(f"the train state ({gib:,.1f} GiB of parameters and optimizer state) does not fit in the "
                             f"memory of {devices} ({reason}); train a smaller model, or shard the state over more "
                             f"devices (mesh.fsdp)") from None

    # ---- step ------------------------------------------------------------------------------
    def _per_source(self, batch) -> bool:
        return len(self.sources) > 1 and "source" in batch

    def micro_loss(self, params, micro, total_tokens):
        """(share of the global mean loss, aux) of one micro-batch: its mean loss weighted by its
        share of the batch's tokens, so that summing over micro-batches gives the global mean
        (per-source sums, when kept, are plain sums)."""
        logits = LLaMA(self.model_config).apply({"params": params}, micro["tokens"], positions=micro["positions"],
                                                segment_ids=micro["segment_ids"])
        per_source = self._per_source(micro)
        mean_loss, aux = loss_lib.vocab_parallel_cross_entropy(
            logits, micro["targets"], micro["loss_mask"], self.mesh, z_loss=self.z_loss, per_row=per_source)
        weight = aux["tokens"] / total_tokens
        out = {k: aux[k] if k == "tokens" else aux[k] * weight for k in AUX_KEYS}
        if per_source:
            # summed, not multiplied by the one-hot as matrices: GPUs and TPUs compute a float32 matmul in
            # TF32 or bfloat16 by default, which rounds a row's 4093 targets to 4096
            one_hot_BxN = (micro["source"][:, None] == jnp.arange(len(self.sources))).astype(jnp.float32)
            out["source_nll"] = jnp.sum(aux["row_nll"][:, None] * one_hot_BxN, axis=0)
            out["source_tokens"] = jnp.sum(aux["row_tokens"][:, None] * one_hot_BxN, axis=0)
        return mean_loss * weight, out

    def loss_and_grads(self, params, batch, total_tokens):
        """Summed over micro-batches: grads of (sum of token losses / total_tokens)."""
        grad_fn = jax.value_and_grad(self.micro_loss, has_aux=True)
        if self.grad_accum == 1:
            (loss, aux), grads = grad_fn(params, batch, total_tokens)
            return loss, aux, grads

        k = self.grad_accum
        micro_batches = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)
        micro_batches = jax.lax.with_sharding_constraint(
            micro_batches, NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXES)))
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def body(carry, micro):
            loss_sum, aux_sum, grad_sum = carry
            (loss, aux), grads = grad_fn(params, micro, total_tokens)
            return (loss_sum + loss, jax.tree.map(jnp.add, aux_sum, aux),
                    jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)), None

        aux_zeros = {k: jnp.zeros((), jnp.float32) for k in AUX_KEYS}
        if self._per_source(batch):
            aux_zeros.update(source_nll=jnp.zeros(len(self.sources)), source_tokens=jnp.zeros(len(self.sources)))
        (loss, aux, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), aux_zeros, zeros), micro_batches)
        return loss, aux, grads

    def gradients(self, params, batch: dict) -> tuple[jax.Array, dict, Any]:
        """(mean loss, aux, gradients in the parameters' dtypes) of one global batch."""
        total_tokens = jnp.maximum(batch["loss_mask"].sum(), 1).astype(jnp.float32)
        loss, aux, grads = self.loss_and_grads(params, batch, total_tokens)
        return loss, aux, jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def apply_gradients(self, state: TrainState, loss, aux: dict, grads) -> tuple[TrainState, dict]:
        """The optimizer update, and the step's metrics."""
        grad_norm = optim.global_norm(grads)  # (in float32, as clipping measures it)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient leaves parameters and optimizer state as they were, so the
        # state (and every checkpoint of it) stays finite; the run loop decides to stop or go on.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        # the rate of this update: the optimizer counts applied updates only, so a skipped step does
        # not move its schedule (nor Adam's bias correction)
        metrics = {"loss": loss, **aux, "grad_norm": grad_norm,
                   "learning_rate": self.schedule(state.step - state.skipped)}
        return TrainState(state.step + 1, params, opt_state, state.skipped + (~finite).astype(jnp.int32)), metrics

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self.apply_gradients(state, *self.gradients(state.params, batch))

    @functools.cached_property
    def compiler_options(self) -> dict[str, str]:
        """This project's XLA options for the mesh's backend (`llama_jax.backend_tuning`), fixed
        for the trainer's life at first use."""
        return backend_tuning.compiler_options(self.mesh.devices.flat[0].platform)

    @functools.cached_property
    def _replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @functools.cached_property
    def jit_train_step(self):
        """`train_step` under jit with explicit shardings and the state donated (pjit): the whole
        step as one program, compiled with XLA's defaults, as a backend without `compiler_options`
        (GPU, TPU) runs it; where there are options (CPU), `step` runs two programs instead, and
        `llama-jax plan` compiles this one for the accelerator's figures (with the CPU's options,
        which `step` keeps off the optimizer update, it planned temporaries no accelerator holds)."""
        return jax.jit(self.train_step,
                       in_shardings=(self.state_shardings, batch_sharding(self.mesh)),
                       out_shardings=(self.state_shardings, self._replicated), donate_argnums=0)

    @functools.cached_property
    def jit_gradients(self):
        """`gradients` under jit, compiled with `compiler_options`."""
        return jax.jit(self.gradients, in_shardings=(self.state_shardings.params, batch_sharding(self.mesh)),
                       out_shardings=(self._replicated, self._replicated, self.state_shardings.params),
                       compiler_options=self.compiler_options)

    @functools.cached_property
    def jit_apply_gradients(self):
        """`apply_gradients` under jit with XLA's defaults and the state donated."""
        state, replicated = self.state_shardings, self._replicated
        return jax.jit(self.apply_gradients, in_shardings=(state, replicated, replicated, state.params),
                       out_shardings=(state, replicated), donate_argnums=0)

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One train step. With this project's compiler options for the backend (CPU), the
        gradients and the optimizer update are two programs, the update compiled without them
        (`llama_jax.backend_tuning` says why); otherwise the whole step is one program."""
        if not isinstance(state, TrainState):
            raise TypeError(f"state must be a TrainState (trainer.init_state(seed)), got a {type(state).__name__}")
        _check_batch(batch)
        with self.context():
            if self.compiler_options:
                return self.jit_apply_gradients(state, *self.jit_gradients(state.params, batch))
            return self.jit_train_step(state, batch)

    def eval_metrics(self, params, batch: dict) -> dict:
        """Mean loss, nll, accuracy and token count of one batch, without updating anything."""
        check_params(self.model_config, params)
        _check_batch(batch)
        with self.context():
            return self._jit_eval(params, batch)

    @functools.cached_property
    def _jit_eval(self):
        def evaluate(params, batch):
            total = jnp.maximum(batch["loss_mask"].sum(), 1).astype(jnp.float32)
            loss, aux = self.micro_loss(params, batch, total)
            return {"loss": loss, **aux}

        return jax.jit(evaluate, in_shardings=(self.state_shardings.params, batch_sharding(self.mesh)),
                       compiler_options=self.compiler_options)


def _check_batch(batch) -> None:
    """ValueError unless `batch` is a dict holding every one of BATCH_KEYS (a missing one was a KeyError)."""
    missing = [k for k in BATCH_KEYS if k not in batch] if isinstance(batch, Mapping) else list(BATCH_KEYS)
    if missing:
        raise ValueError(f"batch must be a dict of [batch, seq] arrays {', '.join(BATCH_KEYS)} (as "
                         f"llama_jax.data.synthetic_batch makes); missing: {', '.join(missing)}")


def per_source_nll(sources: tuple[str, ...], metrics: dict) -> dict[str, float]:
    """`nll/NAME`: each source's mean next-token loss (no z-loss term) over its rows of the step, from
    a step's fetched metrics; sources without rows in the step are left out."""
    if "source_nll" not in metrics:
        return {}
    return {f"nll/{name}": float(nll / tokens)
            for name, nll, tokens in zip(sources, metrics["source_nll"], metrics["source_tokens"]) if tokens > 0}


def global_batch(mesh: Mesh, local: dict[str, np.ndarray], rows: int | None = None) -> dict[str, jax.Array]:
    """Global arrays of `rows` rows from this process's rows of the batch (`sharding.process_rows`;
    None: the local rows are all of them, as in a single process). The global shape is given: where
    a shard of rows spans processes (its data x fsdp devices split between them), JAX cannot infer
    it from the local rows."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(
        sharding, np.asarray(v), (len(v) if rows is None else rows, *np.shape(v)[1:])) for k, v in local.items()}


# ---- the run ---------------------------------------------------------------------------------


def validate_config(config, n_devices: int, run_model: LLaMAConfig | None = None) -> LLaMAConfig:
    """Every user-facing check that can fail, before anything is compiled (`run_model`: as in
    `experiment.model_config`). Returns the model's config."""
    from llama_jax.attention import check_available, check_splash_length, resolve
    from llama_jax.experiment import check_config
    from llama_jax.mesh_axes import check_mesh_and_batch

    model = check_config(config, run_model=run_model)
    try:
        check_available(model.attention_impl)
    except ValueError as e:
        raise ValueError(f"model.{e}") from None
    if resolve(model.attention_impl) == "splash":  # on this backend
        check_splash_length(config.train.seq_len)
    check_mesh_and_batch(config, n_devices)
    return model


def build_trainer(config, devices=None, run_model: LLaMAConfig | None = None) -> Trainer:
    """The Trainer of `config` on `devices` (default: all). `run_model`: the model of the run being
    resumed, which stands for a `model.preset=init_from` directory (`experiment.model_config`)."""
    import ml_collections

    from llama_jax.sharding import check_divisible, make_mesh

    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(f"config must be an experiment config (llama_jax.experiment.load_config(path, overrides)), "
                        f"got {type(config).__name__}")
    given, devices = devices, jax.devices() if devices is None else list(np.ravel(devices))
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise TypeError(f"devices must be a list of JAX devices (e.g. jax.devices()[:4]), got {given!r}")
    model = validate_config(config, len(devices), run_model)  # (the init_from directory read once)
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    check_divisible(model, mesh)
    return Trainer(model, optim.make_optimizer(config.optimizer, config.train.steps),
                   optim.make_schedule(config.optimizer, config.train.steps), mesh,
                   grad_accum=config.train.grad_accum, z_loss=config.train.z_loss)
