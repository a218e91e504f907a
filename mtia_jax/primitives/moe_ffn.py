"""``moe_ffn``: a Mixtral-style mixture-of-experts feed-forward layer, one kernel.

    y = moe_ffn(x, router_logits, w_gate, w_up, w_down, top_k=2)
    # x (T, D), router_logits (T, E), w_gate/w_up (E, D, F), w_down (E, F, D) -> (T, D)

Semantics (Mixtral routing, dropless):

    top_vals, experts = top_k(router_logits[t], k)      # k distinct experts per token
    p = softmax(top_vals)                               # over the k chosen logits only
    y[t] = sum_j p[j] * expert_{experts[j]}(x[t])
    expert_e(v) = (silu(v @ w_gate[e]) * (v @ w_up[e])) @ w_down[e]

Every token's k experts run: no capacity limit, no token is dropped. Ties
among logits pick the lower expert index (``lax.top_k``).

Numerics: ``x`` and the three weights are promoted to one floating dtype;
every product accumulates in float32; the hidden activation
``silu(g) * u`` is computed in float32 and rounded to the promoted dtype
before the down projection (the matrix engine's operand); the routing
softmax and the weighted combine of the k expert outputs are float32; the
result is rounded once to the promoted dtype. Under a precision policy
(``lowering.passes.precision``) the params ``x_format`` / ``w_format`` name
the MX formats of the activations (``x`` and the hidden activation, blocks
along their features) and of the expert weights (blocks along each
product's K; ``w_format`` may be a triple, one per weight, when per-group
rules give them different formats): operands are rounded to them before the products, and the
weights are read packed.

The primitive's reference (its lowering under ``jax.jit``, also the
function JVP and batching differentiate/map) is a *dropless block-sparse*
grouped matmul, in the style of MegaBlocks: the T*k (token, expert) slots
are sorted by expert; each expert's group is padded to a multiple of
``B`` rows (``_block_rows``: the mean group size T*k/E rounded up to a power
of two, at most 128); the groups are laid out in one buffer of
``NB = (T*k + E*(B-1)) // B`` blocks (an upper bound on the padded total),
so that every block belongs to one expert; then the three products are
batched matmuls over blocks, each block against its expert's weights.
Arithmetic is about (T*k + E*B) * 6*D*F instead of the dense E*T*6*D*F,
and the reference uses only gather, scatter, sort and dot_general, so its
derivatives import into the MTIA IR too. (``lax.ragged_dot`` would express
the same grouped matmul, but its host lowering is dense over experts.)
The result equals the dense "every expert for every token, then select"
computation up to float32 summation order; the tests check that.

Cost (``runtime.accelerated.moe``): the MoE FFN unit of MTIA 450/500; on
other chips the dispatch and combine traffic is charged as well.

Transformations: ``jax.jit`` runs the reference lowering; JVP (and so
``jax.grad``, w.r.t. ``x``, ``router_logits`` through the softmax of the
chosen logits, and the weights) differentiates the reference; ``jax.vmap``
keeps the primitive when the weights are not batched (the batch axis is
folded into the token axis T: tokens are independent) and maps the
reference otherwise.

Expert parallelism. When the partition pass splits the experts over a mesh
axis of G devices (``lowering.passes.partition_moe``), each device runs the
layer as three kernels around two ``all_to_all``s, with the same numerics:

    send = moe_dispatch_p(x, logits)        # (E, T, D): row [e, t] = x[t] if t routes to e, else 0
    rows = all_to_all(send, split=0, concat=1)           # (E/G, G T, D): my experts' rows
    y    = moe_experts_p(rows, w_gate, w_up, w_down)     # (E/G, G T, D) float32
    back = all_to_all(y, split=1, concat=0)              # (E, T, D) float32
    out  = moe_combine_p(back, logits)      # (T, D): sum_j p[j] * back[experts[j], t]

Every expert's rows sit at fixed places (expert, source device, token), so
no capacity limit drops a token and no expert ids travel. The expert
outputs come back in float32, the kernel's own accumulator, so the combine
is the unsharded kernel's float32 combine and the layer equals the
unsharded one up to float32 summation order.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _core

from mtia_jax.primitives._base import (check_float, _batching_from, define_primitive, quantized,
                                       weight_formats)

__all__ = ["moe_ffn", "moe_ffn_p", "route", "moe_dispatch_p", "moe_experts_p", "moe_combine_p"]

_HIGHEST = lax.Precision.HIGHEST
MAX_BLOCK_ROWS = 128  # rows per block of the grouped matmul (a matrix-engine tile's order)


# ------------------------------------------------------------ routing

def route(router_logits, top_k: int):
    """Mixtral routing: ``(weights (T, k) float32, experts (T, k) int32)``:
    the k largest logits per token (ties: lower index first) and the softmax
    over those k logits."""
    top_vals, experts = lax.top_k(router_logits, top_k)
    return jax.nn.softmax(top_vals.astype(jnp.float32), axis=-1), experts.astype(jnp.int32)


# ------------------------------------------------------------ reference

def _block_rows(num_slots: int, num_experts: int) -> int:
    """Rows per block: the mean group size rounded up to a power of two, in [1, 128]."""
    mean = -(-num_slots // num_experts)
    return int(min(MAX_BLOCK_ROWS, 1 << max(mean - 1, 0).bit_length()))


def _block_matmul_f32(blocks, weights):
    """(NB, B, K) @ (NB, K, N) per block, accumulated in float32."""
    return lax.dot_general(blocks, weights, (((2,), (1,)), ((0,), (0,))),
                           precision=(_HIGHEST, _HIGHEST), preferred_element_type=jnp.float32)


def _exclusive_cumsum(v):
    return jnp.cumsum(v) - v


def _reference(x, router_logits, w_gate, w_up, w_down, *, top_k, x_format=None, w_format=None):
    """Dropless block-sparse MoE (see the module docstring)."""
    dtype = jnp.result_type(x, w_gate, w_up, w_down)
    x, w_gate, w_up, w_down = (a.astype(dtype) for a in (x, w_gate, w_up, w_down))
    x = quantized(x, x_format, -1)
    w_gate, w_up, w_down = _quantized_experts(w_gate, w_up, w_down, w_format)
    (t, d), e = x.shape, w_gate.shape[0]
    slots = t * top_k
    rows_per_block = _block_rows(slots, e)
    num_blocks = (slots + e * (rows_per_block - 1)) // rows_per_block
    weights, experts = route(router_logits, top_k)

    # Dispatch: slot s = token * k + j goes to buffer row row_of_slot[s];
    # each expert's rows start at a block boundary.
    expert_of_slot = experts.reshape(slots)
    order = jnp.argsort(expert_of_slot, stable=True)          # slots sorted by expert
    counts = jnp.zeros(e, jnp.int32).at[expert_of_slot].add(1)
    padded = (counts + rows_per_block - 1) // rows_per_block * rows_per_block
    sorted_expert = expert_of_slot[order]
    rank_in_group = jnp.arange(slots, dtype=jnp.int32) - _exclusive_cumsum(counts)[sorted_expert]
    row_of_sorted = _exclusive_cumsum(padded)[sorted_expert] + rank_in_group
    row_of_slot = jnp.zeros(slots, jnp.int32).at[order].set(row_of_sorted)
    # token feeding each buffer row; padding rows read an extra zero row (index t)
    token_of_row = jnp.full(num_blocks * rows_per_block, t, jnp.int32).at[row_of_slot].set(
        jnp.arange(slots, dtype=jnp.int32) // top_k)
    x_rows = jnp.concatenate([x, jnp.zeros((1, d), dtype)])[token_of_row]
    x_blocks = x_rows.reshape(num_blocks, rows_per_block, d)
    # expert of each block: how many experts' padded groups end at or before it
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * rows_per_block
    ends = jnp.cumsum(padded)
    block_expert = jnp.minimum(jnp.sum(ends[None, :] <= block_start[:, None], axis=1), e - 1)

    # Expert FFNs, block by block
    y_rows = _expert_ffn(x_blocks, w_gate[block_expert], w_up[block_expert],
                         w_down[block_expert], x_format).reshape(-1, d)

    # Combine: each token's k expert outputs, weighted, in float32
    return _combine(weights, y_rows[row_of_slot].reshape(t, top_k, d), dtype)


def _quantized_experts(w_gate, w_up, w_down, w_format):
    """The expert weights rounded to ``w_format`` (one format, or one per
    weight; blocks along each product's K)."""
    return tuple(quantized(w, fmt, -2)
                 for w, fmt in zip((w_gate, w_up, w_down), weight_formats(w_format, 3)))


def _expert_ffn(rows, w_gate, w_up, w_down, x_format=None):
    """``(G, R, D)`` rows through G expert FFNs (weights ``(G, D, F)``,
    ``(G, D, F)``, ``(G, F, D)``) -> ``(G, R, D)`` float32; the hidden
    activation is rounded to the rows' dtype (and to ``x_format``, the
    activations' MX format under a precision policy) before the down projection."""
    gate = _block_matmul_f32(rows, w_gate)
    up = _block_matmul_f32(rows, w_up)
    hidden = quantized((gate * jax.nn.sigmoid(gate) * up).astype(rows.dtype), x_format, -1)
    return _block_matmul_f32(hidden, w_down)


def _combine(weights, y_slots, dtype):
    """``sum_j weights[t, j] * y_slots[t, j]`` in float32, rounded once to ``dtype``."""
    return jnp.sum(weights[:, :, None] * y_slots, axis=1).astype(dtype)


# ------------------------------------------------------------ rules

def _abstract_eval(x, router_logits, w_gate, w_up, w_down, *, top_k, **formats):
    dtype = jnp.result_type(x.dtype, w_gate.dtype, w_up.dtype, w_down.dtype)
    return _core.ShapedArray(x.shape, dtype)


_fallback_batching = _batching_from(_reference)


def _batching_rule(args, dims, *, top_k, **formats):
    """Unbatched weights: fold the batch axis into the token axis (tokens are
    routed independently), so one primitive serves the whole batch."""
    x, logits, *weights = args
    x_dim, logits_dim, *weight_dims = dims
    if any(dim is not None for dim in weight_dims):
        return _fallback_batching(args, dims, top_k=top_k, **formats)
    size = (x if x_dim is not None else logits).shape[x_dim if x_dim is not None else logits_dim]

    def to_front(a, dim):
        if dim is None:
            return jnp.broadcast_to(a, (size, *a.shape))
        return jnp.moveaxis(a, dim, 0)

    x, logits = to_front(x, x_dim), to_front(logits, logits_dim)
    v, t = x.shape[:2]
    out = moe_ffn_p.bind(x.reshape(v * t, -1), logits.reshape(v * t, -1), *weights, top_k=top_k,
                         **formats)
    return out.reshape(v, t, -1), 0


moe_ffn_p = define_primitive("moe_ffn", _reference, abstract_eval=_abstract_eval,
                             batching_rule=_batching_rule)


# ------------------------------------------------------------ expert parallelism

def _dispatch(x, router_logits, *, top_k, dtype):
    """``(E, T, D)`` in ``dtype``: row ``[e, t]`` is token t if it routes to
    expert e, else zeros."""
    _, experts = route(router_logits, top_k)
    num_experts = router_logits.shape[1]
    routed = jnp.any(experts[None] == jnp.arange(num_experts, dtype=jnp.int32)[:, None, None], axis=-1)
    return jnp.where(routed[:, :, None], x.astype(dtype)[None], jnp.zeros((), dtype))


def _experts(rows, w_gate, w_up, w_down, *, x_format=None, w_format=None):
    """The device's experts on the rows they received: ``(G, R, D)`` float32."""
    weights = _quantized_experts(*(w.astype(rows.dtype) for w in (w_gate, w_up, w_down)), w_format)
    return _expert_ffn(quantized(rows, x_format, -1), *weights, x_format)


def _combine_returned(returned, router_logits, *, top_k, dtype):
    """``(T, D)``: each token's k expert outputs, read back from ``returned``
    ``(E, T, D)`` float32 at (its expert, itself) and combined."""
    weights, experts = route(router_logits, top_k)
    tokens = jnp.arange(returned.shape[1], dtype=jnp.int32)[:, None]
    return _combine(weights, returned[experts, tokens], dtype)


moe_dispatch_p = define_primitive("moe_dispatch", _dispatch)
moe_experts_p = define_primitive("moe_experts", _experts)
moe_combine_p = define_primitive("moe_combine", _combine_returned)


# ------------------------------------------------------------ public API

def _check_shape(name: str, value, expected: tuple, meaning: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(f"moe_ffn: {name} must have shape {meaning} = {expected}, got shape "
                         f"{tuple(value.shape)}")


def _check_top_k(top_k, num_experts: int) -> int:
    try:
        k = operator.index(top_k)
    except TypeError:
        raise TypeError(f"moe_ffn: top_k must be a Python int, got {type(top_k).__name__} "
                        f"{top_k!r}") from None
    if not 1 <= k <= num_experts:
        raise ValueError(f"moe_ffn: top_k must be in [1, E] = [1, {num_experts}] (E from "
                         f"router_logits and the weights), got top_k={k}")
    return k


def moe_ffn(x, router_logits, w_gate, w_up, w_down, *, top_k: int = 2):
    """A dropless top-k mixture of SwiGLU experts (Mixtral routing) as one kernel.

    Args:
      x: floating-point array ``(T, D)``: T tokens of D features.
      router_logits: floating-point array ``(T, E)``: one logit per token and expert.
      w_gate: ``(E, D, F)``, the experts' gate projections.
      w_up: ``(E, D, F)``, the experts' up projections.
      w_down: ``(E, F, D)``, the experts' down projections.
      top_k: experts per token, ``1 <= top_k <= E``.

    Returns ``(T, D)`` in the promoted dtype of ``x`` and the weights:
    ``sum_j softmax(top_k logits)[j] * expert_j(x)``, with
    ``expert_e(v) = (silu(v @ w_gate[e]) * (v @ w_up[e])) @ w_down[e]``.
    """
    for name, value in (("x", x), ("router_logits", router_logits), ("w_gate", w_gate),
                        ("w_up", w_up), ("w_down", w_down)):
        check_float("moe_ffn", name, value)
    if x.ndim != 2:
        raise ValueError(f"moe_ffn: x must have shape (T, D), got shape {tuple(x.shape)}; "
                         f"flatten the batch and sequence axes into T (or jax.vmap)")
    t, d = x.shape
    if router_logits.ndim != 2 or router_logits.shape[0] != t:
        raise ValueError(f"moe_ffn: router_logits must have shape (T, E) with T = {t} (the "
                         f"tokens of x {tuple(x.shape)}), got shape {tuple(router_logits.shape)}")
    e = router_logits.shape[1]
    if w_gate.ndim != 3 or w_gate.shape[:2] != (e, d):
        raise ValueError(f"moe_ffn: w_gate must have shape (E, D, F) with E = {e} (from "
                         f"router_logits) and D = {d} (from x), got shape {tuple(w_gate.shape)}")
    f = w_gate.shape[2]
    _check_shape("w_up", w_up, (e, d, f), "(E, D, F) like w_gate")
    _check_shape("w_down", w_down, (e, f, d), "(E, F, D)")
    k = _check_top_k(top_k, e)
    return moe_ffn_p.bind(x, router_logits, w_gate, w_up, w_down, top_k=k)
