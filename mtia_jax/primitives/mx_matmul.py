"""``mx_matmul``: a matrix product of OCP MX operands (MTIA's MX matmul datapath).

    y = mx_matmul(x, w, a_format="mx8", b_format="mx4")      # (..., M, K) @ (K, N)
    w_q = mx.quantize(w, "mx4", axis=0)                        # weights quantized once
    y = mx_matmul(x, w_q, a_format="mx8")                      # pre-quantized operand

Semantics (OCP MX v1.0 §6.1-6.2, hardware-facts §3.6): each operand is
quantized in blocks of ``block_size`` (32) consecutive values along the
contraction axis K (``a``'s last axis, ``b``'s first non-batch axis), and

    C[m, n] = sum_j X_j(a[m]) * X_j(b[:, n]) * sum_{i in block j} P_i(a[m]) * P_i(b[:, n])

accumulated in float32 and cast to ``out_dtype``. Every element product and
every product of two block scales is exact in float32, so this equals
"dequantize both operands to float32, then a float32 matmul" up to the order
of the float32 summation; the reference implementation (the lowering used on
the host) is exactly that. An operand whose format is ``None`` is used as it
is (converted to float32 exactly for the accumulation).

Operands of the primitive ``mx_matmul_p``: ``a`` then ``b``, each either one
floating-point array (quantized inside the op when its format is set) or,
when pre-quantized (``a_packed``/``b_packed``), the two arrays of an
``mtia_jax.mx.MXArray``: elements then scales. Params (hashable):
``a_format``/``b_format`` (canonical MX format names or None), ``a_packed``/
``b_packed``, ``block_size`` and ``out_dtype`` (a NumPy dtype).

Shapes: ``a`` is ``(*batch, M, K)``; ``b`` is ``(K, N)`` (shared by every
batch entry) or ``(*batch, K, N)`` with the same batch dims as ``a``
(a batched product). The result is ``(*batch, M, N)``.

Autodiff is straight-through (like ``mx.fake_quantize``): the derivative is
that of ``dequantize(quantize(a)) @ dequantize(quantize(b))`` with respect
to the *unquantized* inputs, i.e. ``da @ deq(b) + deq(a) @ db``.
Pre-quantized operands (their elements and scales) get no gradient.
``jax.vmap`` keeps the primitive: a batch axis is added to the batch dims, or
folded into M (batched ``a`` against a per-entry ``b``) or N (batched ``b``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _core
from jax._src.interpreters import batching
from jax.interpreters import ad

from mtia_jax import chips, mx
from mtia_jax.primitives._base import define_primitive

__all__ = ["RATE_ORDER", "mx_matmul", "mx_matmul_p", "operand_class", "operand_layout",
           "operand_nbytes", "pair_class"]

_HIGHEST = lax.Precision.HIGHEST

# Compute classes (``mtia_jax.chips``) from narrowest (fastest) to widest
# (slowest). A product of two operands runs at the rate of the later class of
# the two (see ``runtime.accelerated.mx_matmul`` for why). Assumption: int8
# (MXINT8) sits with the 8-bit floats (chips without int8 run it at fp8).
RATE_ORDER = ("mx4", "mx6", "mx8", "fp8", "int8", "bf16", "fp32")


# ------------------------------------------------------------ params helpers

def operand_layout(params: dict[str, Any]) -> tuple[int, int]:
    """How many primitive operands ``a`` and ``b`` take (1 raw, 2 packed)."""
    return (2 if params["a_packed"] else 1), (2 if params["b_packed"] else 1)


def operand_class(fmt: str | None, dtype) -> str:
    """Compute class of one operand: its MX format's, else its dtype's."""
    return chips.compute_class(fmt if fmt is not None else dtype)


def pair_class(a_class: str, b_class: str) -> str:
    """The class a product of the two runs at: the wider (slower) one."""
    return max(a_class, b_class, key=RATE_ORDER.index)


def operand_nbytes(shape, dtype, fmt: str | None, k_axis: int, block_size: int) -> int:
    """Storage bytes of one operand: for an MX format its packed size,
    ``ceil(size x element_bits / 8)`` + one scale byte per block along K;
    else ``size x itemsize``."""
    if fmt is None:
        return math.prod(shape) * np.dtype(dtype).itemsize
    return mx.MXType(fmt, block_size).nbytes(tuple(shape), k_axis)


def _split(operands, params):
    na, _ = operand_layout(params)
    return list(operands[:na]), list(operands[na:])


def _k_axis(side: str, ndim: int) -> int:
    """The contraction axis of operand ``side`` of rank ``ndim``."""
    return ndim - 1 if side == "a" else ndim - 2


def _dequantized(parts, side: str, fmt: str | None, packed: bool, block_size: int):
    """Operand ``side`` as the float32 values the matrix engine multiplies."""
    if packed:
        elements, scales = parts
        q = mx.MXArray(elements, scales, fmt, _k_axis(side, elements.ndim), block_size)
        return mx.dequantize(q, jnp.float32)
    (x,) = parts
    x = x.astype(jnp.float32)
    if fmt is None:
        return x
    return mx.dequantize(mx.quantize(x, fmt, _k_axis(side, x.ndim), block_size), jnp.float32)


def _dot_f32(a, b):
    """fp32 ``(*batch, M, K) @ (K, N)`` or ``(*batch, M, K) @ (*batch, K, N)``."""
    if b.ndim == 2:
        dims = (((a.ndim - 1,), (0,)), ((), ()))
    else:
        nb = b.ndim - 2
        dims = (((a.ndim - 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    return lax.dot_general(a, b, dims, precision=(_HIGHEST, _HIGHEST),
                           preferred_element_type=jnp.float32)


def _reference(*operands, a_format, b_format, a_packed, b_packed, block_size, out_dtype):
    """Dequantize both operands to float32 (exact), multiply in float32, cast."""
    params = dict(a_packed=a_packed, b_packed=b_packed)
    a_parts, b_parts = _split(operands, params)
    a = _dequantized(a_parts, "a", a_format, a_packed, block_size)
    b = _dequantized(b_parts, "b", b_format, b_packed, block_size)
    return _dot_f32(a, b).astype(out_dtype)


# ------------------------------------------------------------ shape checking

def _check_shapes(a_shape, b_shape, *, a_name="a", b_name="b") -> tuple[int, ...]:
    """The result shape of ``a @ b``, or a ValueError naming what is wrong."""
    if len(a_shape) < 2:
        raise ValueError(f"mx_matmul: {a_name} must have rank >= 2 (..., M, K), got shape "
                         f"{tuple(a_shape)}; add an M axis with x[None, :] for a vector")
    if len(b_shape) < 2:
        raise ValueError(f"mx_matmul: {b_name} must have rank >= 2 (K, N) or (..., K, N), got "
                         f"shape {tuple(b_shape)}")
    if a_shape[-1] != b_shape[-2]:
        raise ValueError(f"mx_matmul: contraction sizes differ: {a_name} {tuple(a_shape)} has "
                         f"K={a_shape[-1]} on its last axis, {b_name} {tuple(b_shape)} has "
                         f"K={b_shape[-2]} on axis {len(b_shape) - 2}")
    if len(b_shape) > 2 and tuple(a_shape[:-2]) != tuple(b_shape[:-2]):
        raise ValueError(f"mx_matmul: a batched {b_name} {tuple(b_shape)} needs the same batch "
                         f"dims as {a_name} {tuple(a_shape)}: expected {a_name}.shape[:-2] == "
                         f"{tuple(b_shape[:-2])}, got {tuple(a_shape[:-2])}")
    return tuple(a_shape[:-1]) + (b_shape[-1],)


def _abstract_eval(*avals, a_format, b_format, a_packed, b_packed, block_size, out_dtype):
    a_avals, b_avals = _split(avals, dict(a_packed=a_packed, b_packed=b_packed))
    out_shape = _check_shapes(a_avals[0].shape, b_avals[0].shape)
    return _core.ShapedArray(out_shape, np.dtype(out_dtype))


# ------------------------------------------------------------ JVP (straight-through)

def _jvp(primals, tangents, **params):
    out = mx_matmul_p.bind(*primals, **params)
    a_parts, b_parts = _split(primals, params)
    ta_parts, tb_parts = _split(tangents, params)
    bs = params["block_size"]
    terms = []
    if not params["a_packed"] and not isinstance(ta_parts[0], ad.Zero):
        b = _dequantized(b_parts, "b", params["b_format"], params["b_packed"], bs)
        terms.append(_dot_f32(ta_parts[0].astype(jnp.float32), b))
    if not params["b_packed"] and not isinstance(tb_parts[0], ad.Zero):
        a = _dequantized(a_parts, "a", params["a_format"], params["a_packed"], bs)
        terms.append(_dot_f32(a, tb_parts[0].astype(jnp.float32)))
    if not terms:
        return out, ad.Zero.from_primal_value(out)
    return out, sum(terms[1:], terms[0]).astype(out.dtype)


# ------------------------------------------------------------ batching

def _to_front(parts, dims, size):
    """Every part with its batch axis at 0 (unbatched parts are broadcast)."""
    out = []
    for x, d in zip(parts, dims):
        if d is None:
            x = jnp.broadcast_to(x[None], (size, *x.shape))
        else:
            x = jnp.moveaxis(x, d, 0)
        out.append(x)
    return out


def _fold_into_m(x):
    """(B, *batch, M, X) -> (*batch, B * M, X): a batch axis merged into M."""
    x = jnp.moveaxis(x, 0, -3)
    return x.reshape(*x.shape[:-3], x.shape[-3] * x.shape[-2], x.shape[-1])


def _fold_into_n(x):
    """(B, *batch, X, N) -> (*batch, X, B * N): a batch axis merged into N."""
    x = jnp.moveaxis(x, 0, -2)
    return x.reshape(*x.shape[:-3], x.shape[-3], x.shape[-2] * x.shape[-1])


def _flatten_batch_into_m(x):
    """(B, *batch, M, X) -> (B, prod(batch) * M, X)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def _batch(args, dims, **params):
    dims = [None if isinstance(d, batching.NotMapped) or d is None else d for d in dims]
    a_parts, b_parts = _split(args, params)
    a_dims, b_dims = _split(dims, params)
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
    a_batched = any(d is not None for d in a_dims)
    b_batched = any(d is not None for d in b_dims)
    if a_batched:
        a_parts = _to_front(a_parts, a_dims, size)
    if b_batched:
        b_parts = _to_front(b_parts, b_dims, size)
    b_rank = b_parts[0].ndim - (1 if b_batched else 0)  # b's rank without the vmapped axis

    if a_batched and not b_batched:
        if b_rank == 2:  # the new axis is one more batch dim of a
            return mx_matmul_p.bind(*a_parts, *b_parts, **params), 0
        out = mx_matmul_p.bind(*(_fold_into_m(x) for x in a_parts), *b_parts, **params)
        m = a_parts[0].shape[-2]
        out = out.reshape(*out.shape[:-2], size, m, out.shape[-1])
        return out, out.ndim - 3
    if b_batched and not a_batched:
        out = mx_matmul_p.bind(*a_parts, *(_fold_into_n(x) for x in b_parts), **params)
        n = b_parts[0].shape[-1]
        out = out.reshape(*out.shape[:-1], size, n)
        return out, out.ndim - 2
    # both batched: b becomes a batched operand with the vmapped axis as its batch
    if b_rank == 2:
        a_shape = a_parts[0].shape
        out = mx_matmul_p.bind(*(_flatten_batch_into_m(x) for x in a_parts), *b_parts, **params)
        return out.reshape(*a_shape[:-1], out.shape[-1]), 0
    return mx_matmul_p.bind(*a_parts, *b_parts, **params), 0


mx_matmul_p = define_primitive("mx_matmul", _reference, abstract_eval=_abstract_eval,
                               jvp=_jvp, batching_rule=_batch)


# ------------------------------------------------------------ public function

def _format_name(fmt, name: str) -> str | None:
    if fmt is None:
        return None
    try:
        return mx.get_format(fmt).name
    except ValueError as e:
        raise ValueError(f"mx_matmul: {name}: {e}") from None


def _operand(x, side: str, fmt, block_size: int | None):
    """(primitive operands, format name, packed, block size) for one operand."""
    name = f"{side}_format"
    if isinstance(x, mx.MXArray):
        expected = _k_axis(side, x.ndim)
        if x.ndim < 2 or x.axis != expected:
            where = "its last axis" if side == "a" else "axis ndim - 2 (K of (..., K, N))"
            raise ValueError(
                f"mx_matmul: {side} is an MXArray of shape {x.shape} quantized along axis "
                f"{x.axis}; it must be quantized along the contraction axis, {where} = "
                f"{expected}: use mx.quantize(x, fmt, axis={expected})")
        fmt_name = _format_name(fmt, name)
        if fmt_name is not None and fmt_name != x.format.name:
            raise ValueError(f"mx_matmul: {name}={fmt!r} but {side} is an MXArray in "
                             f"{x.format.name}; pass {name}=None (or the same format)")
        if block_size is not None and block_size != x.block_size:
            raise ValueError(f"mx_matmul: block_size={block_size} but {side} is an MXArray "
                             f"with block size {x.block_size}")
        return [x.elements, x.scales], x.format.name, True, x.block_size
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"mx_matmul: {side} must be a floating-point array or an mx.MXArray, "
                        f"got dtype {x.dtype} (shape {tuple(x.shape)}); convert it with "
                        f".astype(jnp.float32)")
    return [x], _format_name(fmt, name), False, block_size


def mx_matmul(a, b, *, a_format=None, b_format=None, out_dtype=jnp.float32,
              block_size: int | None = None) -> jax.Array:
    """``a @ b`` with MX operands, fp32 accumulation, cast to ``out_dtype``.

    Args:
      a: ``(*batch, M, K)`` floating-point array, or an ``mx.MXArray``
        quantized along its last axis.
      b: ``(K, N)`` or ``(*batch, K, N)`` floating-point array, or an
        ``mx.MXArray`` quantized along axis ``ndim - 2``.
      a_format, b_format: MX format names or aliases (``"mxfp8_e4m3"``,
        ``"mx4"``, ...) to quantize a raw operand in (blocks along K), or
        None to use it as it is. For an MXArray: None or its own format.
      out_dtype: floating-point dtype of the result.
      block_size: MX block size along K (default 32, or that of the MXArray
        operands, which must agree).
    """
    if block_size is not None:
        block_size = mx._check_block_size(block_size)
    a_parts, a_fmt, a_packed, a_bs = _operand(a, "a", a_format, block_size)
    b_parts, b_fmt, b_packed, b_bs = _operand(b, "b", b_format, block_size)
    if a_bs is not None and b_bs is not None and a_bs != b_bs:
        raise ValueError(f"mx_matmul: the operands' MX block sizes differ ({a_bs} for a, "
                         f"{b_bs} for b); the block dot product needs aligned blocks")
    block_size = a_bs or b_bs or mx.DEFAULT_BLOCK_SIZE
    try:
        out_dtype = np.dtype(out_dtype)
    except TypeError:
        raise TypeError(f"mx_matmul: out_dtype must be a floating-point dtype, got "
                        f"{out_dtype!r}") from None
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise TypeError(f"mx_matmul: out_dtype must be a floating-point dtype, got {out_dtype}")
    _check_shapes(a_parts[0].shape, b_parts[0].shape)
    return mx_matmul_p.bind(*a_parts, *b_parts, a_format=a_fmt, b_format=b_fmt,
                            a_packed=a_packed, b_packed=b_packed, block_size=block_size,
                            out_dtype=out_dtype)
