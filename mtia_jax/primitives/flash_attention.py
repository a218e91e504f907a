"""``flash_attention``: scaled dot-product attention as one MTIA primitive.

    out = flash_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None,
                          key_value_seq_lengths=None, local_window_size=None)

Same signature, layout and semantics as ``jax.nn.dot_product_attention``
(``implementation="xla"``), in the 4-D layout only::

    query (B, T, N, H)   key, value (B, S, K, H)   output (B, T, N, H)

B batch, T query length, S key/value length, N query heads, K key/value
heads (N a multiple of K: K == N multi-head, 1 < K < N grouped-query, K == 1
multi-query attention), H head dimension. ``bias`` and ``mask`` (boolean,
True = attend) have at most 4 dimensions and broadcast to (B, N, T, S) as in
jax: missing leading dimensions are added, every dimension is 1 or the full
size. Decode is a query of length 1 against a KV cache of capacity S with
per-sequence ``key_value_seq_lengths`` (shape (B,)).

Reference implementation (what the primitive computes on the host, and its
lowering under plain ``jax.jit``): the *plain softmax* formulation of
``jax.nn.dot_product_attention``, step for step, so results agree with it to
rounding: logits ``Q K^T`` accumulated in float32 (bfloat16/float16 inputs
use the ``*_F32`` dot algorithm jax uses), times ``scale``, plus ``bias``,
masked positions replaced by ``-0.7 x`` the largest finite float32, softmax in
float32, probabilities cast back to the input dtype, then ``P V``; padded
query rows (``query_seq_lengths``) are zeroed. So a fully masked row (every
key masked) attends uniformly to all S keys, exactly as jax does. The online
softmax over KV tiles that a FlashAttention kernel runs is what the cost model
prices (``runtime.accelerated.attention``); its results equal these up to
float32 rounding. Note that ``is_causal`` is jax's top-left aligned causal mask
(query t sees keys 0..t): for decode use ``key_value_seq_lengths``.

Primitive operands are ``query, key, value`` followed by the optional operands
that were given, in the order ``OPTIONAL_OPERANDS``; the param
``optional_operands`` names them. Lengths are int32 operands. Rules: abstract
evaluation, JVP (through the reference, so ``jax.grad`` works), a batching
rule that keeps the primitive by folding the vmapped axis into B, and the
reference as lowering.

KV cache in MX: under ``PrecisionPolicy(kv_cache=...)`` the precision pass
sets the param ``kv_format``; keys and values are rounded to that format
(blocks along the head dimension) before use, as a cache stored in it would
hold them, and the cost model reads them packed.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _core
from jax.interpreters import ad

from mtia_jax.primitives._base import define_primitive, quantized, shape_error

__all__ = ["flash_attention", "flash_attention_p", "attention_reference", "OPTIONAL_OPERANDS"]

# the optional operands, in the order they follow (query, key, value)
OPTIONAL_OPERANDS = ("bias", "mask", "query_seq_lengths", "key_value_seq_lengths")

# jax.nn.dot_product_attention's dot algorithm for 16-bit inputs (float32 accumulation)
_DOT_ALGORITHM = {
    np.dtype(jnp.bfloat16): lax.DotAlgorithmPreset.BF16_BF16_F32,
    np.dtype(np.float16): lax.DotAlgorithmPreset.F16_F16_F32,
}


# ------------------------------------------------------------ reference

def _large_negative(dtype) -> jax.Array:
    """The value masked logits take: as jax's ``_get_large_negative``."""
    dtype_max = min(jnp.finfo(dtype).max, jnp.finfo(np.float32).max)
    return jnp.asarray(-0.7 * dtype_max, dtype=dtype)


def _grouped(t: jax.Array, kv_heads: int, groups: int) -> jax.Array:
    """A (tB, tN, tT, tS) bias or mask as (tB, K|1, G|1, tT, tS)."""
    tb, tn, tt, ts = t.shape
    if tn == 1:
        return t[:, :, None]
    return t.reshape(tb, kv_heads, groups, tt, ts)


def _visibility(batch, q_len, kv_len, kv_heads, groups, mask, is_causal, local_window_size,
                q_lengths, kv_lengths):
    """The boolean (broadcastable to (B, K, G, T, S)) of positions that take
    part, or None when every position does."""
    parts = []
    if mask is not None:
        parts.append(_grouped(mask, kv_heads, groups))
    q_pos = jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    if is_causal:
        parts.append(q_pos >= k_pos)
    if local_window_size is not None:
        left, right = local_window_size
        parts.append((q_pos <= k_pos + left) & (q_pos >= k_pos - right))
    if q_lengths is not None:
        parts.append((jnp.arange(q_len)[None, :, None] < q_lengths[:, None, None])[:, None, None])
    if kv_lengths is not None:
        parts.append((jnp.arange(kv_len)[None, None, :] < kv_lengths[:, None, None])[:, None, None])
    if not parts:
        return None
    visible = parts[0]
    for part in parts[1:]:
        visible = jnp.logical_and(visible, part)
    return visible


def attention_reference(query, key, value, *optional, scale: float, is_causal: bool,
                        local_window_size: tuple[int, int] | None,
                        optional_operands: tuple[str, ...], kv_format: str | None = None):
    """What ``flash_attention`` computes (see the module docstring)."""
    extra = dict(zip(optional_operands, optional, strict=True))
    key, value = quantized(key, kv_format, -1), quantized(value, kv_format, -1)
    bias, mask = extra.get("bias"), extra.get("mask")
    q_lengths, kv_lengths = extra.get("query_seq_lengths"), extra.get("key_value_seq_lengths")
    batch, q_len, heads, head_dim = query.shape
    kv_len, kv_heads = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    logits_dtype = jnp.promote_types(query.dtype, np.float32)

    grouped_query = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    # XLA's CPU backend rewrites a dot with at most one non-trivial dimension
    # among (query rows, keys, head dim) into elementwise code that rejects an
    # explicit dot algorithm; there the default precision with a float32
    # result computes the same sums (products of 16-bit floats are exact in float32)
    degenerate = sum(d > 1 for d in (q_len * groups, kv_len, head_dim)) <= 1
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", grouped_query, key,
                        precision=None if degenerate else _DOT_ALGORITHM.get(np.dtype(query.dtype)),
                        preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(scale, dtype=logits.dtype)
    if bias is not None:
        logits = (logits + _grouped(bias, kv_heads, groups)).astype(logits.dtype)
    visible = _visibility(batch, q_len, kv_len, kv_heads, groups, mask, is_causal,
                          local_window_size, q_lengths, kv_lengths)
    if visible is not None:
        logits = jnp.where(visible, logits, _large_negative(logits.dtype))
    probs = jax.nn.softmax(logits.astype(np.float32), axis=-1).astype(key.dtype)
    encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value)
    encoded = encoded.reshape(batch, q_len, heads, value.shape[-1])
    if q_lengths is not None:
        rows = jnp.arange(q_len)[None, :] < q_lengths[:, None]
        encoded = encoded * rows[:, :, None, None].astype(encoded.dtype)
    return encoded


# ------------------------------------------------------------ rules

def _abstract_eval(query, key, value, *optional, **params):
    return _core.ShapedArray(query.shape[:-1] + value.shape[-1:], query.dtype)


def _jvp(primals, tangents, **params):
    """JVP of the reference with respect to the floating-point operands
    (masks and lengths have no tangent)."""
    diff = [i for i, p in enumerate(primals) if jnp.issubdtype(p.dtype, jnp.inexact)]

    def reference_of(*xs):
        args = list(primals)
        for i, x in zip(diff, xs):
            args[i] = x
        return attention_reference(*args, **params)

    tangents_in = [ad.instantiate_zeros(tangents[i]) for i in diff]
    return jax.jvp(reference_of, [primals[i] for i in diff], tangents_in)


def _fold_batch(x, dim, size: int, full_batch: int | None):
    """``x`` with the vmapped axis ``dim`` (or none) folded into its leading
    batch axis: (V, b, ...) -> (V * b, ...). ``full_batch`` is the per-example
    batch B the result must have (a broadcast batch of 1 is kept as 1 when
    ``x`` is not mapped)."""
    if dim is None:
        if x.shape[0] == 1 and full_batch is not None:
            return x  # broadcasts over V * B
        x = jnp.broadcast_to(x, (size,) + x.shape)
    else:
        x = jnp.moveaxis(x, dim, 0)
    if full_batch is not None and x.shape[1] != full_batch:
        x = jnp.broadcast_to(x, (size, full_batch) + x.shape[2:])
    return x.reshape((size * x.shape[1],) + x.shape[2:])


def _batch(args, dims, **params):
    """vmap keeps the primitive: the mapped axis is folded into B."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    query_shape = [s for i, s in enumerate(args[0].shape) if i != dims[0]]
    batch = query_shape[0]  # the per-example B
    roles = ("query", "key", "value") + tuple(params["optional_operands"])
    folded = []
    for role, x, d in zip(roles, args, dims):
        if role in ("bias", "mask"):
            folded.append(_fold_batch(x, d, size, batch))
        else:  # query, key, value, lengths: batch axis always full
            folded.append(_fold_batch(x, d, size, None))
    out = flash_attention_p.bind(*folded, **params)
    return out.reshape((size, batch) + out.shape[1:]), 0


flash_attention_p = define_primitive(
    "flash_attention", attention_reference, abstract_eval=_abstract_eval, jvp=_jvp,
    batching_rule=_batch)


# ------------------------------------------------------------ public API

_shape_error = functools.partial(shape_error, "flash_attention")


def _as_4d(name: str, t, full: tuple[int, int, int, int], dims: str):
    """A bias or mask as 4-D (missing leading dims added, as jax does), each
    dimension 1 or the full size of (B, N, T, S)."""
    t = jnp.asarray(t)
    if t.ndim > 4:
        raise _shape_error(name, t.shape, f"at most 4 dimensions broadcastable to {dims} = {full}")
    t = t.reshape((1,) * (4 - t.ndim) + t.shape)
    if any(d not in (1, f) for d, f in zip(t.shape, full)):
        raise _shape_error(name, t.shape, f"each dimension 1 or the full size of {dims} = {full}")
    return t


def _lengths(name: str, t, batch: int):
    t = jnp.asarray(t)
    if t.shape != (batch,):
        raise _shape_error(name, t.shape, f"(B,) = ({batch},)")
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"flash_attention: {name} has dtype {t.dtype}; expected int32 lengths")
    return t.astype(np.int32)


def _window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    if isinstance(local_window_size, numbers.Integral) and not isinstance(local_window_size, bool):
        window = (int(local_window_size),) * 2
    elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
          and all(isinstance(w, numbers.Integral) and not isinstance(w, bool)
                  for w in local_window_size)):
        window = tuple(int(w) for w in local_window_size)
    else:
        raise TypeError(f"flash_attention: local_window_size is {local_window_size!r}; expected "
                        f"an int or a (left, right) tuple of ints")
    if min(window) < 0:
        raise ValueError(f"flash_attention: local_window_size {window} has a negative size; "
                         f"expected (left, right) >= 0")
    return window


def flash_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                    query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None):
    """Scaled dot-product attention, as ``jax.nn.dot_product_attention`` (see the
    module docstring): query (B, T, N, H), key and value (B, S, K, H) ->
    (B, T, N, H)."""
    query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
    for name, t, dims in (("query", query, "(B, T, N, H)"), ("key", key, "(B, S, K, H)"),
                          ("value", value, "(B, S, K, H)")):
        if t.ndim != 4:
            raise _shape_error(name, t.shape, f"rank 4 {dims}")
    batch, q_len, heads, head_dim = query.shape
    _, kv_len, kv_heads, _ = key.shape
    if key.shape[0] != batch:
        raise _shape_error("key", key.shape, f"(B, S, K, H) with B = {batch} as query {query.shape}")
    if key.shape[3] != head_dim:
        raise _shape_error("key", key.shape, f"(B, S, K, H) with head dim H = {head_dim} as "
                                             f"query {query.shape}")
    if value.shape != key.shape:
        raise _shape_error("value", value.shape, f"the shape of key {key.shape}")
    if heads < 1 or kv_heads < 1:
        raise ValueError(f"flash_attention: query {query.shape} and key {key.shape} need at least "
                         f"one head each (N = {heads}, K = {kv_heads}, layout (B, T, N, H))")
    if heads % kv_heads:
        raise ValueError(f"flash_attention: query has {heads} heads (shape {query.shape}), not a "
                         f"multiple of the {kv_heads} key/value heads (key shape {key.shape})")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not jnp.issubdtype(t.dtype, jnp.floating):
            raise TypeError(f"flash_attention: {name} has dtype {t.dtype}; expected a float dtype")
    if not query.dtype == key.dtype == value.dtype:
        raise TypeError(f"flash_attention: query, key, value have dtypes {query.dtype}, "
                        f"{key.dtype}, {value.dtype}; expected one dtype")

    full = (batch, heads, q_len, kv_len)
    optional = {}
    if bias is not None:
        optional["bias"] = _as_4d("bias", bias, full, "(B, N, T, S)")
        if not jnp.issubdtype(optional["bias"].dtype, jnp.floating):
            raise TypeError(f"flash_attention: bias has dtype {optional['bias'].dtype}; "
                            f"expected a float dtype")
    if mask is not None:
        optional["mask"] = _as_4d("mask", mask, full, "(B, N, T, S)")
        if optional["mask"].dtype != np.bool_:
            raise TypeError(f"flash_attention: mask has dtype {optional['mask'].dtype}; expected "
                            f"bool (True = attend); pass an additive mask as bias")
    if query_seq_lengths is not None:
        optional["query_seq_lengths"] = _lengths("query_seq_lengths", query_seq_lengths, batch)
    if key_value_seq_lengths is not None:
        optional["key_value_seq_lengths"] = _lengths("key_value_seq_lengths",
                                                     key_value_seq_lengths, batch)
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"flash_attention: scale is {scale!r}; expected a Python float or None")
    names = tuple(n for n in OPTIONAL_OPERANDS if n in optional)
    return flash_attention_p.bind(
        query, key, value, *(optional[n] for n in names), scale=float(scale),
        is_causal=bool(is_causal), local_window_size=_window(local_window_size),
        optional_operands=names)
