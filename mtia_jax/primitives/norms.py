"""``rms_norm`` and ``layer_norm``: normalization over the last axis, one kernel each.

    y = rms_norm(x, weight)                  # x (..., D), weight (D,)
    y = layer_norm(x, weight, bias)          # x (..., D), weight (D,), bias (D,)

Semantics (the textbook formulas, per row of D elements along the last axis):

    rms_norm:   y = x / sqrt(mean(x**2) + eps) * weight
    layer_norm: y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias
                (var is the biased variance, mean((x - mean(x))**2))

Every intermediate is computed in float32 (``x``, ``weight`` and ``bias`` are
converted exactly); the result is rounded once to ``x``'s dtype. The
defaults follow common practice: ``eps=1e-6`` for RMSNorm (Llama,
``flax.nnx.RMSNorm``) and ``eps=1e-5`` for LayerNorm (``torch.nn.LayerNorm``).

Each function binds one primitive (``rms_norm_p``, ``layer_norm_p``) whose
param is ``eps`` (a Python float); the compiler imports it as one MTIA op of
the same name, costed by ``runtime.accelerated.norms`` (inputs and outputs
cross HBM once; the statistics never leave the chip).

Transformations: ``jax.jit`` runs the reference lowering; JVP (and so
``jax.grad``) differentiates the reference; ``jax.vmap`` keeps the primitive
when only ``x`` is batched (the batch axis becomes one more leading row
axis) and maps the reference otherwise (a batched ``weight``/``bias``).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _core
from jax._src.interpreters import batching

from mtia_jax.primitives._base import check_float, _batching_from, define_primitive

__all__ = ["rms_norm", "layer_norm", "rms_norm_p", "layer_norm_p"]


# ------------------------------------------------------------ references

def _rms_norm_reference(x, weight, *, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * lax.rsqrt(mean_square + jnp.float32(eps)) * weight.astype(jnp.float32)
    return y.astype(x.dtype)


def _layer_norm_reference(x, weight, bias, *, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    variance = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    y = centered * lax.rsqrt(variance + jnp.float32(eps))
    y = y * weight.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


# ------------------------------------------------------------ rules

def _abstract_eval(x, *params_arrays, eps):
    return _core.ShapedArray(x.shape, x.dtype)


def _batching_rule_for(prim, reference):
    """Keep the primitive when only ``x`` is batched: its batch axis becomes
    a leading row axis. A batched weight/bias maps the reference."""
    fallback = _batching_from(reference)

    def rule(args, dims, **params):
        x, *rest = args
        x_dim, *rest_dims = dims
        if all(isinstance(d, batching.NotMapped) or d is None for d in rest_dims):
            x = jnp.moveaxis(x, x_dim, 0)
            return prim.bind(x, *rest, **params), 0
        return fallback(args, dims, **params)

    return rule


rms_norm_p = define_primitive("rms_norm", _rms_norm_reference, abstract_eval=_abstract_eval)
layer_norm_p = define_primitive("layer_norm", _layer_norm_reference, abstract_eval=_abstract_eval)
batching.primitive_batchers[rms_norm_p] = _batching_rule_for(rms_norm_p, _rms_norm_reference)
batching.primitive_batchers[layer_norm_p] = _batching_rule_for(layer_norm_p, _layer_norm_reference)


# ------------------------------------------------------------ public API

def _check_eps(fn: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating, np.integer)):
        raise TypeError(f"{fn}: eps must be a Python float, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not np.isfinite(eps) or eps < 0:
        raise ValueError(f"{fn}: eps must be finite and >= 0, got {eps!r}")
    return eps


def _check_x(fn: str, x) -> int:
    check_float(fn, "x", x)
    if x.ndim < 1:
        raise ValueError(f"{fn}: x must have at least one axis (..., D), got a scalar of shape "
                         f"{tuple(x.shape)}")
    return x.shape[-1]


def _check_feature_param(fn: str, name: str, value, d: int, x_shape) -> None:
    check_float(fn, name, value)
    if tuple(value.shape) != (d,):
        raise ValueError(f"{fn}: {name} must have shape (D,) = ({d},) to match the last axis "
                         f"of x {tuple(x_shape)}, got shape {tuple(value.shape)}")


def rms_norm(x, weight, *, eps: float = 1e-6):
    """RMS normalization of ``x`` over its last axis, scaled by ``weight``.

    Args:
      x: floating-point array ``(..., D)``.
      weight: floating-point array ``(D,)``.
      eps: added to the mean square before the reciprocal square root.

    Returns ``x / sqrt(mean(x**2, -1) + eps) * weight``, computed in float32,
    in ``x``'s dtype and shape.
    """
    d = _check_x("rms_norm", x)
    _check_feature_param("rms_norm", "weight", weight, d, x.shape)
    return rms_norm_p.bind(x, weight, eps=_check_eps("rms_norm", eps))


def layer_norm(x, weight, bias, *, eps: float = 1e-5):
    """Layer normalization of ``x`` over its last axis, then ``* weight + bias``.

    Args:
      x: floating-point array ``(..., D)``.
      weight: floating-point array ``(D,)`` (the scale).
      bias: floating-point array ``(D,)`` (the offset).
      eps: added to the (biased) variance before the reciprocal square root.

    Returns ``(x - mean) / sqrt(var + eps) * weight + bias``, computed in
    float32, in ``x``'s dtype and shape.
    """
    d = _check_x("layer_norm", x)
    _check_feature_param("layer_norm", "weight", weight, d, x.shape)
    _check_feature_param("layer_norm", "bias", bias, d, x.shape)
    return layer_norm_p.bind(x, weight, bias, eps=_check_eps("layer_norm", eps))
