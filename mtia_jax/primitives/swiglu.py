"""``swiglu``: the gated feed-forward input stage ``silu(x @ w_gate) * (x @ w_up)``.

    h = swiglu(x, w_gate, w_up)       # x (..., D), w_gate (D, F), w_up (D, F) -> (..., F)

One kernel: both products run on the matrix engine and the SiLU gate and the
elementwise product are an epilogue on the tiles, so the two (..., F)
intermediates never reach HBM (costed by ``runtime.accelerated.norms``).

Numerics: ``x``, ``w_gate`` and ``w_up`` are promoted to one floating dtype
(``jnp.result_type``, as ``x @ w`` would), the products accumulate in
float32, the epilogue ``g * sigmoid(g) * u`` is computed in float32, and the
result is rounded once to the promoted dtype. Under a precision policy
(``lowering.passes.precision``) the params ``x_format`` / ``w_format`` name
the MX formats of ``x`` (blocks along D) and of the weights (blocks along D;
``w_format`` may be a pair, ``(w_gate's, w_up's)``, when per-group rules
give them different formats): the operands are rounded to those formats
before the products, as ``mx_matmul`` does, and the weights are read packed.

Transformations: ``jax.jit`` runs the reference lowering; JVP (and so
``jax.grad``) differentiates the reference; ``jax.vmap`` keeps the primitive
when only ``x`` is batched (the batch axis becomes a leading row axis) and
maps the reference when a weight is batched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _core
from jax._src.interpreters import batching

from mtia_jax.primitives._base import (check_float, _batching_from, define_primitive, quantized,
                                       weight_formats)

__all__ = ["swiglu", "swiglu_p"]

_HIGHEST = lax.Precision.HIGHEST


def _matmul_f32(x, w):
    """(..., D) @ (D, F) accumulated in float32."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                           precision=(_HIGHEST, _HIGHEST), preferred_element_type=jnp.float32)


def _reference(x, w_gate, w_up, *, x_format=None, w_format=None):
    """silu(x @ w_gate) * (x @ w_up): products in float32, one final rounding."""
    dtype = jnp.result_type(x, w_gate, w_up)
    x, w_gate, w_up = (a.astype(dtype) for a in (x, w_gate, w_up))
    x = quantized(x, x_format, -1)
    gate_format, up_format = weight_formats(w_format, 2)
    w_gate, w_up = quantized(w_gate, gate_format, 0), quantized(w_up, up_format, 0)
    gate = _matmul_f32(x, w_gate)
    up = _matmul_f32(x, w_up)
    return (gate * jax.nn.sigmoid(gate) * up).astype(dtype)


def _abstract_eval(x, w_gate, w_up, **params):
    dtype = jnp.result_type(x.dtype, w_gate.dtype, w_up.dtype)
    return _core.ShapedArray((*x.shape[:-1], w_gate.shape[1]), dtype)


_fallback_batching = _batching_from(_reference)


def _batching_rule(args, dims, **params):
    """Keep the primitive when only ``x`` is batched: the batch axis becomes
    a leading row axis of ``x`` and of the result."""
    x, w_gate, w_up = args
    x_dim, gate_dim, up_dim = dims
    if gate_dim is None and up_dim is None:
        return swiglu_p.bind(jnp.moveaxis(x, x_dim, 0), w_gate, w_up, **params), 0
    return _fallback_batching(args, dims, **params)


swiglu_p = define_primitive("swiglu", _reference, abstract_eval=_abstract_eval,
                            batching_rule=_batching_rule)


def swiglu(x, w_gate, w_up):
    """``silu(x @ w_gate) * (x @ w_up)`` as one kernel.

    Args:
      x: floating-point array ``(..., D)`` (at least one axis).
      w_gate: floating-point array ``(D, F)``, the gate projection.
      w_up: floating-point array ``(D, F)``, the up projection.

    Returns a ``(..., F)`` array in the promoted dtype of the three inputs;
    the products accumulate in float32.
    """
    for name, value in (("x", x), ("w_gate", w_gate), ("w_up", w_up)):
        check_float("swiglu", name, value)
    if x.ndim < 1:
        raise ValueError(f"swiglu: x must have at least one axis (..., D), got shape "
                         f"{tuple(x.shape)}")
    d = x.shape[-1]
    if w_gate.ndim != 2 or w_gate.shape[0] != d:
        raise ValueError(f"swiglu: w_gate must have shape (D, F) with D = {d} (the last axis "
                         f"of x {tuple(x.shape)}), got shape {tuple(w_gate.shape)}")
    if tuple(w_up.shape) != tuple(w_gate.shape):
        raise ValueError(f"swiglu: w_up must have the shape of w_gate (D, F) = "
                         f"{tuple(w_gate.shape)}, got shape {tuple(w_up.shape)}")
    return swiglu_p.bind(x, w_gate, w_up)
