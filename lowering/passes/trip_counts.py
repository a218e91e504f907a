"""Static trip counts: while loops whose number of trips the program fixes.

A ``while`` op gets ``trips`` (per execution) when its trip count follows
from values known at compile time, so that ``estimate`` and
``lower().compile()`` charge every trip before the first call. Recognised:
a *counter* carried by the loop,

- compared in the cond with a *bound*: ``lt``, ``le``, ``gt``, ``ge`` or
  ``ne`` between the counter and the bound, either way round;
- stepped in the body by a known constant: ``counter + c`` or ``counter - c``;
- started from a known value;

where known values are constants of the program (literals, ``constant``
ops, and scalar arithmetic on them), and a bound may also be a loop
constant or a carried value the body passes through unchanged, whose value
is known. This covers ``lax.fori_loop`` with bounds that are not Python
ints at trace time but are fixed in the program, and hand-written
``while_loop`` counters (``i < 100``).

Loops whose trips depend on data (a convergence test, a bound passed in as
an argument) get no ``trips``: the cost model uses the count measured at run
time, the one the user gives (``estimate(..., loop_trips=...)``), or flags
the loop as unmeasured.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np

from lowering.ir import Module, Op, Value, is_extended
from lowering.kernels import is_scalar

# comparison kind -> the same comparison with its operands swapped
SWAPPED = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "ne": "ne"}
# scalar kinds evaluated on known values (index arithmetic on constants)
EVAL = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "neg": operator.neg,
        "max": max, "min": min, "convert_element_type": lambda x: x}


def run(module: Module, ctx=None) -> Module:
    return _annotate(module, {})


def _known_values(module: Module, known: dict[Value, int]) -> dict[Value, int]:
    """Integer scalars of ``module`` known at compile time (given ``known`` params)."""
    known = dict(known)
    for op in module.ops:
        if op.kind == "constant":
            value, t = op.attrs["value"], op.results[0].type
            if (t.size == 1 and isinstance(t.dtype, np.dtype) and np.issubdtype(t.dtype, np.integer)
                    and not is_extended(t.dtype)):
                known[op.results[0]] = int(np.asarray(value).reshape(()))
        elif op.kind in EVAL and is_scalar(op) and all(v in known for v in op.operands):
            known[op.results[0]] = int(EVAL[op.kind](*(known[v] for v in op.operands)))
    return known


def _annotate(module: Module, known_params: dict[Value, int]) -> Module:
    known = _known_values(module, known_params)
    ops = []
    for op in module.ops:
        if op.regions:
            regions = {name: _annotate(region, _region_known(op, name, known))
                       for name, region in op.regions.items()}
            op = dataclasses.replace(op, regions=regions)
            if op.kind == "while":
                trips = static_trips(op, known)
                if trips is not None:
                    op = dataclasses.replace(op, attrs={**op.attrs, "trips": trips})
        ops.append(op)
    return dataclasses.replace(module, ops=ops)


def _region_known(op: Op, name: str, known: dict[Value, int]) -> dict[Value, int]:
    """Known values among the parameters of region ``name``: those fed by a
    known operand that is the same on every trip (loop constants, cond operands)."""
    region = op.regions[name]
    if op.kind == "while":
        n_cond, n_body = op.params["cond_nconsts"], op.params["body_nconsts"]
        consts = op.operands[:n_cond] if name == "cond" else op.operands[n_cond:n_cond + n_body]
    elif op.kind == "scan":
        consts = op.operands[:op.params["num_consts"]]
    else:  # cond: the branches' operands (after the predicate)
        consts = op.operands[1:]
    return {p: known[v] for p, v in zip(region.params, consts) if v in known}


def static_trips(op: Op, known: dict[Value, int]) -> int | None:
    """Trips of one execution of the ``while`` op, or None if data decide them."""
    n_cond, n_body = op.params["cond_nconsts"], op.params["body_nconsts"]
    cond, body = op.regions["cond"], op.regions["body"]
    init = op.operands[n_cond + n_body:]
    cond_known = _known_values(cond, _region_known(op, "cond", known))
    body_known = _known_values(body, _region_known(op, "body", known))
    carries_in_cond = cond.params[n_cond:]
    carries_in_body = body.params[n_body:]
    passed_through = {k for k, (p, out) in enumerate(zip(carries_in_body, body.outputs)) if p is out}

    def value_in_cond(v: Value) -> int | None:
        if v in cond_known:
            return cond_known[v]
        if v in carries_in_cond:
            k = carries_in_cond.index(v)
            if k in passed_through and init[k] in known:
                return known[init[k]]
        return None

    (predicate,) = cond.outputs
    compare = cond.producers().get(predicate)
    if compare is None or compare.kind not in SWAPPED:
        return None
    for side in (0, 1):
        counter, bound = compare.operands[side], compare.operands[1 - side]
        kind = compare.kind if side == 0 else SWAPPED[compare.kind]
        if counter not in carries_in_cond or value_in_cond(bound) is None:
            continue
        k = carries_in_cond.index(counter)
        start = known.get(init[k])
        step = _step(body, carries_in_body[k], body.outputs[k], body_known)
        if start is not None and step:
            return _count(kind, start, value_in_cond(bound), step)
    return None


def _step(body: Module, counter: Value, updated: Value, known: dict[Value, int]) -> int | None:
    """``c`` when the body computes ``counter + c`` (or ``counter - c``: ``-c``)."""
    op = body.producers().get(updated)
    if op is None or op.kind not in ("add", "sub") or counter not in op.operands:
        return None
    other = op.operands[1] if op.operands[0] is counter else op.operands[0]
    if other not in known or (op.kind == "sub" and op.operands[0] is not counter):
        return None
    return known[other] if op.kind == "add" else -known[other]


def _count(kind: str, start: int, bound: int, step: int) -> int | None:
    """Trips of ``i = start; while i <kind> bound: i += step``; None if it never ends."""
    if kind == "ne":
        distance = bound - start
        return distance // step if distance % step == 0 and distance // step >= 0 else None
    if kind in ("le", "ge"):
        bound += 1 if kind == "le" else -1
        kind = "lt" if kind == "le" else "gt"
    if kind == "lt":
        return 0 if start >= bound else None if step <= 0 else math.ceil((bound - start) / step)
    return 0 if start <= bound else None if step >= 0 else math.ceil((start - bound) / -step)
