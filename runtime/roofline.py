"""The physical floor of a program: what no implementation can beat.

    roofline = max(compute floor, floor bytes / HBM bandwidth)

*Compute floor*: every kernel's arithmetic at the chip's peak for its
compute dtype (matrix-engine FLOPs at the matrix peak, elementwise work at
the vector peak; the two engines work in parallel, so the larger total).

*Floor bytes*: the bytes that must cross HBM at least once:

- each program input, read once, but only the part the program touches: the
  rows a gather or an embedding lookup reads, a slice's window, a loop's
  slices over its trips, packed MX weights at their packed size (what the
  kernels that read it are charged, summed over its readers, at most the
  whole input);
- each program output, written once: whole, except an output that is an
  input (or a view of one) or a constant, which needs no write, an output
  updated in place in a donated input's buffer (``lowering.passes.inplace``),
  for which only the rows written count, and a loop's result, for which
  what its body writes of it counts (nothing for scalar arithmetic, which
  runs outside kernels).

Intermediates are not counted: an ideal implementation keeps them on chip.
Every kernel the cost model charges reads and writes at least these bytes,
so the modeled time is never below the floor (the invariant
``tests/test_physics.py`` checks over every program the suite builds).
"""

from __future__ import annotations

from typing import Callable

from lowering.ir import Module, Op, Value
from lowering.kernels import is_scalar, is_view
from lowering.passes.inplace import LOOP_CARRIES, UPDATE_KINDS
from lowering.regions import REGION_KINDS
from runtime.op_work import kernel_reads_writes


def trips(op: Op) -> float:
    """Trips of one execution of a loop: a scan's length, a while loop's fixed
    count (``lowering.passes.trip_counts``), else one (the floor's lower bound)."""
    return float(op.params["length"]) if op.kind == "scan" else float(op.attrs.get("trips", 1))


def _scan_params(op: Op, index: int) -> list[tuple[str, int, float]]:
    """(region, parameter index, executions) that operand ``index`` of a scan feeds."""
    return [("body", index, trips(op))]


def _while_params(op: Op, index: int) -> list[tuple[str, int, float]]:
    n_cond, n_body = op.params["cond_nconsts"], op.params["body_nconsts"]
    count = trips(op)
    if index < n_cond:
        return [("cond", index, count + 1)]
    if index < n_cond + n_body:
        return [("body", index - n_cond, count)]
    carry = index - n_cond - n_body
    return [("cond", n_cond + carry, count + 1), ("body", n_body + carry, count)]


def _cond_params(op: Op, index: int) -> list[tuple[str, int, float]]:
    # the branch that runs is not known: the one that touches least is the floor
    return [] if index == 0 else [(name, index - 1, 1.0) for name in op.regions]


# region-op kind -> the region parameters an operand feeds, and how often they run
REGION_PARAMS: dict[str, Callable[[Op, int], list[tuple[str, int, float]]]] = {
    "scan": _scan_params, "while": _while_params, "cond": _cond_params,
}


class _Reads:
    """Bytes the ops of one function read of each of its values."""

    def __init__(self, module: Module):
        self.readers: dict[Value, list[tuple[Op, int]]] = {}
        for op in module.ops:
            for position, v in enumerate(op.operands):
                self.readers.setdefault(v, []).append((op, position))
        self.memo: dict[Value, float] = {}

    def touched(self, value: Value) -> float:
        """Bytes of ``value`` read, at most ``value`` once."""
        if value not in self.memo:
            total = sum(self._read_by(op, position) for op, position in self.readers.get(value, ()))
            self.memo[value] = min(total, float(value.type.nbytes))
        return self.memo[value]

    def _read_by(self, op: Op, position: int) -> float:
        """Bytes ``op`` reads of its operand ``position``."""
        if op.operands[position].type.size <= 1 or is_scalar(op):
            return 0.0  # immediates
        if is_view(op):  # its readers read the operand's bytes
            return sum(self.touched(r) for r in op.results)
        if op.kind in REGION_KINDS:
            reads = [executions * _Reads(op.regions[name]).touched(op.regions[name].params[index])
                     for name, index, executions in REGION_PARAMS[op.kind](op, position)]
            own = min(reads, default=0.0) if op.kind == "cond" else sum(reads)
        else:
            own = kernel_reads_writes(op)[0][position]
        # a result written in place into this operand's buffer (an update, a
        # loop carrying it): its readers read the operand's bytes too
        aliased = [r for r in op.results if (found := alias(op, r)) is not None and found[0] == position]
        return own + sum(self.touched(r) for r in aliased)


def floor_bytes(module: Module) -> float:
    """The bytes that must cross HBM at least once (see the module docstring)."""
    reads = _Reads(module)
    return float(sum(reads.touched(p) for p in module.params)
                 + sum(_written(module, v) for v in dict.fromkeys(module.outputs)))


def _written(module: Module, output: Value) -> float:
    """Bytes that must be written to produce ``output``: none for an input
    returned as it is, a constant or a scalar; for an update in place of a
    donated input, its rows; for a loop's or a branch's result, what its body
    writes of it; else the whole value."""
    if output.type.size <= 1:
        return 0.0
    producers = module.producers()
    value = output
    while value in producers and is_view(producers[value]) and producers[value].operands:
        value = producers[value].operands[0]
    op = producers.get(value)
    if op is None or op.kind == "constant" or is_scalar(op):
        return 0.0
    rows = _rows_written_in_place(module, value, producers)
    if rows is not None:
        return min(rows, float(output.type.nbytes))
    if op.kind in REGION_KINDS:
        return min(_written_by_region(op, op.results.index(value)), float(output.type.nbytes))
    return float(output.type.nbytes)


def _written_by_region(op: Op, k: int) -> float:
    """Bytes the region(s) of ``op`` write of its result ``k`` over their runs
    (all of it for a carry the loop copies into a buffer of its own first)."""
    if op.kind == "cond":
        return min(_written(r, r.outputs[k]) for r in op.regions.values())
    carries, _, _ = LOOP_CARRIES[op.kind](op)
    if k < len(carries) and carries[k] in op.attrs.get("copied_carries", ()):
        return float(op.results[k].type.nbytes)
    body = op.regions["body"]
    return trips(op) * _written(body, body.outputs[k])


def alias(op: Op, result: Value) -> tuple[int, float] | None:
    """``(operand index, bytes written)`` when ``op`` produces ``result`` in
    the buffer of that operand (``lowering.passes.inplace``): an update in
    place, a fused kernel around one, or a loop that carries the buffer and
    updates it in place on every trip; else None."""
    if op.kind in UPDATE_KINDS:
        return (0, kernel_reads_writes(op)[1]) if op.attrs.get("in_place") else None
    if op.kind == "fused_kernel" and op.attrs.get("in_place"):
        body = op.regions["body"]
        rows = _rows_written_in_place(body, body.outputs[op.results.index(result)], body.producers())
        if rows is None:
            return None
        # the parameter at the start of the chain of in-place updates
        producers, value = body.producers(), body.outputs[op.results.index(result)]
        while value not in body.params:
            value = producers[value].operands[0]
        return body.params.index(value), rows
    if op.kind in LOOP_CARRIES:
        carries, region, _ = LOOP_CARRIES[op.kind](op)
        k = op.results.index(result)
        if k >= len(carries) or carries[k] in op.attrs.get("copied_carries", ()):
            return None
        body = op.regions[region]
        per_trip = _rows_written_in_place(body, body.outputs[k], body.producers())
        if per_trip is None:
            return None
        return carries[k], per_trip * trips(op)
    return None


def _rows_written_in_place(module: Module, value: Value, producers) -> float | None:
    """When ``value`` is a parameter's buffer updated in place (a chain of
    in-place updates, fused kernels around them and loops that carry it),
    the bytes those updates write; else None."""
    written = 0.0
    while True:
        op = producers.get(value)
        if op is None:
            return written if value in module.params else None
        found = alias(op, value)
        if found is None:
            return None
        index, rows = found
        written += rows
        value = op.operands[index]
