"""Logical meshes of MTIA devices, in JAX's own vocabulary.

``make_mesh((9, 8), ("data", "model"), chip="mtia400")`` returns a
``jax.sharding.AbstractMesh``: a mesh of *logical* devices that exists for
modeling on any host (a 72-chip mesh on a laptop). Shardings are written with
``jax.sharding.PartitionSpec`` / ``NamedSharding`` as usual.

A mesh may span several scale-up domains (racks):
``make_mesh((2, 72), ("pod", "model"), chip="mtia450", scale_out_axes=("pod",))``
is two racks of 72; collectives over "pod" cross the scale-out network, and
collectives over both axes run hierarchically (``lowering.network``).
``scale_out_axes(mesh)`` says which axes those are. (JAX interns meshes by
axis names and sizes, so one names and sizes combination has one marking.)
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Sequence

from jax.sharding import AbstractMesh

from mtia_jax import chips as chip_catalogue


# mesh -> its axes that cross the scale-out network
_SCALE_OUT: "weakref.WeakKeyDictionary[AbstractMesh, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def make_mesh(axis_shapes: Sequence[int], axis_names: Sequence[str], *, chip=None,
              scale_out_axes: Sequence[str] = ()) -> AbstractMesh:
    """A logical mesh of ``prod(axis_shapes)`` devices of ``chip``.

    ``scale_out_axes``: the axes whose devices sit in different scale-up
    domains (racks) and talk over the scale-out network; the other axes
    together must fit in one scale-up domain (72 devices for
    mtia400/450/500). Raises ``ValueError`` when they do not, when shapes and
    names differ in length, when a name repeats or a scale-out axis is not a
    mesh axis.
    """
    axis_shapes, axis_names = tuple(axis_shapes), tuple(axis_names)
    for size in axis_shapes:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise TypeError(f"make_mesh: axis sizes must be integers, got {size!r} in {axis_shapes}")
    axis_shapes = tuple(int(s) for s in axis_shapes)
    if not all(isinstance(n, str) and n for n in axis_names):
        raise TypeError(f"make_mesh: axis names must be non-empty strings, got {axis_names}")
    if len(axis_shapes) != len(axis_names):
        raise ValueError(f"make_mesh: {len(axis_shapes)} axis sizes {axis_shapes} but "
                         f"{len(axis_names)} axis names {axis_names}; give one name per axis")
    if len(set(axis_names)) != len(axis_names):
        raise ValueError(f"make_mesh: axis names must be distinct, got {axis_names}")
    if any(s < 1 for s in axis_shapes):
        raise ValueError(f"make_mesh: axis sizes must be positive, got {axis_shapes}")
    if isinstance(scale_out_axes, str):
        scale_out_axes = (scale_out_axes,)
    scale_out_axes = tuple(scale_out_axes)
    unknown = [a for a in scale_out_axes if a not in axis_names]
    if unknown:
        raise ValueError(f"make_mesh: scale_out_axes {unknown} are not axes of the mesh {axis_names}")
    spec = chip_catalogue.get(chip) if chip is not None else chip_catalogue.default()
    inside = {n: s for n, s in zip(axis_names, axis_shapes) if n not in scale_out_axes}
    devices = math.prod(inside.values())
    if devices > spec.scaleup_domain:
        raise ValueError(
            f"make_mesh: the mesh axes {inside} put {devices} devices in one scale-up domain, more "
            f"than {spec.name}'s {spec.scaleup_domain} "
            f"({spec.sources.get('scaleup_domain', 'see mtia-jax chips --sources')}). Use at most "
            f"{spec.scaleup_domain} devices per domain, and mark the axes that span domains with "
            f"scale_out_axes=(...), e.g. make_mesh((2, 72), ('pod', 'model'), "
            f"scale_out_axes=('pod',)).")
    mesh = AbstractMesh(axis_shapes, axis_names)
    marked = tuple(a for a in axis_names if a in scale_out_axes)
    if _SCALE_OUT.setdefault(mesh, marked) != marked:
        raise ValueError(
            f"make_mesh: a mesh with axes {dict(zip(axis_names, axis_shapes))} exists with "
            f"scale_out_axes={_SCALE_OUT[mesh]}; JAX treats meshes with the same axes as one, so "
            f"give this one other axis names")
    return mesh


def scale_out_axes(mesh) -> tuple[str, ...]:
    """The axes of ``mesh`` that cross the scale-out network (none for a mesh
    not made by ``make_mesh``)."""
    try:
        return _SCALE_OUT.get(mesh, ())
    except TypeError:  # not weak-referenceable: not ours
        return ()


__all__ = ["make_mesh", "scale_out_axes"]
