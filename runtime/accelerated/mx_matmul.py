"""Work rule for ``mx_matmul`` (``mtia_jax.primitives.mx_matmul``).

FLOPs: 2 x M x N x K (x batch) on the matrix engine (Dot Product Engine).

Rate: the compute class of the *wider* operand (``pair_class``), i.e. the
slower of the two operands' classes: an MX4-weight x MX8-activation product
runs at the MX8 rate, and MX4 weights against unquantized bf16 activations at
the bf16 rate. Rule chosen: MTIA 450 claims "mixed low-precision compute
without dtype-conversion overhead" [TH26 in hardware-facts §1.2], which we
read as "a mixed pair is consumed directly, with no separate conversion
pass", not as "at the narrow operand's rate": no source gives a mixed
MX4 x MX8 rate for any MTIA chip (assumption; the one published mixed
FP4/FP8 datapath we know, NVIDIA Blackwell's f8f6f4 MMA, runs at its FP8
rate). So no conversion work is charged, and a mixed pair costs what the
wider format costs. The order of widths is ``RATE_ORDER`` (mx4, mx6, mx8,
fp8, int8, bf16, fp32); on every catalogued chip the rates fall or stay equal
along it. Chips without an MX datapath (no ``mx_matmul`` unit, e.g. MTIA v1,
v2i, H100) fall back along the chip's chain in ``ChipSpec.matmul_peak``
(mx4 -> mx6 -> mx8 -> fp8 -> bf16 -> fp32).

HBM bytes: an operand with an MX format is charged at its packed size,
``ceil(size x element_bits / 8)`` + one E8M0 scale byte per block of 32 along
K (``MXType.nbytes``; OCP MX v1.0 §5, hardware-facts §3), whether it arrives
pre-quantized (an ``MXArray``) or is quantized in the op. Assumption for the
latter: a precision policy models weights stored in MX form (quantized once
at load) and activations written in MX form by their producer's epilogue, so
the matmul reads packed data. Operands without a format are charged at their
dtype size; plus the output at its dtype size.
"""

from __future__ import annotations

from lowering.ir import Op, TensorType
from mtia_jax.mx import DEFAULT_BLOCK_SIZE
from mtia_jax.primitives.mx_matmul import (RATE_ORDER, operand_class, operand_layout,
                                           operand_nbytes, pair_class)
from runtime.work import OpWork

__all__ = ["RATE_ORDER", "RULES", "formats_class", "mx_matmul_work", "mx_operands", "packed_bytes"]

# the dedicated unit that runs this op (``ChipSpec.units``)
UNIT = "mx_matmul"


def mx_operands(op: Op) -> tuple[tuple[TensorType, str | None, int], ...]:
    """``(type, format, k_axis)`` of the logical ``a`` and ``b`` operands of an
    ``mx_matmul`` op (a pre-quantized operand's type is that of its elements)."""
    p = op.params
    na, _ = operand_layout(p)
    a, b = op.operands[0].type, op.operands[na].type
    return (a, p["a_format"], len(a.shape) - 1), (b, p["b_format"], len(b.shape) - 2)


def packed_bytes(t: TensorType, fmt: str | None, k_axis: int,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of an operand stored in MX format ``fmt`` (blocks along
    ``k_axis``), or at its dtype size when ``fmt`` is None."""
    return t.nbytes if fmt is None else operand_nbytes(t.shape, None, fmt, k_axis % len(t.shape),
                                                       block_size)


def formats_class(pairs) -> str:
    """The compute class a product of operands ``(format, dtype)`` runs at: the widest."""
    classes = [operand_class(fmt, dtype) for fmt, dtype in pairs]
    return max(classes, key=RATE_ORDER.index)


def mx_matmul_work(op: Op) -> OpWork:
    (a, a_fmt, a_k), (b, b_fmt, b_k) = mx_operands(op)
    out = op.results[0].type
    flops = 2.0 * out.size * a.shape[-1]
    cls = pair_class(operand_class(a_fmt, a.dtype), operand_class(b_fmt, b.dtype))
    p = op.params
    bs = p["block_size"]
    na, nb = operand_layout(p)
    # a pre-quantized operand is two operands (elements, scales): its packed
    # size (scales included) is charged to the elements
    a_reads = (packed_bytes(a, a_fmt, a_k, bs),) + (0.0,) * (na - 1)
    b_reads = (packed_bytes(b, b_fmt, b_k, bs),) + (0.0,) * (nb - 1)
    return OpWork(flops=flops, engine="matrix", dtype=cls, reads=(*a_reads, *b_reads), unit=UNIT)


RULES: dict = {"mx_matmul": mx_matmul_work}
