"""Model configuration: `LLaMAConfig`, named presets and Hugging Face config.json translation.

Field names follow Meta's `params.json` (`dim`, `n_layers`, `n_heads`, ...). Everything a
converter, a sharding rule or a FLOPs formula needs to know about the model's shape lives here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import sys
from typing import Any, Mapping

import numpy as np

ROPE_TYPES = ("llama3", "linear")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "qkv_proj")
ATTENTION_IMPLS = ("xla", "dot_product", "cudnn", "cudnn_packed", "splash", "auto")
COMPUTE_FIELDS = ("dtype", "param_dtype", "remat_policy", "scan_layers", "attention_impl")  # how, not what


def is_int(value: object) -> bool:
    """A Python, NumPy or JAX integer (a 0-d array too), not a bool."""
    if hasattr(value, "dtype"):
        try:
            return np.ndim(value) == 0 and np.issubdtype(value.dtype, np.integer)
        except TypeError:  # a dtype NumPy cannot read (a JAX random key's)
            return False
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling.

    `llama3`: LLaMA-3.1+ wavelength-dependent scaling (uses all fields).
    `linear`: every inverse frequency divided by `factor` (position interpolation).
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type: unknown rope type {self.rope_type!r}; valid: {', '.join(ROPE_TYPES)}"
            )
        _check_number("rope_scaling.factor", self.factor, rotary=True)
        for name in ("low_freq_factor", "high_freq_factor"):
            _check_number(f"rope_scaling.{name}", getattr(self, name), positive=self.rope_type == "llama3")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):  # a NumPy float is no JSON number
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.rope_type == "llama3":
            if not self.high_freq_factor > self.low_freq_factor:
                raise ValueError(
                    "rope_scaling: need high_freq_factor > low_freq_factor > 0, got "
                    f"{self.high_freq_factor} and {self.low_freq_factor}"
                )
            value = self.original_max_position_embeddings
            if not is_int(value) or value <= 0:
                raise ValueError(f"rope_scaling.original_max_position_embeddings must be a positive integer, "
                                 f"got {value!r}")
            object.__setattr__(self, "original_max_position_embeddings", int(value))  # a NumPy integer too

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RopeScaling":
        if isinstance(d, (str, bytes)) or not hasattr(d, "keys"):  # (a mapping or a ConfigDict)
            raise ValueError(f"rope_scaling must be a dict such as {{'rope_type': 'linear', 'factor': 2.0}}, "
                             f"got {d!r}")
        d = dict(d)
        if "rope_type" in d and "type" in d and d["rope_type"] != d["type"]:
            raise ValueError(f"rope_scaling gives rope_type {d['rope_type']!r} and type {d['type']!r}; give one")
        rope_type = d.pop("rope_type", d.pop("type", None))
        if rope_type is None:
            raise ValueError("rope_scaling: missing 'rope_type'; valid: " + ", ".join(ROPE_TYPES))
        d.pop("rope_theta", None)  # transformers-5 keeps theta beside the scaling keys
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
        unknown = sorted(set(d) - fields)
        used = sorted(fields) if rope_type == "llama3" else ["factor"]  # (linear ignores the others, as transformers)
        if unknown and rope_type in ROPE_TYPES:
            raise ValueError(f"rope_scaling: unknown key(s) {unknown}; valid for rope_type {rope_type!r}: {used}")
        # a file gives every value its type uses: none is taken from the LLaMA-3.1 defaults above
        missing = sorted(set(used) - set(d)) if rope_type in ROPE_TYPES else []
        if missing:
            raise ValueError(f"rope_scaling of type {rope_type!r} without {', '.join(missing)}; "
                             f"it needs {', '.join(used)}")
        return cls(rope_type=rope_type, **{k: v for k, v in d.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LLaMAConfig:
    """Shape and numerics of a LLaMA model.

    The first block of fields is the architecture (what a checkpoint fixes); the second block is
    how it is computed (free to change between training and inference).
    """

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (multi-head attention)
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False

    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters (master weights)
    remat_policy: str = "none"  # which activations to keep for the backward pass
    scan_layers: bool = True  # one compiled layer applied with nn.scan
    attention_impl: str = "xla"

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not is_int(value) or not 0 < value <= MAX_SIZE:
                raise ValueError(f"{name} must be a positive integer up to 2**31 - 1, got {value!r}")
            object.__setattr__(self, name, int(value))  # a NumPy integer too, stored as Python's
        for name in ("norm_eps", "rope_theta"):
            _check_number(name, getattr(self, name), rotary=name == "rope_theta")
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("tie_embeddings", "scan_layers"):
            check_flag(getattr(self, name), name)
            object.__setattr__(self, name, bool(getattr(self, name)))  # a NumPy bool too, stored as Python's
        if self.dim % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling, a dict or None, got {self.rope_scaling!r}")
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("param_dtype", self.param_dtype, DTYPES)
        _check_choice("remat_policy", self.remat_policy, REMAT_POLICIES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def replace(self, **changes) -> "LLaMAConfig":
        """A copy with `changes`. Fields not changed keep their values: n_kv_heads too (None at
        construction stands for n_heads then), so a new n_heads alone makes grouped-query attention
        of a multi-head model; give n_kv_heads as well to keep it multi-head."""
        _check_field_names(changes)
        return dataclasses.replace(self, **changes)

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LLaMAConfig":
        if isinstance(d, (str, bytes)) or not hasattr(d, "keys"):  # (a string's characters were named as unknown
            # fields; a mapping or an ml_collections ConfigDict is taken)
            raise TypeError(f"LLaMAConfig.from_dict takes a dict of fields, got {type(d).__name__}; for a JSON text, "
                            f"from_dict(json.loads(text))")
        _check_field_names(d)
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LLaMAConfig":
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"preset: unknown value {name!r}; valid: {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

    # ---- Hugging Face config.json ----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "LLaMAConfig":
        """Read a `LlamaForCausalLM` config.json dict (transformers 4.x/Hub or 5.x style)."""
        return from_hf_config(hf, **overrides)

    def to_hf(self, style: str = "v4") -> dict[str, Any]:
        """A config.json dict; `style="v4"` (Hub / transformers 4.x keys) or `"v5"` (rope_parameters)."""
        return to_hf_config(self, style)


def check_model_config(config: object, name: str = "config") -> None:
    """TypeError unless `config` is an LLaMAConfig (a dict of its fields or a preset's name is not)."""
    if not isinstance(config, LLaMAConfig):
        got = "a dict of its fields" if isinstance(config, Mapping) else f"a {type(config).__name__}"
        raise TypeError(f"{name} must be an LLaMAConfig (LLaMAConfig.from_preset(name) or LLaMAConfig.from_dict(d)), "
                        f"got {got}")


def check_flag(value: object, name: str) -> None:
    """ValueError unless `value` is True or False (a NumPy bool too): a truthy string such as "no"
    would otherwise switch an option on."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_seed(seed: object, name: str = "seed") -> None:
    """ValueError unless `seed` is an integer in [0, 2**32): a JAX key (without x64) and Grain keep
    32 bits, so 2**32 + 5 would be seed 5 and -1 seed 2**32 - 1."""
    if not (is_int(seed) and 0 <= int(seed) < 2**32):
        raise ValueError(f"{name} must be an integer in [0, 2**32), got {seed!r}")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(LLaMAConfig)]


def _check_field_names(names) -> None:
    """ValueError naming those of `names` that are not LLaMAConfig fields, with the valid ones."""
    unknown = sorted(set(names) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown LLaMAConfig field(s) {unknown}; valid: {field_names()}")


FLOAT32_MAX = float(np.finfo(np.float32).max)  # settings are used in float32: larger ones become inf there
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # its smallest normal number: XLA flushes smaller ones to 0
MAX_SIZE = 2**31 - 1  # model sizes index arrays in int32


def in_float32_range(value: numbers.Real) -> bool:
    """Whether `value` is a finite number that stays finite in float32 (|value| about 3.4e38 or less:
    below the midpoint between float32's largest value and 2**128, from which it rounds to inf)."""
    # as a Python float: a NumPy float32 would be compared in float32, where the bound is inf; a
    # whole number is compared as it is (float() of 10**400 raises OverflowError)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return abs(int(value)) < 2**128 - 2**103
    return _finite_float(value) and abs(float(value)) < 2.0**128 - 2.0**103


def _is_real(value: object) -> bool:
    """A Python, NumPy or JAX integer or floating-point number (a 0-d array too), not a bool."""
    if hasattr(value, "dtype"):
        import jax.numpy as jnp  # (for JAX's own dtypes, bfloat16's among them; only for arrays)

        return np.ndim(value) == 0 and (jnp.issubdtype(value.dtype, jnp.integer)
                                        or jnp.issubdtype(value.dtype, jnp.floating))
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_traced(value: object) -> bool:
    """A value JAX is tracing (under jit), whose number is not known yet; none before JAX is imported."""
    jax = sys.modules.get("jax")
    return jax is not None and isinstance(value, jax.core.Tracer)


def check_sample_filters(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the first of temperature, top_k and top_p out of range or of the wrong
    kind (None: no top-k or top-p filter). A traced value is taken as it is (`sample_logits` under jit)."""
    if not is_traced(temperature) and not (_is_real(temperature) and 0 <= temperature < math.inf):  # (NaN: False)
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if not is_traced(temperature) and not in_float32_range(temperature):  # logits are divided by it in float32
        raise ValueError(f"temperature must be at most {FLOAT32_MAX:.1e} (float32's range), got {temperature!r}")
    if top_k is not None and not is_traced(top_k) and not (is_int(top_k) and int(top_k) >= 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not is_traced(top_p) and not (_is_real(top_p) and 0 < float(top_p) <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   seed: int) -> None:
    """Raise ValueError naming the first sampling option out of range or of the wrong kind
    (`llama_jax.generate.generate`'s own check, callable before a model is loaded, or JAX imported)."""
    if not (is_int(max_new_tokens) and int(max_new_tokens) >= 1):
        raise ValueError(f"max_new_tokens must be an integer of at least 1, got {max_new_tokens!r}")
    check_sample_filters(temperature, top_k, top_p)
    check_seed(seed)


def _check_number(name: str, value: Any, positive: bool = True, rotary: bool = False) -> None:
    """ValueError naming `name` unless `value` is a finite real number within float32's range (and
    positive, if `positive`; at least 1, if `rotary`: the rotary frequencies are divided by the
    powers of rope_theta and by rope_scaling.factor, and below 1 they grow, past float32's range
    near 0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite_float(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not in_float32_range(value):
        raise ValueError(f"{name} must be within float32's range (|x| <= {FLOAT32_MAX:.1e}), in which it is used; "
                         f"got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    if rotary and value < 1:
        raise ValueError(f"{name} must be at least 1 (the rotary frequencies are divided by it), got {value!r}")


_SETTING_KINDS = {"count": "a positive integer", "number": "a positive number", "flag": "true or false"}


def file_setting(settings: Mapping[str, Any], where: str, key: str, kind: str, default: Any = None,
                 nullable: bool = False) -> Any:
    """`settings[key]` (`default` when absent; None when null and `nullable`) if it is of `kind`:
    "count" (a positive integer), "number" (a positive finite number) or "flag" (true or false);
    else ValueError "{where}: {key} must be ..., got ..." (a file's settings are never coerced:
    "false" is not False)."""
    value = settings.get(key, default)
    if value is None and nullable:
        return None
    if kind == "flag":
        fine = isinstance(value, bool)
    elif kind == "count":
        fine = isinstance(value, int) and not isinstance(value, bool) and value > 0
    else:
        fine = isinstance(value, numbers.Real) and not isinstance(value, bool) and value > 0 and _finite_float(value)
    if not fine:
        raise ValueError(f"{where}: {key} must be {_SETTING_KINDS[kind]}, got {value!r}")
    return value


def _finite_float(value: numbers.Real) -> bool:
    """Whether `value` is a finite float (an int past float's range is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if not isinstance(value, str):  # (a NumPy dtype equals its name, but is no name: it cannot be saved)
        raise ValueError(f"{name}: {value!r} is a {type(value).__name__}; give one of the names {', '.join(valid)}")
    if value not in valid:
        raise ValueError(f"{name}: unknown value {value!r}; valid: {', '.join(valid)}")


# ---- Hugging Face translation ----------------------------------------------------------------

_HF_DEFAULT_ROPE_TYPES = ("default", None)


def _with_top_level_context(hf: Mapping[str, Any], key: str, scaling: Mapping[str, Any]) -> Mapping[str, Any]:
    """A llama3 `scaling` (the `key` object of config.json) with the top-level
    original_max_position_embeddings some files carry beside it, which transformers 5 puts over the
    scaling's own; ValueError when both are given and differ (transformers 4 reads only the second)."""
    if hf.get("original_max_position_embeddings") is None:
        return scaling
    top = file_setting(hf, "config.json", "original_max_position_embeddings", "count")
    inner = scaling.get("original_max_position_embeddings")
    if inner is not None and inner != top:
        raise ValueError(f"config.json: original_max_position_embeddings={top} and {key}.original_max_position_"
                         f"embeddings={inner!r} differ (transformers 5 reads the first, 4.x the second); make them "
                         f"agree")
    return {**scaling, "original_max_position_embeddings": top}


def _whole_head_rotary(hf: Mapping[str, Any], key: str, scaling: Mapping[str, Any]) -> Mapping[str, Any]:
    """`scaling` without the partial_rotary_factor it or the top level may give (transformers 5 writes
    1.0); ValueError for any other value: LLaMA rotates every dimension of a head (transformers fails
    on a smaller factor with linear or llama3 scaling, and ignores it without)."""
    for where, holder in (("", hf), (f"{key}.", scaling)):
        factor = holder.get("partial_rotary_factor", 1)
        if factor != 1 or isinstance(factor, bool):
            raise ValueError(f"config.json: {where}partial_rotary_factor={factor!r} is not supported; LLaMA rotates "
                             f"whole heads (partial_rotary_factor 1.0)")
    return {k: v for k, v in scaling.items() if k != "partial_rotary_factor"}


def from_hf_config(hf: Mapping[str, Any], **overrides) -> LLaMAConfig:
    if not isinstance(hf, Mapping):
        raise ValueError(f"config.json: expected a JSON object of model settings, got {type(hf).__name__}")
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; valid: 'llama'")
    for key, fine in (("attention_bias", False), ("mlp_bias", False)):
        if key in hf and hf[key] != fine:
            raise ValueError(f"config.json: {key}={hf[key]!r} is not supported; LLaMA uses {key}={fine!r}")
    if hf.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' two names of one function
        raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported; LLaMA uses 'silu' (or its "
                         f"other name 'swish')")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise ValueError(f"config.json: missing required key {key!r}")

    setting = functools.partial(file_setting, hf, "config.json")
    n_heads, dim = setting("num_attention_heads", "count"), setting("hidden_size", "count")
    head_dim = setting("head_dim", "count", nullable=True)
    if head_dim is not None and head_dim * n_heads != dim:
        raise ValueError(
            f"config.json: head_dim={head_dim} with num_attention_heads={n_heads} does not give "
            f"hidden_size={dim}; only head_dim = hidden_size / num_attention_heads is supported"
        )

    # transformers 5.x: rope_parameters holds theta and scaling; 4.x: top-level rope_theta + rope_scaling.
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], Mapping):
            raise ValueError(f"config.json: {key} must be an object or null, got {hf[key]!r}")
    # as transformers reads them (4.x knows only rope_scaling; 5.x takes a non-empty one over rope_parameters)
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    scaling = hf.get(key)
    if scaling is not None and "rope_theta" in scaling:
        rope_theta = file_setting(scaling, f"config.json: {key}", "rope_theta", "number")
    else:
        rope_theta = setting("rope_theta", "number", 10000.0)
    rope_scaling = None
    scaling = _whole_head_rotary(hf, key, scaling or {})
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "llama3":
            scaling = _with_top_level_context(hf, key, scaling)
        # no type is the default only for an object of nothing but theta: {"factor": 8} was dropped silently
        if rope_type not in _HF_DEFAULT_ROPE_TYPES or rope_type is None and set(scaling) - {"rope_theta"}:
            rope_scaling = RopeScaling.from_dict(scaling)
        elif unused := sorted(set(scaling) - {"rope_type", "type", "rope_theta"}):
            raise ValueError(f"config.json: {key} of rope_type 'default' has key(s) {unused}, which that type does "
                             f"not use; give rope_type 'linear' or 'llama3' to scale, or remove them")

    fields = dict(
        vocab_size=setting("vocab_size", "count"),
        dim=dim,
        n_layers=setting("num_hidden_layers", "count"),
        n_heads=n_heads,
        n_kv_heads=setting("num_key_value_heads", "count", nullable=True) or n_heads,
        ffn_dim=setting("intermediate_size", "count"),
        norm_eps=setting("rms_norm_eps", "number", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        max_seq_len=setting("max_position_embeddings", "count", 2048),
        tie_embeddings=setting("tie_word_embeddings", "flag", False),
    )
    _check_field_names(overrides)
    fields.update(overrides)
    try:
        return LLaMAConfig(**fields)
    except ValueError as e:
        if any(re.search(rf"\b{name}\b", str(e)) for name in overrides):  # an override's problem, named as given
            raise
        named = re.sub(r"\b(" + "|".join(HF_KEYS) + r")\b", lambda m: HF_KEYS[m.group(1)], str(e))
        raise ValueError(f"config.json: {named}") from None


HF_KEYS = {"dim": "hidden_size", "ffn_dim": "intermediate_size", "n_layers": "num_hidden_layers",
           "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps",
           "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings"}
# config.json's names of LLaMAConfig fields whose names differ, for messages about a file


def to_hf_config(cfg: LLaMAConfig, style: str = "v4") -> dict[str, Any]:
    if style not in ("v4", "v5"):
        raise ValueError(f"style: unknown config.json style {style!r}; valid: v4, v5")
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    scaling = cfg.rope_scaling.to_dict() if cfg.rope_scaling else None
    if style == "v4":
        out["rope_theta"] = cfg.rope_theta
        out["rope_scaling"] = scaling
        out["torch_dtype"] = cfg.param_dtype
    else:
        out["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
        out["dtype"] = cfg.param_dtype
    return out


# ---- presets ---------------------------------------------------------------------------------

_LLAMA31_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
_LLAMA32_SCALING = RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def _llama1(dim, n_layers, n_heads, ffn_dim):
    return LLaMAConfig(32000, dim, n_layers, n_heads, n_heads, ffn_dim, 1e-6, 10000.0, None, 2048)


def _llama2(dim, n_layers, n_heads, n_kv_heads, ffn_dim):
    return LLaMAConfig(32000, dim, n_layers, n_heads, n_kv_heads, ffn_dim, 1e-5, 10000.0, None, 4096)


def _llama3(dim, n_layers, n_heads, ffn_dim, scaling=None, max_seq_len=8192, tie=False):
    return LLaMAConfig(128256, dim, n_layers, n_heads, 8, ffn_dim, 1e-5, 500000.0, scaling, max_seq_len, tie)


PRESETS: dict[str, LLaMAConfig] = {
    "llama1-7b": _llama1(4096, 32, 32, 11008),
    "llama1-13b": _llama1(5120, 40, 40, 13824),
    "llama1-33b": _llama1(6656, 60, 52, 17920),
    "llama1-65b": _llama1(8192, 80, 64, 22016),
    "llama2-7b": _llama2(4096, 32, 32, 32, 11008),
    "llama2-13b": _llama2(5120, 40, 40, 40, 13824),
    "llama2-70b": _llama2(8192, 80, 64, 8, 28672),
    "codellama-7b": _llama2(4096, 32, 32, 32, 11008).replace(vocab_size=32016, rope_theta=1e6, max_seq_len=16384),
    "codellama-34b": _llama2(8192, 48, 64, 8, 22016).replace(rope_theta=1e6, max_seq_len=16384),
    "llama3-8b": _llama3(4096, 32, 32, 14336),
    "llama3-70b": _llama3(8192, 80, 64, 28672),
    "llama3.1-8b": _llama3(4096, 32, 32, 14336, _LLAMA31_SCALING, 131072),
    "llama3.1-70b": _llama3(8192, 80, 64, 28672, _LLAMA31_SCALING, 131072),
    "llama3.1-405b": _llama3(16384, 126, 128, 53248, _LLAMA31_SCALING, 131072),
    "llama3.2-1b": _llama3(2048, 16, 32, 8192, _LLAMA32_SCALING, 131072, tie=True),
    "llama3.2-3b": _llama3(3072, 28, 24, 8192, _LLAMA32_SCALING, 131072, tie=True),
    "tinyllama-1.1b": LLaMAConfig(32000, 2048, 22, 32, 4, 5632, 1e-5, 10000.0, None, 2048),
    # Small shapes for tests, debugging and CPU demos.
    "debug": LLaMAConfig(512, 64, 2, 4, 2, 172, 1e-5, 10000.0, None, 256),
    "tiny": LLaMAConfig(4096, 256, 4, 8, 4, 688, 1e-5, 10000.0, None, 512),
    "small": LLaMAConfig(8192, 512, 8, 8, 8, 1376, 1e-5, 10000.0, None, 1024),
    # The llama2.c "stories260K" model shape (TinyStories, tied output).
    "stories260k": LLaMAConfig(512, 64, 5, 8, 4, 172, 1e-5, 10000.0, None, 512, True),
}
