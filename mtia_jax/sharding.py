"""Resolving user shardings (``in_shardings``/``out_shardings`` of
``mtia_jax.jit``) into one spec per flat array, with clear errors.

``NamedSharding(mesh, PartitionSpec(...))`` as in ``jax.jit``; a bare
``PartitionSpec`` needs ``mesh=`` (a ``mtia_jax.make_mesh`` mesh). Shardings
are a pytree prefix of the arguments (or outputs), as in ``jax.jit``.
"""

from __future__ import annotations

from typing import Sequence

from jax._src.tree_util import broadcast_prefix
from jax import tree_util
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from lowering.passes.partitioner import normalize_spec, spec_axes


def _is_sharding_leaf(x) -> bool:
    return x is None or isinstance(x, (PartitionSpec, NamedSharding))


def find_mesh(mesh, *sharding_trees):
    """The mesh: ``mesh=`` if given, else the one inside a ``NamedSharding``."""
    if mesh is not None:
        if not isinstance(mesh, (Mesh, AbstractMesh)):
            raise TypeError(f"mtia_jax.jit: mesh={mesh!r} ({type(mesh).__name__}) is not a mesh; pass "
                            f"mtia_jax.make_mesh((...), (...)) or a jax.sharding.Mesh")
        return mesh
    for tree in sharding_trees:
        for leaf in tree_util.tree_leaves(tree, is_leaf=_is_sharding_leaf):
            if isinstance(leaf, NamedSharding):
                return leaf.mesh
    if any(isinstance(leaf, PartitionSpec) for tree in sharding_trees
           for leaf in tree_util.tree_leaves(tree, is_leaf=_is_sharding_leaf)):
        raise ValueError("mtia_jax.jit: PartitionSpec shardings need a mesh: pass mesh=mtia_jax.make_mesh(...) "
                         "or use NamedSharding(mesh, spec)")
    return None


def mesh_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def flat_specs(shardings, tree, leaves_with_paths: Sequence, sizes: dict[str, int], what: str):
    """One spec (or None for "unconstrained") per flat leaf of ``tree``.

    Checks every named axis exists and divides the dimension it splits."""
    if shardings is None:
        return [None] * len(leaves_with_paths)
    try:
        prefix = broadcast_prefix(shardings, tree, is_leaf=_is_sharding_leaf)
    except ValueError as e:
        raise ValueError(f"mtia_jax.jit: {what} shardings do not match the structure of the {what}s: {e}") from None
    specs = []
    for (path, leaf), sharding in zip(leaves_with_paths, prefix):
        if sharding is None:
            specs.append(None)
            continue
        pspec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
        shape = tuple(getattr(leaf, "shape", ()))
        name = f"{what} {tree_util.keystr(path)}" if path else what
        try:
            spec = normalize_spec(pspec, len(shape))
        except ValueError as e:
            raise ValueError(f"mtia_jax.jit: {name} of shape {shape}: {e}") from None
        for dim, (size, entry) in enumerate(zip(shape, spec)):
            _check_split(name, dim, size, entry, sizes)
        specs.append(spec)
    return specs


def _check_split(name: str, dim: int, size: int, entry, sizes: dict[str, int]) -> None:
    """A ValueError unless every mesh axis of ``entry`` exists and their
    product divides ``size``."""
    axes = spec_axes(entry)
    for axis in axes:
        if axis not in sizes:
            raise ValueError(f"mtia_jax.jit: {name} is sharded over mesh axis {axis!r}, but the mesh "
                             f"has axes {sorted(sizes)}")
    devices = 1
    for axis in axes:
        devices *= sizes[axis]
    if size % devices:
        what = (f"mesh axis {axes[0]!r} of size {devices}" if len(axes) == 1 else
                f"mesh axes {axes} of sizes {' x '.join(str(sizes[a]) for a in axes)} = {devices}")
        raise ValueError(
            f"mtia_jax.jit: {name}: dimension {dim} of size {size} is not divisible by {what}. "
            f"Pad the dimension to a multiple of {devices} or shard it over other axes.")
