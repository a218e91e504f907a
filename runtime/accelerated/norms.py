"""Work rules for ``rms_norm``, ``layer_norm`` and ``swiglu`` (``mtia_jax.primitives``).

Each is one kernel: its inputs are read from HBM once and its result written
once (the default reads and writes; ``swiglu`` under a precision policy reads
its MX operands packed); the row statistics and the gate/up activations stay
on chip.

Per-element and per-row operation counts (our convention; XLA has none for
fused normalizations). With ``n`` elements in ``rows`` rows of ``D``:

    rms_norm:   4 n (square, accumulate, scale by 1/rms, scale by weight)
                + 2 rows (divide the sum by D, add eps), rows rsqrt
    layer_norm: 7 n (accumulate x, subtract the mean, square, accumulate,
                scale by 1/std, scale by weight, add bias)
                + 3 rows (two divides by D, add eps), rows rsqrt

on the vector units at the float32 rate (the kernels compute in float32;
see ``mtia_jax.primitives.norms``), with the reciprocal square roots on the
special-function unit.

swiglu ``silu(x @ w_gate) * (x @ w_up)`` with ``M`` rows of ``x``, ``D``
input and ``F`` hidden features: 2 * 2 M D F FLOPs for the two products on
the matrix engine at the operands' rate, then the epilogue on each of the
M F hidden elements: one sigmoid (a special-function evaluation,
``transcendentals``) and two multiplies (``silu(g) = g * sigmoid(g)``, then
``* up``), 2 M F FLOPs. These are the counts ``runtime.op_work`` gives the
unfused ``jax.nn.silu(x @ w_gate) * (x @ w_up)`` (XLA's are 3 M F higher: it
expands the sigmoid into negate, exp, add and divide). An ``OpWork`` has one engine, so
the 2 M F epilogue multiplies are timed with the matrix-engine FLOPs
(1 / (2 D) of them); the sigmoids run at the vector rate.
"""

from __future__ import annotations

import numpy as np

from mtia_jax.primitives._base import weight_formats
from runtime.accelerated.mx_matmul import formats_class, packed_bytes
from runtime.work import OpWork

# rms_norm: square, accumulate, scale by 1/rms, scale by weight
RMS_NORM_FLOPS_PER_ELEMENT = 4
# rms_norm: divide the sum of squares by D, add eps
RMS_NORM_FLOPS_PER_ROW = 2
# layer_norm: accumulate, subtract mean, square, accumulate, scale, * weight, + bias
LAYER_NORM_FLOPS_PER_ELEMENT = 7
# layer_norm: divide the two sums by D, add eps
LAYER_NORM_FLOPS_PER_ROW = 3
# swiglu epilogue per hidden element: g * sigmoid(g), then * up
SWIGLU_EPILOGUE_FLOPS = 2


def _rows_and_elements(op) -> tuple[int, int]:
    x = op.operands[0].type
    d = x.shape[-1] if x.shape else 1
    return x.size // max(d, 1), x.size


def _norm_work(per_element: int, per_row: int):
    def rule(op) -> OpWork:
        rows, n = _rows_and_elements(op)
        return OpWork(flops=per_element * n + per_row * rows, transcendentals=rows,
                      engine="vector", dtype=np.dtype(np.float32))
    return rule


def _swiglu_work(op) -> OpWork:
    x, w_gate, w_up = (v.type for v in op.operands)
    d, f = w_gate.shape
    m = x.size // max(d, 1)
    x_fmt, w_fmt = op.params.get("x_format"), op.params.get("w_format")
    gate_fmt, up_fmt = weight_formats(w_fmt, 2)  # one format, or one per weight
    dtype = np.result_type(x.dtype, w_gate.dtype)
    if x_fmt or w_fmt:  # under a precision policy: MX operands, read packed
        dtype = formats_class([(x_fmt, x.dtype), (gate_fmt, w_gate.dtype), (up_fmt, w_up.dtype)])
    return OpWork(flops=2 * 2 * m * d * f + SWIGLU_EPILOGUE_FLOPS * m * f,
                  transcendentals=m * f, engine="matrix", dtype=dtype,
                  reads=(packed_bytes(x, x_fmt, -1), packed_bytes(w_gate, gate_fmt, 0),
                         packed_bytes(w_up, up_fmt, 0)))


RULES = {
    "rms_norm": _norm_work(RMS_NORM_FLOPS_PER_ELEMENT, RMS_NORM_FLOPS_PER_ROW),
    "layer_norm": _norm_work(LAYER_NORM_FLOPS_PER_ELEMENT, LAYER_NORM_FLOPS_PER_ROW),
    "swiglu": _swiglu_work,
}
