"""Region ops: control flow whose bodies are nested MTIA IR functions.

``scan`` (body), ``while`` (cond, body) and ``cond`` (branch0..branchN) keep
their JAX params (minus the jaxprs, which become ``Op.regions``). Each region
is a ``Module`` whose parameters are the values the primitive passes to the
jaxpr, in the same order, and whose outputs are the jaxpr's outputs.
"""

from __future__ import annotations

from typing import Callable

from jax.extend import core as jcore

from lowering.ir import Op, Value

REGION_KINDS = ("scan", "while", "cond")

# region-op kind -> (param holding the jaxpr(s), region names for them)
_JAXPR_PARAMS: dict[str, Callable[[dict], dict[str, jcore.ClosedJaxpr]]] = {
    "scan": lambda params: {"body": params["jaxpr"]},
    "while": lambda params: {"cond": params["cond_jaxpr"], "body": params["body_jaxpr"]},
    "cond": lambda params: {f"branch{i}": b for i, b in enumerate(params["branches"])},
}
_JAXPR_PARAM_NAMES = {"jaxpr", "cond_jaxpr", "body_jaxpr", "branches"}


def _region_rule(builder, eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    kind = eqn.primitive.name
    regions = {name: builder.import_region(closed, f"{kind}_{name}")
               for name, closed in _JAXPR_PARAMS[kind](eqn.params).items()}
    params = {k: v for k, v in eqn.params.items() if k not in _JAXPR_PARAM_NAMES}
    results = [builder.new_value(v.aval) for v in eqn.outvars]
    builder.emit(Op(kind=kind, operands=operands, results=results,
                    attrs={"primitive": eqn.primitive, "params": params},
                    source=builder.current_source, regions=regions))
    return results


IMPORT_RULES = {kind: _region_rule for kind in REGION_KINDS}
