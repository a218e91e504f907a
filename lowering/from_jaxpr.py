"""Import a JAX ``ClosedJaxpr`` into MTIA IR.

The importer is a table ``primitive name -> rule``. A rule receives the
builder, the jaxpr equation and the already-imported operand values, and
returns the result values. Supporting a new primitive is adding a row.
"""

from __future__ import annotations

import linecache
import pathlib
import warnings
from typing import Callable, Sequence

import numpy as np
from jax.extend import core as jcore
from jax._src import source_info_util
from jax._src.lax.lax import optimization_barrier_p

from mtia_jax.errors import MTIAHostFallbackWarning, UnsupportedOperationError
from lowering.ir import Module, Op, SourceLoc, TensorType, Value, is_extended
from lowering.op_kinds import (GENERIC_PRIMITIVES, HOST_CALLBACKS, HOST_DTYPE_REASONS,
                               HOST_PRIMITIVES, KIND_CATEGORY, NO_KERNEL)
from lowering import collectives, pallas, regions

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
}

# Frames inside mtia-jax itself are never the user's line.
for _package in ("mtia_jax", "lowering", "runtime"):
    source_info_util.register_exclusion(
        str(pathlib.Path(__file__).resolve().parent.parent / _package) + "/")

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


# ---------------------------------------------------------- host fallback
# Ops no MTIA kernel runs (``lowering.op_kinds.HOST_PRIMITIVES``, and any
# kernel computing in a dtype of ``HOST_DTYPE_REASONS``) become one
# ``host_fallback`` op. It keeps the primitive and params, so its numerics
# are still ``primitive.bind``; the cost model charges the host-link round trip.

_HOST_FALLBACK_WARNED: set[tuple[str | None, int | None]] = set()


def _host_dtype_reason(eqn: jcore.JaxprEqn) -> tuple[str, str] | None:
    for var in (*eqn.invars, *eqn.outvars):
        dtype = getattr(var.aval, "dtype", None)
        if dtype is not None and not is_extended(dtype):
            reason = HOST_DTYPE_REASONS.get(np.dtype(dtype).name)
            if reason is not None:
                return reason
    return None


def _warn_host_fallback(name: str, reason: tuple[str, str], source: SourceLoc | None) -> None:
    """Warn once per user source line per process (a line such as
    ``jnp.fft.irfft(x)`` imports several host ops; the first names the cause),
    quoting the line and giving the advice that fits the cause."""
    key = (source.file, source.line) if source else (name, None)
    if key in _HOST_FALLBACK_WARNED:
        return
    _HOST_FALLBACK_WARNED.add(key)
    why, advice = reason
    code = linecache.getline(source.file, source.line).strip() if source else ""
    what = f"`{code}`" if code else f"'{name}'"
    where = f" at {source.file}:{source.line}" if source else ""
    message = (f"mtia_jax.jit: {what}{where} runs on the host CPU ('{name}': {why}). Its "
               f"operands and results cross the host link (modeled in cost_analysis). To "
               f"change that, {advice}.")
    if source is not None:
        warnings.warn_explicit(message, MTIAHostFallbackWarning, source.file, source.line)
    else:
        warnings.warn(message, MTIAHostFallbackWarning, stacklevel=2)


def _emit_host_fallback(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value],
                        reason: tuple[str, str], warn: bool = True) -> list[Value]:
    name = eqn.primitive.name
    results = [builder.new_value(v.aval) for v in eqn.outvars]
    attrs = {"primitive": eqn.primitive, "op": name, "params": dict(eqn.params), "reason": reason[0]}
    if eqn.effects:  # printing, io: kept even when nothing reads a result, never merged
        attrs["effects"] = True
    builder.emit(Op(kind="host_fallback", operands=operands, results=results, attrs=attrs,
                    source=builder.current_source))
    if warn:
        _warn_host_fallback(name, reason, builder.current_source)
    return results


def _callback_rule(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    # a callback into Python runs on the host by design: no warning
    return _emit_host_fallback(builder, eqn, operands, ("a callback into Python", ""), warn=False)


def _host_fallback_rule(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    reason = (HOST_PRIMITIVES.get(eqn.primitive.name) or _host_dtype_reason(eqn)
              or ("no MTIA kernel", "run it outside mtia_jax.jit"))
    return _emit_host_fallback(builder, eqn, operands, reason)


def _device_or_host_rule(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    """A generic op, unless it is a kernel computing in a dtype MTIA lacks."""
    if KIND_CATEGORY[eqn.primitive.name] not in NO_KERNEL:
        reason = _host_dtype_reason(eqn)
        if reason is not None:
            return _emit_host_fallback(builder, eqn, operands, reason)
    return _generic_rule(builder, eqn, operands)


# ------------------------------------------------------- structural rules

def _custom_linear_solve_rule(builder: "Builder", eqn: jcore.JaxprEqn,
                              operands: list[Value]) -> list[Value]:
    # What the primitive's impl (and so jax.jit) computes: its ``solve``
    # jaxpr applied to (solve's consts, b). Operands are the consts of
    # matvec, vecmat, solve and transpose_solve, in that order, then b.
    lengths = eqn.params["const_lengths"]
    solve = eqn.params["jaxprs"].solve
    start = lengths.matvec + lengths.vecmat
    solve_consts = operands[start:start + lengths.solve]
    b = operands[sum(lengths):]
    return builder.import_jaxpr(solve.jaxpr, solve.consts, [*solve_consts, *b])


def _remat_rule(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    """``jax.checkpoint`` / ``jax.remat`` (primitive ``remat2``): its body,
    inlined. In the backward pass of ``jax.grad`` the body is the
    recomputation of the forward values the policy did not save; as JAX's own
    lowering does, its inputs first pass an ``optimization_barrier``, so that
    no pass (ours or XLA's) merges the recomputation with the forward pass:
    it is real work, and the cost model charges it."""
    params = eqn.params
    prevent = params["prevent_cse"]
    prevent = (prevent,) * len(operands) if isinstance(prevent, bool) else tuple(prevent)
    if params["differentiated"] and any(prevent):
        guarded = [v for v, p in zip(operands, prevent) if p]
        results = [Value(v.type) for v in guarded]
        builder.emit(Op(kind="optimization_barrier", operands=guarded, results=results,
                        attrs={"primitive": optimization_barrier_p, "params": {}},
                        source=builder.current_source))
        barrier = iter(results)
        operands = [next(barrier) if p else v for v, p in zip(operands, prevent)]
    body = params["jaxpr"]
    if isinstance(body, jcore.ClosedJaxpr):
        return builder.import_jaxpr(body.jaxpr, body.consts, operands)
    return builder.import_jaxpr(body, (), operands)


def _forward_rule(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    # device_put inside a traced function is the identity on values
    return list(operands)


def _body_rule(param: str) -> Rule:
    """Inline a call-like primitive whose body is the ClosedJaxpr ``params[param]``
    (lax.composite: its decomposition; custom_vmap_call: its unbatched body)."""

    def rule(builder: "Builder", eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
        body = eqn.params[param]
        return builder.import_jaxpr(body.jaxpr, body.consts, operands)

    return rule


IMPORT_RULES: dict[str, Rule] = {
    **{name: _device_or_host_rule for name in GENERIC_PRIMITIVES},
    **{name: _inline_rule for name in CALL_PRIMITIVES},
    **regions.IMPORT_RULES,
    **{name: _host_fallback_rule for name in HOST_PRIMITIVES},
    **{name: _callback_rule for name in HOST_CALLBACKS},
    "custom_linear_solve": _custom_linear_solve_rule,
    "remat2": _remat_rule,
    "device_put": _forward_rule,
    "composite": _body_rule("jaxpr"),
    "custom_vmap_call": _body_rule("call"),
    **collectives.IMPORT_RULES,
    **pallas.IMPORT_RULES,
}

# Primitives with no rule whose error can say more than "no lowering":
# name -> (builder, eqn) -> the error to raise.
UNSUPPORTED_EXPLAINED = {**pallas.UNSUPPORTED}


# ---------------------------------------------------------------- builder

class Builder:
    """Walks jaxpr equations, applying the rule table, appending ops."""

    def __init__(self):
        self.ops: list[Op] = []
        self.current_source: SourceLoc | None = None

    @staticmethod
    def new_value(aval) -> Value:
        dtype = aval.dtype if is_extended(aval.dtype) else np.dtype(aval.dtype)
        return Value(TensorType(tuple(int(d) for d in aval.shape), dtype))

    def emit(self, op: Op) -> None:
        self.ops.append(op)

    def constant(self, value) -> Value:
        # PRNG key arrays have no NumPy form: they stay JAX arrays
        array = value if is_extended(getattr(value, "dtype", None)) else np.asarray(value)
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
                explain = UNSUPPORTED_EXPLAINED.get(eqn.primitive.name)
                if explain is not None:
                    raise explain(self, eqn)
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
