"""Matmul-like ops seen as GEMMs: a batch of ``M x N x K`` products with the
bytes of each operand, for the tiling pass's tile search. One rule per op
kind in ``GEMM_SHAPES``."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lowering.ir import Op
from mtia_jax.primitives.mx_matmul import operand_class, operand_layout, operand_nbytes, pair_class


@dataclasses.dataclass(frozen=True)
class GemmShape:
    """A kernel seen as ``batch`` products of (M x K) by (K x N)."""

    batch: int
    m: int
    n: int
    k: int
    lhs_bytes: int   # whole operand, all batches
    rhs_bytes: int
    out_bytes: int
    dtype: str       # operand dtype name, for the engine's peak rate

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.n * self.k


def _size(shape, dims) -> int:
    return math.prod(shape[d] for d in dims)


def _dot_shape(op: Op) -> GemmShape:
    lhs, rhs = op.operands
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    ls, rs = lhs.type.shape, rhs.type.shape
    lfree = [d for d in range(len(ls)) if d not in (*lc, *lb)]
    rfree = [d for d in range(len(rs)) if d not in (*rc, *rb)]
    return GemmShape(_size(ls, lb), _size(ls, lfree), _size(rs, rfree), _size(ls, lc),
                     lhs.type.nbytes, rhs.type.nbytes, op.results[0].type.nbytes,
                     np.dtype(lhs.type.dtype).name)


def _conv_shape(op: Op) -> GemmShape:
    lhs, rhs = op.operands
    out = op.results[0].type
    dn = op.params["dimension_numbers"]
    groups = op.params.get("feature_group_count", 1) * op.params.get("batch_group_count", 1)
    out_features = rhs.type.shape[dn.rhs_spec[0]]
    kernel_k = rhs.type.size // out_features  # in features per group x window
    return GemmShape(groups, out.size // out_features, out_features // groups, kernel_k,
                     lhs.type.nbytes, rhs.type.nbytes, out.nbytes, np.dtype(lhs.type.dtype).name)


def _swiglu_shape(op: Op) -> GemmShape:
    """``swiglu``: x (M, D) against the gate and up weights side by side (D, 2F)."""
    x, w_gate, w_up = (v.type for v in op.operands)
    d, f = w_gate.shape
    return GemmShape(1, x.size // max(d, 1), 2 * f, d, x.nbytes, w_gate.nbytes + w_up.nbytes,
                     op.results[0].type.nbytes, np.dtype(np.result_type(x.dtype, w_gate.dtype)).name)




def mx_matmul_gemm_shape(op: Op):
    """``mx_matmul``: operand bytes packed for MX operands, dtype naming the
    class the product runs at."""
    p = op.params
    na, _ = operand_layout(p)
    a, b = op.operands[0].type, op.operands[na].type
    bs = p["block_size"]
    batch = math.prod(b.shape[:-2])
    m = math.prod(a.shape[:-1]) // max(batch, 1)
    cls = pair_class(operand_class(p["a_format"], a.dtype), operand_class(p["b_format"], b.dtype))
    return GemmShape(batch, m, b.shape[-1], a.shape[-1],
                     operand_nbytes(a.shape, a.dtype, p["a_format"], len(a.shape) - 1, bs),
                     operand_nbytes(b.shape, b.dtype, p["b_format"], len(b.shape) - 2, bs),
                     op.results[0].type.nbytes, CLASS_DTYPE[cls])


# compute class -> a dtype name of that class (the tile search needs a NumPy
# dtype for its element size and a class for its peak rate); fp8 and mx8 have
# the same rate on every catalogued chip that has either
CLASS_DTYPE = {
    "mx4": "float4_e2m1fn", "mx6": "float6_e2m3fn", "mx8": "float8_e4m3fn",
    "fp8": "float8_e4m3fn", "int8": "int8", "bf16": "bfloat16", "fp32": "float32",
}


GEMM_SHAPES = {"dot_general": _dot_shape, "conv_general_dilated": _conv_shape,
               "mx_matmul": mx_matmul_gemm_shape, "swiglu": _swiglu_shape}
