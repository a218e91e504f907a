"""Logical meshes of MTIA devices, in JAX's own vocabulary.

``make_mesh((9, 8), ("data", "model"), chip="mtia400")`` returns a
``jax.sharding.AbstractMesh``: a mesh of *logical* devices that exists for
modeling on any host (a 72-chip mesh on a laptop). Shardings are written with
``jax.sharding.PartitionSpec`` / ``NamedSharding`` as usual.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

from jax.sharding import AbstractMesh

from mtia_jax import chips as chip_catalogue


def make_mesh(axis_shapes: Sequence[int], axis_names: Sequence[str], *, chip=None) -> AbstractMesh:
    """A logical mesh of ``prod(axis_shapes)`` devices of ``chip``.

    Raises ``ValueError`` when the mesh is larger than the chip's scale-up
    domain (72 devices for mtia400/450/500), when shapes and names differ in
    length, or when a name repeats.
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
    spec = chip_catalogue.get(chip) if chip is not None else chip_catalogue.default()
    devices = math.prod(axis_shapes)
    if devices > spec.scaleup_domain:
        raise ValueError(
            f"make_mesh: a mesh of {devices} devices {dict(zip(axis_names, axis_shapes))} is larger "
            f"than {spec.name}'s scale-up domain of {spec.scaleup_domain} devices "
            f"({spec.sources.get('scaleup_domain', 'see mtia-jax chips --sources')}). "
            f"Use at most {spec.scaleup_domain} devices.")
    return AbstractMesh(axis_shapes, axis_names)


__all__ = ["make_mesh"]
