"""Canonicalize: fold small constants, merge common subexpressions, drop dead ops.

Calls (``jit``, ``custom_jvp_call`` ...) are already inlined by the importer.

Folding evaluates an op whose operands are all constants and whose result is
small (PRNG key values are left alone: they have no NumPy form). Only ops whose result is exactly rounded by IEEE arithmetic are
folded (``FOLDABLE``), so the folded value is bit for bit what XLA computes,
whether XLA folds the same expression at compile time or evaluates it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from lowering.ir import Module, Op, Value, is_extended
from lowering.passes import dce

FOLD_MAX_ELEMENTS = 1024

FOLDABLE = frozenset({
    "add", "sub", "mul", "div", "rem", "neg", "max", "min", "abs", "sign", "floor", "ceil",
    "round", "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor", "not",
    "select_n", "convert_element_type", "broadcast_in_dim", "reshape", "squeeze",
    "expand_dims", "transpose", "concatenate", "slice", "iota", "stop_gradient",
})


def run(module: Module, ctx=None) -> Module:
    return dce.run(cse(fold_constants(module)), ctx)


def _constant_value(op: Op | None):
    return op.attrs["value"] if op is not None and op.kind == "constant" else None


def fold_constants(module: Module) -> Module:
    producers: dict[Value, Op] = {}
    ops: list[Op] = []
    for op in module.ops:
        if op.regions:
            op = dataclasses.replace(op, regions={k: fold_constants(r) for k, r in op.regions.items()})
        elif (op.kind in FOLDABLE and len(op.results) == 1
              and op.results[0].type.size <= FOLD_MAX_ELEMENTS
              and not any(is_extended(v.type.dtype) for v in (*op.operands, *op.results))):
            values = [_constant_value(producers.get(v)) for v in op.operands]
            if all(v is not None for v in values):
                with jax.ensure_compile_time_eval():  # also when compiled under a jax trace
                    folded = np.asarray(op.primitive.bind(*values, **op.params))
                op = Op("constant", [], op.results, {"value": folded}, op.source)
        producers.update((r, op) for r in op.results)
        ops.append(op)
    return dataclasses.replace(module, ops=ops)


def _freeze(x: Any):
    """A hashable stand-in for an op attribute (identity for unhashable objects)."""
    if isinstance(x, np.ndarray):
        return ("array", x.dtype.str, x.shape, x.tobytes())
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items() if k != "primitive"))
    if isinstance(x, (tuple, list)):
        return tuple(_freeze(v) for v in x)
    try:
        hash(x)
        return x
    except TypeError:
        return ("id", id(x))


# ops never merged with an identical one: a barrier exists to keep two
# computations apart (a rematerialization from the forward pass it repeats)
NO_CSE = frozenset({"optimization_barrier"})


def cse(module: Module) -> Module:
    """Replace an op by an earlier identical one (same kind, operands,
    attributes), except ``NO_CSE`` kinds."""
    replace: dict[Value, Value] = {}
    seen: dict[Any, Op] = {}
    ops: list[Op] = []
    for op in module.ops:
        operands = [replace.get(v, v) for v in op.operands]
        if op.regions:
            op = dataclasses.replace(op, operands=operands,
                                     regions={k: cse(r) for k, r in op.regions.items()})
            ops.append(op)
            continue
        op = dataclasses.replace(op, operands=operands)
        if op.kind in NO_CSE or op.attrs.get("effects"):
            ops.append(op)
            continue
        key = (op.kind, tuple(v.id for v in operands), _freeze(op.attrs),
               tuple(str(r.type) for r in op.results))
        earlier = seen.get(key)
        if earlier is not None:
            replace.update(zip(op.results, earlier.results))
            continue
        seen[key] = op
        ops.append(op)
    outputs = [replace.get(v, v) for v in module.outputs]
    return dataclasses.replace(module, ops=ops, outputs=outputs)

