"""Numerics of a per-device (partitioned) program: JAX is the distributed engine.

A partitioned module (``lowering.passes.partition``) is the program every
device of the mesh runs; its collectives are JAX's own. Two ways to run it:

- ``vmap`` (default): ``jax.vmap(..., axis_name=...)`` over the logical
  devices, one nested vmap per mesh axis, on one host device. Any mesh size
  runs on one CPU: global inputs are split into per-device blocks, and the
  per-device outputs are put back together.
- ``spmd``: ``jax.shard_map`` over a real ``jax.sharding.Mesh`` of as many JAX
  devices (several host devices with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, GPUs, or several
  hosts after ``jax.distributed.initialize()``).

Both equal the unpartitioned program.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from lowering.ir import Module
from lowering.passes.partitioner import spec_axes


def _split_axes(spec) -> set[str]:
    return {a for entry in spec for a in spec_axes(entry)}


def _split(x, spec, axes: list[str], sizes: dict[str, int]):
    """Global ``x`` -> (blocks along each splitting mesh axis, in mesh order, ..., local shape).
    A dim split over several axes is split major axis first."""
    new_shape, lead = [], {}
    for n, entry in zip(x.shape, spec):
        for a in spec_axes(entry):
            lead[a] = len(new_shape)
            new_shape.append(sizes[a])
            n //= sizes[a]
        new_shape.append(n)
    order = [lead[a] for a in axes if a in lead]
    rest = [i for i in range(len(new_shape)) if i not in order]
    return jnp.reshape(x, new_shape).transpose(order + rest)


def _assemble(y, spec, axes: list[str], sizes: dict[str, int]):
    """Per-device outputs with one leading dim per mesh axis -> the global array."""
    split = _split_axes(spec)
    for level in reversed(range(len(axes))):  # devices along a replicated axis agree: take one
        if axes[level] not in split:
            y = jax.lax.index_in_dim(y, 0, level, keepdims=False)
    splitting = [a for a in axes if a in split]
    k = len(splitting)
    perm, shape = [], []
    for d, entry in enumerate(spec):
        n = y.shape[k + d]
        for a in spec_axes(entry):
            perm.append(splitting.index(a))
            n *= sizes[a]
        perm.append(k + d)
        shape.append(n)
    return jnp.reshape(y.transpose(perm), shape)


def vmap_function(module: Module, per_device: Callable) -> Callable:
    """Global flat inputs -> (global outputs, while trip counts), by nested vmaps."""
    layout = module.layout
    axes, sizes = [a for a, _ in layout.mesh], dict(layout.mesh)
    fn = per_device
    for a in reversed(axes):
        in_axes = [0 if a in _split_axes(spec) else None for spec in layout.in_specs]
        fn = jax.vmap(fn, in_axes=in_axes, out_axes=0, axis_name=a, axis_size=sizes[a])

    def run(*flat_args):
        blocks = [_split(x, s, axes, sizes) for x, s in zip(flat_args, layout.in_specs)]
        outs, counts = fn(*blocks)
        outs = [_assemble(y, s, axes, sizes) for y, s in zip(outs, layout.out_specs)]
        # devices run in lockstep: a loop takes as many trips as its slowest device
        return outs, {path: jnp.max(n) for path, n in counts.items()}

    return run


def real_mesh(module: Module, devices=None) -> Mesh:
    layout = module.layout
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < layout.devices:
        raise ValueError(
            f"numerics='spmd' needs {layout.devices} JAX devices for mesh {dict(layout.mesh)}, but "
            f"{len(devices)} are available. Use several host devices "
            f"(XLA_FLAGS=--xla_force_host_platform_device_count={layout.devices}), GPUs, or hosts "
            f"joined with jax.distributed.initialize(); or use the default numerics='vmap'.")
    shape = tuple(size for _, size in layout.mesh)
    grid = np.array(devices[:layout.devices]).reshape(shape)
    return Mesh(grid, tuple(a for a, _ in layout.mesh))


def shard_map_function(module: Module, per_device: Callable, devices=None) -> Callable:
    """Global inputs -> (global outputs, trip counts) with ``shard_map`` on real devices."""
    layout = module.layout
    mesh = real_mesh(module, devices)
    to_pspec = lambda spec: PartitionSpec(*spec)

    def body(*local_args):
        outs, counts = per_device(*local_args)
        return outs, {p: jax.lax.pmax(n, tuple(mesh.axis_names)) for p, n in counts.items()}

    def run(*flat_args):
        out_specs = ([to_pspec(s) for s in layout.out_specs], PartitionSpec())
        mapped = jax.shard_map(body, mesh=mesh, in_specs=tuple(to_pspec(s) for s in layout.in_specs),
                               out_specs=out_specs, check_vma=False)
        return mapped(*flat_args)

    return run


NUMERICS = {"vmap": vmap_function, "spmd": shard_map_function}
