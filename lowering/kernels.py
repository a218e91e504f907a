"""Which ops launch no kernel: views, and scalar arithmetic.

Views
-----
A view gives a new name (and shape) to bytes already in HBM, so its result
aliases its operand's buffer and its consumers read those bytes where they
are. Every op of the ``view`` category is one (reshape, squeeze, ...); so
are ops of other kinds whose particular shapes make them one:

- ``slice`` / ``dynamic_slice`` of a contiguous window (unit-stride, and
  every dimension after the first one the window does not cover whole is
  taken whole: ``cache[layer]``, ``W[i]``, ``x[:, 3:5]`` of a row-major x
  with one row): an offset into the operand's buffer;
- ``transpose`` that only moves dimensions of size one (the layout is
  unchanged);
- ``broadcast_in_dim`` that only adds dimensions of size one (a reshape);
- a ``fused_kernel`` whose body holds only views.

Scalar ops
----------
Arithmetic whose operands and results are all scalars (index arithmetic: a
loop counter wrapped for negative indices, a position plus one) computes the
arguments of kernels. It runs on the scalar (control) core and reaches the
kernels as immediates, so it moves no HBM bytes and launches no kernel.

``is_view(op)`` and ``is_scalar(op)`` are the predicates the cost model, the
memory plan and the fusion passes share. View rules are a table keyed by op kind.
"""

from __future__ import annotations

from typing import Callable

from lowering.ir import Op
from lowering.op_kinds import KIND_CATEGORY


def contiguous(shape: tuple[int, ...], window: tuple[int, ...]) -> bool:
    """True if a ``window`` of a row-major array of ``shape`` is one
    contiguous run of its bytes."""
    partial = [d for d, w in enumerate(window) if w != 1]
    if not partial:
        return True
    return all(window[d] == shape[d] for d in range(partial[0] + 1, len(shape)))


def _slice_is_view(op: Op) -> bool:
    p = op.params
    if p.get("strides") is not None and any(s != 1 for s in p["strides"]):
        return False
    window = tuple(hi - lo for lo, hi in zip(p["start_indices"], p["limit_indices"]))
    return contiguous(op.operands[0].type.shape, window)


def _dynamic_slice_is_view(op: Op) -> bool:
    return contiguous(op.operands[0].type.shape, tuple(op.params["slice_sizes"]))


def _non_unit(shape, dims) -> list[int]:
    return [d for d in dims if shape[d] != 1]


def _transpose_is_view(op: Op) -> bool:
    perm = op.params["permutation"]
    shape = op.operands[0].type.shape
    return _non_unit(shape, perm) == _non_unit(shape, range(len(shape)))


def _broadcast_is_view(op: Op) -> bool:
    operand, result = op.operands[0].type, op.results[0].type
    return operand.size == result.size and list(op.params["broadcast_dimensions"]) == sorted(
        op.params["broadcast_dimensions"])


def _fused_is_view(op: Op) -> bool:
    return all(is_view(inner) for inner in op.regions["body"].ops)


VIEW_RULES: dict[str, Callable[[Op], bool]] = {
    "slice": _slice_is_view,
    "dynamic_slice": _dynamic_slice_is_view,
    "transpose": _transpose_is_view,
    "broadcast_in_dim": _broadcast_is_view,
    "fused_kernel": _fused_is_view,
}


def is_view(op: Op) -> bool:
    """True if ``op`` moves no bytes: see the module docstring."""
    if KIND_CATEGORY.get(op.kind) == "view":
        return True
    rule = VIEW_RULES.get(op.kind)
    return rule is not None and rule(op)


SCALAR_CATEGORIES = frozenset({"elementwise", "transcendental", "data_movement"})


def is_scalar(op: Op) -> bool:
    """True if ``op`` is arithmetic on scalars only: see the module docstring."""
    if not op.results or any(v.type.size > 1 for v in (*op.operands, *op.results)):
        return False
    if op.kind == "fused_kernel":
        return all(is_scalar(inner) or is_view(inner) for inner in op.regions["body"].ops)
    return KIND_CATEGORY.get(op.kind) in SCALAR_CATEGORIES
