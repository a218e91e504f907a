"""A Llama-3-style decoder (dense or Mixtral-style MoE) in ``flax.nnx``.

    cfg = Config.preset("tiny")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    cache = init_cache(cfg, batch=2, max_len=32)
    logits, cache = model.prefill(tokens, lengths, cache)   # right-padded (B, T) prompt
    logits, cache = model.decode(next_tokens, cache)        # one token per sequence

The architecture (Touvron et al. 2023; Meta, "The Llama 3 Herd of Models",
2024): token embedding, ``layers`` pre-norm blocks of RMSNorm -> grouped-query
attention with rotary position embeddings (RoPE, with Llama-3.1 frequency
scaling) -> residual, RMSNorm -> SwiGLU MLP (or a top-k mixture of SwiGLU
experts, Jiang et al. 2024, "Mixtral of Experts") -> residual; a final
RMSNorm and the output projection (tied to the embedding or not).

Our primitives carry the work: ``rms_norm``, ``flash_attention`` (causal
prefill with per-sequence lengths, decode against the KV cache with
``key_value_seq_lengths``), ``swiglu`` and ``moe_ffn``; matmuls whose weight
is an ``mtia_jax.mx.MXArray`` (quantized at checkpoint load) run through
``mx_matmul``. Expert weights of MoE layers that are MXArrays are
dequantized on use (``moe_ffn`` takes float weights).

Functional core. The model's parameters are a plain dict (``params_of``):

    embed (V, D), final_norm (D,), lm_head (D, V) unless tied,
    layers: attn_norm (L, D), wq (L, D, N*H), wk/wv (L, D, K*H), wo (L, N*H, D),
            mlp_norm (L, D), and either
            dense: w_gate/w_up (L, D, F), w_down (L, F, D)
            MoE:   router (L, D, E), w_gate/w_up (L, E, D, F), w_down (L, E, F, D)

Weights are stored (in, out), so a projection is ``x @ w``. Layers are
stacked along a leading axis and run under one ``lax.scan``, so compile time
does not grow with depth. ``prefill``, ``decode`` and ``forward`` are pure
functions of ``(cfg, params, ...)`` that ``jax.jit``, ``mtia_jax.jit`` and
``mtia_jax.estimate`` take directly (bind ``cfg`` with ``functools.partial``).

RoPE convention: the *rotate-half* form (the first and second halves of each
head form the rotated pairs), which is what Hugging Face checkpoints are
stored for (their q/k projection rows are permuted from Meta's interleaved
pairs; see ``models.checkpoint``).

The KV cache is a dict ``k``, ``v`` (L, B, S, K, H) and ``lengths`` (B,)
int32: the number of valid positions of each sequence. ``prefill`` starts
from an empty cache and writes positions 0..T-1 (positions past a sequence's
length hold padding and are masked; decode overwrites them). ``decode``
writes each sequence's new key/value at its own position ``lengths[b]``
(a sequence whose cache is full is not written: keep ``lengths < S``), in
place: donate the cache (``donate_argnums``) and a step moves one row per
sequence and layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

from models import presets
from mtia_jax import mx
from mtia_jax.primitives.flash_attention import flash_attention
from mtia_jax.primitives.moe_ffn import moe_ffn
from mtia_jax.primitives.mx_matmul import mx_matmul
from mtia_jax.primitives.norms import rms_norm
from mtia_jax.primitives.paged_attention import paged_attention
from mtia_jax.primitives.swiglu import swiglu

__all__ = ["Config", "PRESETS", "Transformer", "init_cache", "forward", "prefill", "decode",
           "write_kv_rows", "write_kv_slots", "paged_step", "init_kv_pool", "pool_shardings",
           "rope_frequencies", "apply_rope", "params_of", "param_shapes", "cache_shapes",
           "logical_axes", "shardings", "init_params", "SHARDING_RULES", "last_token_logits"]


# ------------------------------------------------------------ configuration

@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 RoPE frequency scaling (Meta's reference ``apply_scaling``):
    wavelengths longer than ``original_context / low_freq_factor`` are
    divided by ``factor``, those shorter than ``original_context /
    high_freq_factor`` are kept, and the band between is interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyperparameters of a decoder. Hashable: bind it with ``functools.partial``."""

    vocab: int
    d_model: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    experts: int = 0            # 0: dense MLP; > 0: every layer is a mixture of experts
    top_k: int = 2
    max_seq_len: int = 8192
    dtype: str = "bfloat16"     # parameter and activation dtype

    def __post_init__(self):
        for name in ("vocab", "d_model", "layers", "heads", "kv_heads", "ffn", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Config: {name} must be a positive int, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"Config: d_model {self.d_model} is not a multiple of heads {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"Config: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"Config: head_dim {self.head_dim} must be even for RoPE")
        if self.experts < 0 or (self.experts and not 1 <= self.top_k <= self.experts):
            raise ValueError(f"Config: experts={self.experts}, top_k={self.top_k}; expected "
                             f"experts >= 0 and 1 <= top_k <= experts")
        np.dtype(jnp.dtype(self.dtype))  # raises on an unknown dtype name

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def param_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)

    @staticmethod
    def preset(name: str) -> "Config":
        """A published configuration by name (see ``PRESETS``)."""
        return presets.lookup(PRESETS, name)


_LLAMA31 = dict(rope_theta=500000.0, rope_scaling=RopeScaling(), norm_eps=1e-5, max_seq_len=131072)

PRESETS: dict[str, Config] = {
    # small shapes that run in the tests (assumption: GQA with 2 query heads per KV
    # head, head dim 8, so every sharded dimension divides a 4-way "model" axis)
    "tiny": Config(vocab=256, d_model=64, layers=2, heads=8, kv_heads=4, ffn=128,
                   max_seq_len=128, dtype="float32"),
    "tiny-moe": Config(vocab=256, d_model=64, layers=2, heads=8, kv_heads=4, ffn=64,
                       experts=4, top_k=2, rope_theta=1e6, rope_scaling=None,
                       max_seq_len=128, dtype="float32"),
    # Meta, "The Llama 3 Herd of Models", 2024, Table 3 (Llama 3.1: 128K context,
    # rope_theta 500000 and the RoPE scaling of Meta's reference implementation)
    "llama3-8b": Config(vocab=128256, d_model=4096, layers=32, heads=32, kv_heads=8,
                        ffn=14336, **_LLAMA31),
    "llama3-70b": Config(vocab=128256, d_model=8192, layers=80, heads=64, kv_heads=8,
                         ffn=28672, **_LLAMA31),
    "llama3-405b": Config(vocab=128256, d_model=16384, layers=126, heads=128, kv_heads=8,
                          ffn=53248, **_LLAMA31),
    # Jiang et al. 2024, "Mixtral of Experts", Table 1 (rope theta 1e6, 32K context)
    "mixtral-8x7b": Config(vocab=32000, d_model=4096, layers=32, heads=32, kv_heads=8,
                           ffn=14336, experts=8, top_k=2, rope_theta=1e6, rope_scaling=None,
                           max_seq_len=32768),
}


# ------------------------------------------------------------ RoPE

def rope_frequencies(cfg: Config) -> np.ndarray:
    """Inverse frequencies (head_dim / 2,) float64: ``theta ** (-2i / head_dim)``,
    then the Llama-3.1 scaling when ``cfg.rope_scaling`` is set."""
    dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = s.original_context / s.low_freq_factor    # longer: scaled down by factor
    high_wavelen = s.original_context / s.high_freq_factor  # shorter: kept
    smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor
                                                                  - s.low_freq_factor)
    between = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return np.where(wavelen < high_wavelen, inv_freq,
                    np.where(wavelen > low_wavelen, inv_freq / s.factor, between))


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE of ``x`` (B, T, heads, H) at integer ``positions`` (B, T),
    computed in float32 and returned in ``x``'s dtype."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]  # slices (not split) keep the heads dim sharded
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ------------------------------------------------------------ building blocks

def _dense(x, w):
    """``x @ w`` for a (in, out) weight: ``mx_matmul`` when ``w`` is an MXArray."""
    if isinstance(w, mx.MXArray):
        flat = x.reshape(-1, x.shape[-1])
        return mx_matmul(flat, w, out_dtype=x.dtype).reshape(*x.shape[:-1], w.shape[-1])
    return x @ w


def _float(w, dtype):
    """A weight as a float array (MXArrays dequantized on use)."""
    return mx.dequantize(w, dtype) if isinstance(w, mx.MXArray) else w


def _mlp(cfg: Config, w: dict, h):
    """SwiGLU MLP, or the mixture of SwiGLU experts for MoE configs."""
    if cfg.is_moe:
        flat = h.reshape(-1, h.shape[-1])
        router_logits = flat @ _float(w["router"], h.dtype)
        out = moe_ffn(flat, router_logits, *(_float(w[n], h.dtype)
                                             for n in ("w_gate", "w_up", "w_down")),
                      top_k=cfg.top_k)
        return out.reshape(h.shape)
    if isinstance(w["w_gate"], mx.MXArray):
        gate, up = _dense(h, w["w_gate"]), _dense(h, w["w_up"])
        hidden = (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(h.dtype)
    else:
        hidden = swiglu(h, w["w_gate"], w["w_up"])
    return _dense(hidden, w["w_down"])


def _qkv(cfg: Config, w: dict, h, positions):
    """Rotated queries (B, T, N, H) and keys, and values (B, T, K, H)."""
    b, t, _ = h.shape
    inv_freq = rope_frequencies(cfg)
    q = _dense(h, w["wq"]).reshape(b, t, cfg.heads, cfg.head_dim)
    k = _dense(h, w["wk"]).reshape(b, t, cfg.kv_heads, cfg.head_dim)
    v = _dense(h, w["wv"]).reshape(b, t, cfg.kv_heads, cfg.head_dim)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def _embed(params: dict, tokens):
    return jnp.take(params["embed"], tokens, axis=0)


def _logits(cfg: Config, params: dict, x):
    x = rms_norm(x, params["final_norm"], eps=cfg.norm_eps)
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return _dense(x, head).astype(jnp.float32)


def _layer(cfg: Config, w: dict, x, positions, attend):
    """One decoder block of hidden states ``x`` (B, T, D) at ``positions``
    (B, T): ``attend(q, k, v)`` -> (B, T, N, H) is its attention (causal over
    the block's own keys, or writing them to a cache and reading it)."""
    b, t, _ = x.shape
    q, k, v = _qkv(cfg, w, rms_norm(x, w["attn_norm"], eps=cfg.norm_eps), positions)
    x = x + _dense(attend(q, k, v).reshape(b, t, cfg.heads * cfg.head_dim), w["wo"])
    return x + _mlp(cfg, w, rms_norm(x, w["mlp_norm"], eps=cfg.norm_eps))


def _check_tokens(name: str, tokens, ndim: int, what: str):
    tokens = jnp.asarray(tokens)
    if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name}: tokens must be an integer array {what}, got shape "
                         f"{tuple(tokens.shape)} dtype {tokens.dtype}")
    return tokens.astype(jnp.int32)


# ------------------------------------------------------------ the model, functionally

def forward(cfg: Config, params: dict, tokens, lengths=None):
    """Logits (B, T, vocab) float32 of a right-padded batch of token ids (B, T),
    causal, without a cache; also the per-layer keys and values
    ``(L, B, T, K, H)`` each. ``lengths`` (B,) are the valid lengths (default
    T); logits at padded positions are not meaningful."""
    tokens = _check_tokens("forward", tokens, 2, "(B, T)")
    b, t = tokens.shape
    if lengths is None:
        lengths = jnp.full((b,), t, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,):
        raise ValueError(f"forward: lengths must have shape (B,) = ({b},), got {lengths.shape}")
    lengths = lengths.astype(jnp.int32)
    x, ks, vs = _run_layers(cfg, params["layers"], _embed(params, tokens), lengths)
    return _logits(cfg, params, x), ks, vs


def _run_layers(cfg: Config, layers: dict, x, lengths):
    """Hidden states (B, T, D) through the stacked ``layers`` (causal, no
    cache); also their keys and values ``(L, B, T, K, H)`` each."""
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def layer(x, w):
        kv = []

        def attend(q, k, v):
            kv.extend((k, v))
            return flash_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                   key_value_seq_lengths=lengths)

        return _layer(cfg, w, x, positions, attend), tuple(kv)

    x, (ks, vs) = lax.scan(layer, x, layers)
    return x, ks, vs


# ------------------------------------------------------------ pipeline stages

def _stage_layers(cfg: Config, stage: int, stages: int) -> slice:
    if stages < 1 or not 0 <= stage < stages:
        raise ValueError(f"stage {stage} of {stages}: need 0 <= stage < stages")
    if cfg.layers % stages:
        raise ValueError(f"{cfg.layers} layers do not split into {stages} pipeline stages of equal "
                         f"depth; choose a stage count that divides {cfg.layers}")
    per = cfg.layers // stages
    return slice(stage * per, (stage + 1) * per)


def stage_params(cfg: Config, params: dict, stage: int, stages: int) -> dict:
    """The parameters pipeline stage ``stage`` of ``stages`` holds: its
    ``layers / stages`` consecutive layers, the embedding on the first stage,
    the final norm and output head on the last (works on ShapeDtypeStructs)."""
    rows = _stage_layers(cfg, stage, stages)
    depth = rows.stop - rows.start
    layers = jax.tree.map(lambda w: jax.ShapeDtypeStruct((depth, *w.shape[1:]), w.dtype)
                          if isinstance(w, jax.ShapeDtypeStruct) else w[rows], params["layers"])
    out = {"layers": layers}
    if stage == 0:
        out["embed"] = params["embed"]
    if stage == stages - 1:
        out["final_norm"] = params["final_norm"]
        out |= {"lm_head": params["lm_head"]} if "lm_head" in params else {"embed": params["embed"]}
    return out


def pipeline_stages(cfg: Config, stages: int, microbatch: int, seq: int, stage_mesh,
                    rules: dict | None = None) -> list:
    """``mtia_jax.PipelineStage`` s of a prefill of ``microbatch`` sequences of
    ``seq`` tokens split into ``stages`` stages, from shapes, each sharded
    over ``stage_mesh`` (the mesh one stage runs on) by ``shardings``; the
    interior stages share one object (estimated once)."""
    import mtia_jax  # the package's public API, loaded on use

    pspecs, _, _ = shardings(cfg, stage_mesh, microbatch, rules)
    full = param_shapes(cfg)
    lengths = jax.ShapeDtypeStruct((microbatch,), jnp.int32)
    made: dict = {}
    for s in range(stages):
        ends = (s == 0, s == stages - 1)
        if ends not in made:
            params = stage_params(cfg, full, s, stages)
            x = (jax.ShapeDtypeStruct((microbatch, seq), jnp.int32) if ends[0] else
                 jax.ShapeDtypeStruct((microbatch, seq, cfg.d_model), cfg.param_dtype))
            made[ends] = mtia_jax.PipelineStage(
                functools.partial(prefill_stage, cfg, first=ends[0], last=ends[1]), params, x, lengths,
                in_shardings=({k: pspecs[k] for k in params}, P(), P()))
    return [made[(s == 0, s == stages - 1)] for s in range(stages)]


def prefill_stage(cfg: Config, params: dict, x, lengths, *, first: bool, last: bool):
    """Pipeline stage of a prefill: ``params`` from ``stage_params``; ``x`` the
    token ids (B, T) on the first stage, else the hidden states (B, T, D)
    from the stage before. Returns (hidden states, or on the last stage the
    logits (B, vocab) float32 of each sequence's last valid token; keys;
    values), the keys and values ``(layers / stages, B, T, K, H)`` of this
    stage's layers. The stages applied in order equal ``forward`` and
    ``last_token_logits``."""
    x = _embed(params, _check_tokens("prefill_stage", x, 2, "(B, T)")) if first else x
    lengths = jnp.asarray(lengths, jnp.int32)
    x, ks, vs = _run_layers(cfg, params["layers"], x, lengths)
    if last:
        x = _logits(cfg, params, jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0])
    return x, ks, vs


def _check_cache(fn: str, cfg: Config, cache: dict, batch: int):
    expected = (cfg.layers, batch, None, cfg.kv_heads, cfg.head_dim)
    for name in ("k", "v"):
        shape = tuple(cache[name].shape)
        if len(shape) != 5 or any(e is not None and e != s for e, s in zip(expected, shape)):
            raise ValueError(f"{fn}: cache[{name!r}] has shape {shape}; expected (L, B, S, K, H) "
                             f"= ({cfg.layers}, {batch}, S, {cfg.kv_heads}, {cfg.head_dim})")
    if tuple(cache["lengths"].shape) != (batch,):
        raise ValueError(f"{fn}: cache['lengths'] has shape {tuple(cache['lengths'].shape)}; "
                         f"expected (B,) = ({batch},)")


def prefill(cfg: Config, params: dict, tokens, lengths, cache: dict):
    """Run a right-padded prompt batch (B, T) with valid ``lengths`` (B,) through
    the model into an empty ``cache`` (capacity S >= T). Returns logits
    (B, T, vocab) float32 and the cache holding positions 0..lengths-1."""
    tokens = _check_tokens("prefill", tokens, 2, "(B, T)")
    _check_cache("prefill", cfg, cache, tokens.shape[0])
    if tokens.shape[1] > cache["k"].shape[2]:
        raise ValueError(f"prefill: the prompt length T = {tokens.shape[1]} exceeds the cache "
                         f"capacity S = {cache['k'].shape[2]}")
    logits, ks, vs = forward(cfg, params, tokens, lengths)
    start = (0,) * 5
    new = {"k": lax.dynamic_update_slice(cache["k"], ks.astype(cache["k"].dtype), start),
           "v": lax.dynamic_update_slice(cache["v"], vs.astype(cache["v"].dtype), start),
           "lengths": jnp.asarray(lengths, jnp.int32)}
    return logits, new


def write_kv_rows(cache, layer, rows, positions):
    """``cache`` (L, B, S, K, H) with ``rows`` (B, K, H) written at
    ``[layer, b, positions[b]]``: one row per sequence, in place when the
    cache buffer may be overwritten (a donated cache, or one carried by a
    loop). A position past the capacity S is not written."""
    batch = rows.shape[0]
    index = jnp.stack([jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (batch,)),
                       positions.astype(jnp.int32)], axis=1)  # (B, 2): layer, position
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2), inserted_window_dims=(0, 2), scatter_dims_to_operand_dims=(0, 2),
        operand_batching_dims=(1,), scatter_indices_batching_dims=(0,))
    return lax.scatter(cache, index, rows.astype(cache.dtype), dims, indices_are_sorted=True,
                       unique_indices=True, mode=lax.GatherScatterMode.FILL_OR_DROP)


def decode(cfg: Config, params: dict, tokens, cache: dict):
    """One decode step: ``tokens`` (B,) at positions ``cache['lengths']``.
    Returns logits (B, vocab) float32 and the cache with one more position
    per sequence.

    The whole cache is carried through the scan over layers: each layer
    writes its new key and value row per sequence (``write_kv_rows``) and
    attention reads its layer of the cache where it lies (a view), so with
    the cache donated (``donate_argnums``) a step moves one row per sequence
    and layer, as a serving engine's in-place cache does."""
    tokens = _check_tokens("decode", tokens, 1, "(B,)")
    b = tokens.shape[0]
    _check_cache("decode", cfg, cache, b)
    pos = cache["lengths"].astype(jnp.int32)
    visible = pos + 1

    def layer(carry, xs):
        x, ck, cv = carry
        w, index = xs

        def attend(q, k, v):
            nonlocal ck, cv
            ck = write_kv_rows(ck, index, k[:, 0], pos)
            cv = write_kv_rows(cv, index, v[:, 0], pos)
            keys = lax.dynamic_index_in_dim(ck, index, 0, keepdims=False)
            values = lax.dynamic_index_in_dim(cv, index, 0, keepdims=False)
            return flash_attention(q, keys.astype(q.dtype), values.astype(q.dtype),
                                   key_value_seq_lengths=visible)

        x = _layer(cfg, w, x, pos[:, None], attend)
        return (x, ck, cv), None

    x = _embed(params, tokens)[:, None, :]
    layers = jnp.arange(cfg.layers, dtype=jnp.int32)
    (x, ks, vs), _ = lax.scan(layer, (x, cache["k"], cache["v"]), (params["layers"], layers))
    return _logits(cfg, params, x)[:, 0], {"k": ks, "v": vs, "lengths": visible}


def write_kv_slots(pool, layer, rows, slots):
    """A paged ``pool`` (L, num_blocks, block_size, K, H) with ``rows`` (N, K, H)
    written at ``[layer, slots[i] // block_size, slots[i] % block_size]``: one
    row per token, in place when the pool buffer may be overwritten. A slot
    past the pool (a padding token's, ``num_blocks * block_size``) is not written."""
    n, block_size = rows.shape[0], pool.shape[2]
    slots = slots.astype(jnp.int32)
    index = jnp.stack([jnp.broadcast_to(jnp.asarray(layer, jnp.int32), (n,)),
                       slots // block_size, slots % block_size], axis=1)  # (N, 3)
    dims = lax.ScatterDimensionNumbers(update_window_dims=(1, 2), inserted_window_dims=(0, 1, 2),
                                       scatter_dims_to_operand_dims=(0, 1, 2))
    return lax.scatter(pool, index, rows.astype(pool.dtype), dims, unique_indices=True,
                       mode=lax.GatherScatterMode.FILL_OR_DROP)


def _check_pool(fn: str, cfg: Config, pool: dict):
    for name in ("k", "v"):
        shape = tuple(pool[name].shape)
        if len(shape) != 5 or (shape[0], shape[3], shape[4]) != (cfg.layers, cfg.kv_heads, cfg.head_dim):
            raise ValueError(f"{fn}: pool[{name!r}] has shape {shape}; expected (L, num_blocks, "
                             f"block_size, K, H) = ({cfg.layers}, num_blocks, block_size, "
                             f"{cfg.kv_heads}, {cfg.head_dim})")


def paged_step(cfg: Config, params: dict, tokens, positions, slots, seq_ids, block_tables, last,
               pool: dict):
    """One serving step over a paged KV pool, as vLLM runs one: the tokens
    scheduled this step, of any mix of sequences (prefill chunks and decode
    tokens alike), flattened into one ragged batch.

    Args:
      tokens, positions, slots, seq_ids: (N,) int32: each token's id, its
        position in its sequence, the pool slot its key/value is written to
        (``block * block_size + offset``; ``num_blocks * block_size`` for a
        padding token: not written) and its sequence's row of ``block_tables``.
      block_tables: (B, W) int32: each sequence's physical blocks.
      last: (B,) int32: the index in the N tokens of each sequence's last token.
      pool: ``k``, ``v`` (L, num_blocks, block_size, K, H) (``init_kv_pool``).

    Each layer writes the step's keys and values into the pool, then every
    token attends its sequence's positions 0..position through the block
    table (``paged_attention``), so the tokens of a chunk see each other
    causally and everything cached before. Returns the logits (B, vocab)
    float32 at each sequence's last token, and the pool (donate it: a step
    moves one row per token and layer)."""
    tokens = _check_tokens("paged_step", tokens, 1, "(N,)")
    _check_pool("paged_step", cfg, pool)
    positions = jnp.asarray(positions, jnp.int32)
    slots, seq_ids = jnp.asarray(slots, jnp.int32), jnp.asarray(seq_ids, jnp.int32)
    block_tables, last = jnp.asarray(block_tables, jnp.int32), jnp.asarray(last, jnp.int32)

    def layer(carry, xs):
        x, pk, pv = carry
        w, index = xs

        def attend(q, k, v):
            nonlocal pk, pv
            pk = write_kv_slots(pk, index, k[:, 0], slots)
            pv = write_kv_slots(pv, index, v[:, 0], slots)
            keys = lax.dynamic_index_in_dim(pk, index, 0, keepdims=False)
            values = lax.dynamic_index_in_dim(pv, index, 0, keepdims=False)
            return paged_attention(q[:, 0], keys.astype(q.dtype), values.astype(q.dtype),
                                   block_tables, seq_ids, positions)[:, None]

        x = _layer(cfg, w, x, positions[:, None], attend)
        return (x, pk, pv), None

    x = _embed(params, tokens)[:, None, :]
    layers = jnp.arange(cfg.layers, dtype=jnp.int32)
    (x, pk, pv), _ = lax.scan(layer, (x, pool["k"], pool["v"]), (params["layers"], layers))
    return _logits(cfg, params, jnp.take(x[:, 0], last, axis=0)), {"k": pk, "v": pv}


def init_kv_pool(cfg: Config, num_blocks: int, block_size: int, dtype=None) -> dict:
    """An empty paged KV pool: ``k``, ``v`` (L, num_blocks, block_size, K, H)."""
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"init_kv_pool: num_blocks and block_size must be >= 1, got {num_blocks}, "
                         f"{block_size}")
    shape = (cfg.layers, num_blocks, block_size, cfg.kv_heads, cfg.head_dim)
    dtype = cfg.param_dtype if dtype is None else jnp.dtype(dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def last_token_logits(logits, lengths):
    """The logits (B, vocab) at each sequence's last valid position of prefill logits (B, T, vocab)."""
    return jnp.take_along_axis(logits, (jnp.asarray(lengths) - 1)[:, None, None], axis=1)[:, 0]


def init_cache(cfg: Config, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for ``batch`` sequences of up to ``max_len`` positions."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache: batch and max_len must be >= 1, got {batch}, {max_len}")
    shape = (cfg.layers, batch, max_len, cfg.kv_heads, cfg.head_dim)
    dtype = cfg.param_dtype if dtype is None else jnp.dtype(dtype)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "lengths": jnp.zeros((batch,), jnp.int32)}


def cache_shapes(cfg: Config, batch: int, max_len: int, dtype=None) -> dict:
    """ShapeDtypeStructs of ``init_cache(cfg, batch, max_len, dtype)``."""
    return jax.eval_shape(functools.partial(init_cache, cfg, batch, max_len, dtype))


# ------------------------------------------------------------ parameters

def _param_shapes_dict(cfg: Config) -> dict:
    """Shapes of the parameter dict (see the module docstring)."""
    L, d, f, v = cfg.layers, cfg.d_model, cfg.ffn, cfg.vocab
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    layers = {"attn_norm": (L, d), "wq": (L, d, q), "wk": (L, d, kv), "wv": (L, d, kv),
              "wo": (L, q, d), "mlp_norm": (L, d)}
    if cfg.is_moe:
        e = cfg.experts
        layers |= {"router": (L, d, e), "w_gate": (L, e, d, f), "w_up": (L, e, d, f),
                   "w_down": (L, e, f, d)}
    else:
        layers |= {"w_gate": (L, d, f), "w_up": (L, d, f), "w_down": (L, f, d)}
    shapes = {"embed": (v, d), "layers": layers, "final_norm": (d,)}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def _init_scale(shape, name: str) -> float | None:
    """Initial weights: norms are ones (None); matrices are normal with std
    1/sqrt(fan_in) (the embedding: std 1)."""
    if name.endswith("norm"):
        return None
    return 1.0 if name == "embed" else 1.0 / math.sqrt(shape[-2])


@functools.partial(jax.jit, static_argnums=0)
def init_params(cfg: Config, key) -> dict:
    """Freshly initialized parameters of ``cfg``: one normal draw for all the
    matrices, sliced, so that building a model costs one small program."""
    shapes = _param_shapes_dict(cfg)
    entries = [(None, n, shapes[n]) for n in shapes if n != "layers"]
    entries += [("layers", n, s) for n, s in shapes["layers"].items()]
    total = sum(math.prod(s) for _, n, s in entries if _init_scale(s, n) is not None)
    draws = jax.random.normal(key, (total,), jnp.float32)
    params: dict[str, Any] = {"layers": {}}
    offset = 0
    for group, name, shape in entries:
        scale = _init_scale(shape, name)
        if scale is None:
            value = jnp.ones(shape, cfg.param_dtype)
        else:
            size = math.prod(shape)
            value = (draws[offset:offset + size].reshape(shape) * scale).astype(cfg.param_dtype)
            offset += size
        (params if group is None else params["layers"])[name] = value
    return params


class DecoderLayers(nnx.Module):
    """The ``layers`` stacked parameters (leading axis: layer)."""

    def __init__(self, layers: dict):
        for name, value in layers.items():
            setattr(self, name, nnx.Param(value))


class Transformer(nnx.Module):
    """The decoder as an nnx Module; ``params()`` is its parameter dict and the
    methods call the functional core."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        if not isinstance(cfg, Config):
            raise TypeError(f"Transformer: cfg must be a Config, got {type(cfg).__name__}")
        self.cfg = cfg
        params = init_params(cfg, rngs.params())
        self.embed = nnx.Param(params["embed"])
        self.layers = DecoderLayers(params["layers"])
        self.final_norm = nnx.Param(params["final_norm"])
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Param(params["lm_head"])

    def params(self) -> dict:
        """The parameter dict (arrays or MXArrays)."""
        return params_of(self)

    def forward(self, tokens, lengths=None):
        return forward(self.cfg, self.params(), tokens, lengths)[0]

    def prefill(self, tokens, lengths, cache):
        return prefill(self.cfg, self.params(), tokens, lengths, cache)

    def decode(self, tokens, cache):
        return decode(self.cfg, self.params(), tokens, cache)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> dict:
        return init_cache(self.cfg, batch, max_len, dtype)

    @classmethod
    def from_params(cls, cfg: Config, params: dict) -> "Transformer":
        """A model holding ``params`` (a dict shaped like ``param_shapes(cfg)``;
        values may be MXArrays), built without initializing random weights."""
        expected = jax.tree.map(lambda s: s.shape, param_shapes(cfg))
        got = jax.tree.map(lambda a: tuple(a.shape), params,
                           is_leaf=lambda a: isinstance(a, mx.MXArray))
        if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
            raise ValueError(f"Transformer.from_params: parameter shapes {got} do not match "
                             f"the config's {expected}")
        abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)


def params_of(model: Transformer) -> dict:
    """The parameter dict of a model (see the module docstring)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def param_shapes(cfg: Config) -> dict:
    """ShapeDtypeStructs of the parameter dict of ``cfg`` (no memory allocated;
    a 405B model is fine), via ``nnx.eval_shape``."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return params_of(abstract)


# ------------------------------------------------------------ sharding

# logical axes of every parameter and cache array, per dimension
_PARAM_AXES = {
    "embed": ("table_vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab"),
    "attn_norm": ("layers", "embed"), "mlp_norm": ("layers", "embed"),
    "wq": ("layers", "embed", "heads"), "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"), "wo": ("layers", "heads", "embed"),
}
_DENSE_AXES = {"w_gate": ("layers", "embed", "ffn"), "w_up": ("layers", "embed", "ffn"),
               "w_down": ("layers", "ffn", "embed")}
_MOE_AXES = {"router": ("layers", "embed", "router_experts"),
             "w_gate": ("layers", "experts", "embed", "expert_ffn"),
             "w_up": ("layers", "experts", "embed", "expert_ffn"),
             "w_down": ("layers", "experts", "expert_ffn", "embed")}
_POOL_AXES = ("layers", "blocks", "block_positions", "kv_heads", "head_dim")
_CACHE_AXES = {"k": ("layers", "batch", "seq", "kv_heads", "head_dim"),
               "v": ("layers", "batch", "seq", "kv_heads", "head_dim"), "lengths": ("batch",)}

# logical axis -> mesh axis: Megatron tensor parallelism over "model" (attention
# heads, FFN width, output vocabulary), data parallelism over "data", and
# expert parallelism over "model" (each device holds E / model whole experts;
# tokens reach them by all-to-all). Where "model" does not divide the experts,
# each expert's FFN width is split over it instead ("expert_ffn"). The router's
# expert columns ("router_experts") stay whole: every device routes its tokens
# over all experts. The embedding table stays replicated (a lookup in a
# replicated table keeps the tokens' batch split).
SHARDING_RULES = {"batch": "data", "heads": "model", "kv_heads": "model", "ffn": "model",
                  "experts": "model", "expert_ffn": "model", "vocab": "model"}
# More tensor-parallel devices than KV heads (``tensor_parallel_mesh``): query
# heads, FFN width and vocabulary over ("model", "rep"), each KV head on the
# "rep" devices whose query heads read it (as vLLM replicates KV heads), and
# each expert's FFN width over "rep".
GROUPED_KV_RULES = {**SHARDING_RULES, "heads": ("model", "rep"), "ffn": ("model", "rep"),
                    "vocab": ("model", "rep"), "expert_ffn": "rep"}


def logical_axes(cfg: Config) -> tuple[dict, dict]:
    """(parameter axes, cache axes): pytrees of per-dimension logical axis names."""
    layer_axes = _MOE_AXES if cfg.is_moe else _DENSE_AXES
    shapes = _param_shapes_dict(cfg)
    params = {name: _PARAM_AXES[name] for name in shapes if name != "layers"}
    params["layers"] = {name: _PARAM_AXES.get(name) or layer_axes[name] for name in shapes["layers"]}
    return params, dict(_CACHE_AXES)


def _extent(cfg: Config, axis: str, batch: int) -> int | None:
    """How many units a logical axis splits into (heads, not head*dim elements)."""
    return {"batch": batch, "heads": cfg.heads, "kv_heads": cfg.kv_heads, "ffn": cfg.ffn,
            "experts": cfg.experts, "expert_ffn": cfg.ffn, "vocab": cfg.vocab}.get(axis)


def kv_head_groups(kv_heads: int, model: int) -> int:
    """Devices that share each KV head under ``model``-way tensor parallelism:
    ``model / kv_heads`` when ``model`` is a multiple of the KV heads above
    them, else 1."""
    return model // kv_heads if model > kv_heads and model % kv_heads == 0 else 1


def tensor_parallel_mesh(cfg: Config | int, data: int, model: int, chip=None):
    """A ("data", "model") mesh for ``model``-way tensor parallelism; with more
    devices than KV heads (in whole groups, ``kv_head_groups``), ("data",
    "model", "rep"): "model" the KV heads, "rep" the devices sharing each
    (``GROUPED_KV_RULES``). ``cfg``: a Config, or its number of KV heads."""
    import mtia_jax  # the package's public API, loaded on use

    kv_heads = cfg if isinstance(cfg, int) else cfg.kv_heads
    groups = kv_head_groups(kv_heads, model)
    if groups > 1:
        return mtia_jax.make_mesh((data, kv_heads, groups), ("data", "model", "rep"), chip=chip)
    return mtia_jax.make_mesh((data, model), ("data", "model"), chip=chip)


def shardings(cfg: Config, mesh, batch: int, rules: dict | None = None) -> tuple[dict, dict, P]:
    """PartitionSpecs of (params, cache, tokens) on ``mesh`` (a ``make_mesh`` mesh).

    Each logical axis maps to its mesh axis (or tuple of axes) by ``rules``
    (default ``GROUPED_KV_RULES`` on a mesh with a "rep" axis, else
    ``SHARDING_RULES``); it stays replicated when the mesh lacks the axis,
    the axis has size 1, or its size does not divide the logical extent
    (e.g. 8 KV heads over a 16-way "model" axis: use ``tensor_parallel_mesh``)."""
    spec = _spec_maker(cfg, mesh, batch, rules)
    param_axes, cache_axes = logical_axes(cfg)
    is_axes = lambda x: isinstance(x, tuple)
    return (jax.tree.map(spec, param_axes, is_leaf=is_axes),
            jax.tree.map(spec, cache_axes, is_leaf=is_axes), spec(("batch",)))


def pool_shardings(cfg: Config, mesh, rules: dict | None = None) -> tuple[dict, dict]:
    """PartitionSpecs of (params, paged KV pool) on ``mesh``: the pool's KV
    heads split as the contiguous cache's are; its blocks stay whole (every
    device holds its heads of every block), and the step's tokens replicated."""
    spec = _spec_maker(cfg, mesh, 1, rules)
    param_axes, _ = logical_axes(cfg)
    pool = spec(_POOL_AXES)
    return jax.tree.map(spec, param_axes, is_leaf=lambda x: isinstance(x, tuple)), {"k": pool, "v": pool}


def _spec_maker(cfg: Config, mesh, batch: int, rules: dict | None):
    """The PartitionSpec of a tuple of logical axes on ``mesh`` (see ``shardings``)."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    if rules is None:
        rules = GROUPED_KV_RULES if "rep" in sizes else SHARDING_RULES

    def spec(axes):
        used, out = set(), []
        for axis in axes:
            mesh_axes = rules.get(axis)
            names = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
            extent = _extent(cfg, axis, batch)
            size = math.prod(sizes.get(a, 0) for a in names)
            ok = (all(a in sizes for a in names) and size > 1 and not used & set(names)
                  and extent is not None and extent % size == 0)
            out.append(mesh_axes if ok else None)
            used.update(names if ok else ())
        return P(*out)

    return spec
