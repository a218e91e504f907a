"""Collective ops of the MTIA IR and their import from JAX's collectives.

Per-device programs (a ``shard_map`` body, or what the partition pass makes
of a sharded program) talk to the other devices of the mesh through these
ops. Each names the mesh axis it runs over (or, as ``axes``, several: a
dimension split over their product, the first axis major);
``attrs["group"]`` is the number of devices taking part (the axis size, or
the product). An ``all_to_all`` may carry ``payload_bytes``, the bytes the
chip sends when that is less than its buffer (``runtime.collectives``).

| kind           | attrs                         | JAX primitive            |
|----------------|-------------------------------|--------------------------|
| all_reduce     | axes, reduce (sum/max/min)    | psum, pmax, pmin         |
| all_gather     | axis, dim                     | all_gather (tiled)       |
| reduce_scatter | axis, dim                     | reduce_scatter (tiled)   |
| all_to_all     | axis, split, concat           | all_to_all (tiled)       |
| permute        | axis, perm                    | ppermute                 |
| axis_index     | axis                          | axis_index               |
| shard_slice    | axis, dim                     | (this device's block of a replicated value; no data moves) |
"""

from __future__ import annotations

import math

from jax.extend import core as jcore

from lowering.ir import Op, Value
from mtia_jax import mesh as mesh_lib
from mtia_jax.errors import UnsupportedOperationError

COLLECTIVE_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute")


def _names(axis) -> tuple[str, ...]:
    return tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)


def _single_axis(eqn: jcore.JaxprEqn, axis) -> str:
    names = _names(axis)
    if len(names) != 1:
        raise UnsupportedOperationError(f"{eqn.primitive.name} over several mesh axes {names}")
    return names[0]


def _collective(kind: str, attrs_of):
    def rule(builder, eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
        if eqn.params.get("axis_index_groups") is not None:
                raise UnsupportedOperationError(f"{eqn.primitive.name} with axis_index_groups",
                                            builder.current_source)
        results = [builder.new_value(v.aval) for v in eqn.outvars]
        builder.emit(Op(kind, operands, results, attrs_of(eqn), builder.current_source))
        return results
    return rule


def _reduce_attrs(reduce: str):
    return lambda eqn: {"axes": _names(eqn.params["axes"]), "reduce": reduce}


def _gather_attrs(eqn):
    if not eqn.params["tiled"]:
        raise NotImplementedError("all_gather(tiled=False) is imported via its tiled form only")
    return {"axis": _single_axis(eqn, eqn.params["axis_name"]), "dim": eqn.params["all_gather_dimension"]}


def _scatter_attrs(eqn):
    return {"axis": _single_axis(eqn, eqn.params["axis_name"]), "dim": eqn.params["scatter_dimension"]}


def _all_to_all_attrs(eqn):
    return {"axis": _single_axis(eqn, eqn.params["axis_name"]), "split": eqn.params["split_axis"],
            "concat": eqn.params["concat_axis"]}


def _permute_attrs(eqn):
    return {"axis": _single_axis(eqn, eqn.params["axis_name"]), "perm": tuple(eqn.params["perm"])}


def _axis_index_attrs(eqn):
    return {"axis": _single_axis(eqn, eqn.params["axis_name"])}


def _shard_map_rule(builder, eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    """A ``shard_map``: its body is already a per-device program."""
    params = eqn.params
    mesh = params["mesh"]
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    body = builder.import_region(jcore.ClosedJaxpr(params["jaxpr"], ()), "shard_map_body")
    set_groups(body, sizes, mesh_lib.scale_out_axes(mesh))
    results = [builder.new_value(v.aval) for v in eqn.outvars]
    builder.emit(Op("shard_map", operands, results,
                    {"mesh": sizes, "in_specs": tuple(params["in_specs"]),
                     "out_specs": tuple(params["out_specs"])},
                    builder.current_source, regions={"body": body}))
    return results


def set_groups(module, sizes: dict[str, int], scale_out_axes=()) -> None:
    """Record on every collective op how many devices take part
    (``group``) and, of those, how many distinct scale-up domains they span
    (``scale_out_group``: the product of its axes in ``scale_out_axes``)."""
    for op in module.ops:
        if op.kind in COLLECTIVE_KINDS or op.kind in ("axis_index", "shard_slice"):
            axes = op.attrs.get("axes") or (op.attrs["axis"],)
            op.attrs["group"] = math.prod(sizes[a] for a in axes)
            outer = math.prod(sizes[a] for a in axes if a in scale_out_axes)
            if outer > 1:
                op.attrs["scale_out_group"] = outer
        for region in op.regions.values():
            set_groups(region, sizes, scale_out_axes)


def _sharding_constraint_rule(builder, eqn: jcore.JaxprEqn, operands: list[Value]) -> list[Value]:
    results = [builder.new_value(v.aval) for v in eqn.outvars]
    sharding = eqn.params["sharding"]
    builder.emit(Op("sharding_constraint", operands, results, {"spec": getattr(sharding, "spec", sharding)},
                    builder.current_source))
    return results


IMPORT_RULES = {
    "shard_map": _shard_map_rule,
    "sharding_constraint": _sharding_constraint_rule,
    "psum": _collective("all_reduce", _reduce_attrs("sum")),
    "pmax": _collective("all_reduce", _reduce_attrs("max")),
    "pmin": _collective("all_reduce", _reduce_attrs("min")),
    "all_gather": _collective("all_gather", _gather_attrs),
    "reduce_scatter": _collective("reduce_scatter", _scatter_attrs),
    "all_to_all": _collective("all_to_all", _all_to_all_attrs),
    "ppermute": _collective("permute", _permute_attrs),
    "axis_index": _collective("axis_index", _axis_index_attrs),
}
