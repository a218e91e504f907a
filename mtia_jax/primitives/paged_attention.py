"""``paged_attention``: ragged attention over a paged KV cache, one MTIA primitive.

    out = paged_attention(q, k_pool, v_pool, block_tables, seq_ids, positions, *, scale=None)

vLLM's layout: the keys and values of every sequence live in fixed-size
blocks of one shared pool, and each sequence's *block table* lists the
physical blocks that hold its logical blocks::

    q             (N, heads, H)                   one query per scheduled token
    k_pool, v_pool (num_blocks, block_size, K, H)  one layer's pool
    block_tables  (B, W) int32                    physical block of logical block w of sequence b
    seq_ids       (N,) int32 in [0, B)            the sequence of each query token
    positions     (N,) int32                      the position of each query token
    output        (N, heads, H)                   in q's dtype

The N query tokens are those of several sequences, flattened: a prefill
chunk (several tokens of one sequence at consecutive positions) next to the
single decode tokens of others. Query i attends the keys of its sequence
``s = seq_ids[i]`` at positions ``0..positions[i]`` (causal); position p is
stored at ``k_pool[block_tables[s, p // block_size], p % block_size]``.
``heads`` is a multiple of K (grouped-query attention: query head h reads
KV head ``h // (heads // K)``). ``scale`` defaults to ``1 / sqrt(H)``.

Reference implementation (what the primitive computes on the host, and its
lowering under plain ``jax.jit``): gather each token's table
``block_tables[seq_ids]`` (N, W), gather its keys and values
``k_pool[tables]`` -> (N, W·block_size, K, H), mask the positions after
``positions[i]``, then attention as ``flash_attention`` computes it: logits
accumulated in float32, masked positions replaced by a large finite
negative, softmax in float32, probabilities cast to the pool's dtype, then
``P V``. It equals ``flash_attention`` over the same keys laid out
contiguously (with ``key_value_seq_lengths = positions + 1``) to float32
rounding. Block-table entries outside the pool are clipped into it, and
values at masked positions are zeroed before ``P V``, so a padding token (any
sequence, any position >= 0) or garbage in blocks a sequence does not own
never makes a NaN.

Rules: abstract evaluation, JVP of the reference with respect to q and the
pools (``jax.grad`` works), batching by ``jax.vmap`` of the reference (a
vmapped call runs as the reference's gathers and dots, not as this
primitive), and the reference as lowering.

KV cache in MX: under ``PrecisionPolicy(kv_cache=...)`` the precision pass
sets the param ``kv_format``, as for ``flash_attention``: the keys and
values are rounded to that format (blocks along the head dimension) before
use, and the cost model reads them packed.

Cost (``runtime.accelerated.attention``): the blocks the tables name (B·W
blocks of K and of V, each read once per step), not the whole pool.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as _core
from jax.interpreters import ad

from mtia_jax.primitives._base import check_float, define_primitive, quantized, shape_error
from mtia_jax.primitives.flash_attention import _DOT_ALGORITHM, _large_negative

__all__ = ["paged_attention", "paged_attention_p", "paged_attention_reference"]

# operand order of the primitive
OPERANDS = ("q", "k_pool", "v_pool", "block_tables", "seq_ids", "positions")


# ------------------------------------------------------------ reference

def paged_attention_reference(q, k_pool, v_pool, block_tables, seq_ids, positions, *,
                              scale: float, kv_format: str | None = None):
    """What ``paged_attention`` computes (see the module docstring)."""
    n, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_pool.shape
    groups = heads // kv_heads
    span = block_tables.shape[1] * block_size
    tables = jnp.take(block_tables, seq_ids, axis=0, mode="clip")  # (N, W)
    tables = jnp.clip(tables, 0, num_blocks - 1)
    keys = jnp.take(k_pool, tables, axis=0, mode="clip").reshape(n, span, kv_heads, head_dim)
    values = jnp.take(v_pool, tables, axis=0, mode="clip").reshape(n, span, kv_heads, -1)
    keys, values = quantized(keys, kv_format, -1), quantized(values, kv_format, -1)
    visible = jnp.arange(span, dtype=jnp.int32)[None, :] <= positions[:, None]  # (N, S)

    logits_dtype = jnp.promote_types(q.dtype, np.float32)
    grouped = q.reshape(n, kv_heads, groups, head_dim)
    # as flash_attention: XLA's CPU backend rejects an explicit dot algorithm
    # on a dot with at most one non-trivial dimension
    degenerate = sum(d > 1 for d in (groups, span, head_dim)) <= 1
    logits = jnp.einsum("NKGH,NSKH->NKGS", grouped, keys,
                        precision=None if degenerate else _DOT_ALGORITHM.get(np.dtype(q.dtype)),
                        preferred_element_type=logits_dtype)
    logits = logits * jnp.asarray(scale, dtype=logits.dtype)
    logits = jnp.where(visible[:, None, None, :], logits, _large_negative(logits.dtype))
    probs = jax.nn.softmax(logits.astype(np.float32), axis=-1).astype(values.dtype)
    values = jnp.where(visible[:, :, None, None], values, jnp.zeros((), values.dtype))
    encoded = jnp.einsum("NKGS,NSKH->NKGH", probs, values)
    return encoded.reshape(n, heads, values.shape[-1]).astype(q.dtype)


# ------------------------------------------------------------ rules

def _abstract_eval(q, k_pool, v_pool, block_tables, seq_ids, positions, **params):
    return _core.ShapedArray(q.shape[:-1] + v_pool.shape[-1:], q.dtype)


def _jvp(primals, tangents, **params):
    """JVP of the reference with respect to q and the pools (the integer
    operands have no tangent)."""
    q, k_pool, v_pool, *ints = primals

    def reference_of(q, k_pool, v_pool):
        return paged_attention_reference(q, k_pool, v_pool, *ints, **params)

    tangents_in = tuple(ad.instantiate_zeros(t) for t in tangents[:3])
    return jax.jvp(reference_of, (q, k_pool, v_pool), tangents_in)


paged_attention_p = define_primitive("paged_attention", paged_attention_reference,
                                     abstract_eval=_abstract_eval, jvp=_jvp)


# ------------------------------------------------------------ public API

_shape_error = functools.partial(shape_error, "paged_attention")


def _check_int(name: str, t, shape: tuple[int, ...] | None, dims: str):
    """``t`` as an int32 array, after checking its kind and (when given) its shape."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"paged_attention: {name} has dtype {np.dtype(t.dtype).name}; expected "
                        f"an int32 array {dims}")
    if shape is not None and tuple(t.shape) != shape:
        raise _shape_error(name, t.shape, f"{dims} = {shape}")
    return t.astype(np.int32)


def paged_attention(q, k_pool, v_pool, block_tables, seq_ids, positions, *, scale=None):
    """Ragged attention over a paged KV cache (vLLM's layout; see the module
    docstring): q (N, heads, H), k_pool and v_pool (num_blocks, block_size,
    kv_heads, H), block_tables (B, W), seq_ids and positions (N,) ->
    (N, heads, H) in q's dtype. Query i attends its sequence's keys at
    positions 0..positions[i]."""
    q, k_pool, v_pool = jnp.asarray(q), jnp.asarray(k_pool), jnp.asarray(v_pool)
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        check_float("paged_attention", name, t)
    if q.ndim != 3:
        raise _shape_error("q", q.shape, "rank 3 (N, heads, H)")
    if k_pool.ndim != 4:
        raise _shape_error("k_pool", k_pool.shape, "rank 4 (num_blocks, block_size, kv_heads, H)")
    n, heads, head_dim = q.shape
    num_blocks, block_size, kv_heads, pool_dim = k_pool.shape
    if pool_dim != head_dim:
        raise _shape_error("k_pool", k_pool.shape, f"(num_blocks, block_size, kv_heads, H) with "
                                                   f"head dim H = {head_dim} as q {q.shape}")
    if v_pool.shape != k_pool.shape:
        raise _shape_error("v_pool", v_pool.shape, f"the shape of k_pool {k_pool.shape}")
    if min(num_blocks, block_size) < 1:
        raise _shape_error("k_pool", k_pool.shape, "at least one block of at least one position")
    if heads < 1 or kv_heads < 1:
        raise ValueError(f"paged_attention: q {q.shape} and k_pool {k_pool.shape} need at least "
                         f"one head each (heads = {heads}, kv_heads = {kv_heads})")
    if heads % kv_heads:
        raise ValueError(f"paged_attention: q has {heads} heads (shape {q.shape}), not a multiple "
                         f"of the pool's {kv_heads} kv_heads (k_pool shape {k_pool.shape})")
    if not q.dtype == k_pool.dtype == v_pool.dtype:
        raise TypeError(f"paged_attention: q, k_pool, v_pool have dtypes {q.dtype}, "
                        f"{k_pool.dtype}, {v_pool.dtype}; expected one dtype")
    block_tables = _check_int("block_tables", block_tables, None, "(B, W)")
    if block_tables.ndim != 2 or min(block_tables.shape) < 1:
        raise _shape_error("block_tables", block_tables.shape,
                           "(B, W) with at least one sequence and one block")
    seq_ids = _check_int("seq_ids", seq_ids, (n,), "(N,)")
    positions = _check_int("positions", positions, (n,), "(N,)")
    if scale is None:
        scale = 1.0 / np.sqrt(head_dim)
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"paged_attention: scale is {scale!r}; expected a Python float or None")
    return paged_attention_p.bind(q, k_pool, v_pool, block_tables, seq_ids, positions,
                                  scale=float(scale))
