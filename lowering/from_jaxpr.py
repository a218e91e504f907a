"""Import a JAX ``ClosedJaxpr`` into MTIA IR.

The importer is a table ``primitive name -> rule``. A rule receives the
builder, the jaxpr equation and the already-imported operand values, and
returns the result values. Supporting a new primitive is adding a row.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from jax.extend import core as jcore
from jax._src import source_info_util

from mtia_jax.errors import UnsupportedOperationError
from lowering.ir import Module, Op, SourceLoc, TensorType, Value
from lowering.op_kinds import GENERIC_PRIMITIVES
from lowering import regions

# ------------------------------------------------------------- primitives
# Generic ops (``lowering.op_kinds.GENERIC_PRIMITIVES``): one op per
# primitive, numerics by ``primitive.bind``.

# Call-like primitives whose body is inlined; value: the param holding the body.
CALL_PRIMITIVES = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
}

Rule = Callable[["Builder", jcore.JaxprEqn, list[Value]], list[Value]]


def _generic_rule(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    # stop_gradient only matters to autodiff of the original program; on the
    # device it is the identity, but keeping it as an op costs nothing and
    # keeps the IR a faithful image of the jaxpr.
    results = [builder.new_value(v.aval) for v in eqn.outvars]
    builder.emit(Op(
        kind=eqn.primitive.name,
        operands=operands,
        results=results,
        attrs={"primitive": eqn.primitive, "params": dict(eqn.params)},
        source=builder.current_source,
    ))
    return results


def _inline_rule(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    body = eqn.params[CALL_PRIMITIVES[eqn.primitive.name]]
    if isinstance(body, jcore.ClosedJaxpr):
        return builder.import_jaxpr(body.jaxpr, body.consts, operands)
    return builder.import_jaxpr(body, (), operands)


IMPORT_RULES: dict[str, Rule] = {
    **{name: _generic_rule for name in GENERIC_PRIMITIVES},
    **{name: _inline_rule for name in CALL_PRIMITIVES},
    **regions.IMPORT_RULES,
}


# ---------------------------------------------------------------- builder

class Builder:
    """Walks jaxpr equations, applying the rule table, appending ops."""

    def __init__(self):
        self.ops: list[Op] = []
        self.current_source: SourceLoc | None = None

    @staticmethod
    def new_value(aval) -> Value:
        return Value(TensorType(tuple(int(d) for d in aval.shape), np.dtype(aval.dtype)))

    def emit(self, op: Op) -> None:
        self.ops.append(op)

    def constant(self, value) -> Value:
        array = np.asarray(value)
        result = Value(TensorType(array.shape, array.dtype))
        self.emit(Op("constant", [], [result], {"value": array}, self.current_source))
        return result

    def import_region(self, closed: jcore.ClosedJaxpr, name: str) -> Module:
        """A nested function (a region op's body) with its own parameters."""
        inner = Builder()
        inner.current_source = self.current_source
        params = [self.new_value(v.aval) for v in closed.jaxpr.invars]
        outputs = inner.import_jaxpr(closed.jaxpr, closed.consts, params)
        return Module(name=name, params=params, ops=inner.ops, outputs=outputs)

    def import_jaxpr(self, jaxpr: jcore.Jaxpr, consts: Sequence, args: Sequence[Value]) -> list[Value]:
        env: dict[jcore.Var, Value] = {}
        outer_source = self.current_source
        for var, const in zip(jaxpr.constvars, consts):
            env[var] = self.constant(const)
        for var, arg in zip(jaxpr.invars, args, strict=True):
            env[var] = arg

        def read(atom) -> Value:
            if isinstance(atom, jcore.Literal):
                return self.constant(np.asarray(atom.val, dtype=atom.aval.dtype))
            return env[atom]

        for eqn in jaxpr.eqns:
            self.current_source = source_of(eqn) or outer_source
            rule = IMPORT_RULES.get(eqn.primitive.name)
            if rule is None:
                raise UnsupportedOperationError(eqn.primitive.name, self.current_source)
            results = rule(self, eqn, [read(v) for v in eqn.invars])
            for var, value in zip(eqn.outvars, results, strict=True):
                if not isinstance(var, jcore.DropVar):
                    env[var] = value
        self.current_source = outer_source
        return [read(v) for v in jaxpr.outvars]


def source_of(eqn: jcore.JaxprEqn) -> SourceLoc | None:
    frame = source_info_util.user_frame(eqn.source_info.traceback)
    if frame is None:
        return None
    return SourceLoc(frame.file_name, frame.start_line, frame.function_name)


def import_closed_jaxpr(closed: jcore.ClosedJaxpr, name: str = "main") -> Module:
    """Build an MTIA IR module equivalent to ``closed``."""
    return Builder().import_region(closed, name)


def supported_primitives() -> list[str]:
    return sorted(IMPORT_RULES)
