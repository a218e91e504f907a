"""What each op asks of the hardware, independent of any chip.

``work_of(op)`` looks the op up first by kind (``KIND_RULES``), then by the
category of its kind (``CATEGORY_RULES``, categories from
``lowering.op_kinds``). Counting follows XLA's ``HloCostAnalysis``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from lowering.ir import Op
from lowering.op_kinds import KIND_CATEGORY


@dataclasses.dataclass(frozen=True)
class OpWork:
    """What an op asks of the hardware, independent of any chip."""

    flops: float = 0.0
    transcendentals: float = 0.0
    engine: str = "vector"  # "matrix", "vector", or "host" (runs on the host CPU)
    dtype: np.dtype | None = None


def _operand_dtype(op: Op) -> np.dtype:
    return (op.operands[0] if op.operands else op.results[0]).type.dtype


def _elementwise_work(op: Op) -> OpWork:
    return OpWork(flops=op.results[0].type.size, dtype=_operand_dtype(op))


def _transcendental_work(op: Op) -> OpWork:
    return OpWork(transcendentals=op.results[0].type.size, dtype=_operand_dtype(op))


def _reduction_work(op: Op) -> OpWork:
    return OpWork(flops=op.operands[0].type.size, dtype=_operand_dtype(op))


def _contraction_work(op: Op) -> OpWork:
    lhs, rhs = op.operands
    (lhs_contract, _), (lhs_batch, _) = op.params["dimension_numbers"]
    contract = int(np.prod([lhs.type.shape[d] for d in lhs_contract], dtype=np.int64))
    # output elements x contraction length multiply-adds, 2 FLOPs each
    return OpWork(flops=2.0 * op.results[0].type.size * contract,
                  engine="matrix", dtype=lhs.type.dtype)


def _no_work(op: Op) -> OpWork:
    return OpWork()


CATEGORY_RULES: dict[str, Callable[[Op], OpWork]] = {
    "elementwise": _elementwise_work,
    "transcendental": _transcendental_work,
    "reduction": _reduction_work,
    "contraction": _contraction_work,
    "data_movement": _no_work,
    "view": _no_work,
    "constant": _no_work,
}



# op kind -> rule, for kinds whose work differs from their category's rule
KIND_RULES: dict[str, Callable[[Op], OpWork]] = {}


def work_of(op: Op) -> OpWork:
    rule = KIND_RULES.get(op.kind)
    if rule is None:
        rule = CATEGORY_RULES[KIND_CATEGORY[op.kind]]
    return rule(op)
