"""Partition rules for embedding lookups: ``embedding_bag`` and ``gather``
from tables split table-wise, row-wise or column-wise over mesh axes.

TorchRec's embedding shardings in ``jax.sharding`` terms, each with the
collectives a hand sharding needs:

- table-wise: equal-dim tables stacked ``(T, N, D)`` and split on T, looked
  up with ``jax.vmap(embedding_bag)(tables, ids)`` (one op whose table is the
  stack: ``mtia_jax.primitives.embedding_bag``). The index sets split like
  the tables, so every device pools its own tables for every bag: the output
  ``(S, B, D)`` is split on S and the lookup needs no communication.
  Resharding the output to split the batch instead (TorchRec's output
  all-to-all) is the one ``all_to_all`` that ``Partitioner.to_spec`` emits.
- row-wise: a table ``(N, D)`` (or every table of a stack) split on its rows
  over G devices (one mesh axis, or several: their product): device i owns
  rows [i N/G, (i+1) N/G). The ids are replicated over the axis
  (all-gathered if they come split over it); each device shifts them by
  -i N/G and pools the rows it owns, since ids outside the table contribute
  nothing. The pooled bags are a partial sum
  over the axis, resolved where they are used: a reduce-scatter onto the
  batch when the consumer wants the batch split, else an all-reduce.
  "sum" (weighted or not) is exact. "mean" pools the sum and divides by the
  number of in-range ids of each bag, which every device counts from the
  ids alone (a lookup of row 0 in a one-row table of ones). "max" has no
  such form (a device owning none of a bag's rows pools zeros), so its table
  is all-gathered. The shift keeps every invalid id invalid: the -1 padding
  and other negative ids stay negative, ids >= N stay past every device's
  rows, and (as ids must hold N in their dtype, else the table is gathered)
  no subtraction wraps around into a valid row.
- column-wise: a table split on D: every device pools its columns of every
  bag, the output is split on D; no communication, every mode.

Index sets, and the bags of the padded form, keep the split they come with
on the other axes (data parallelism over a second mesh axis).

``gather`` (``table[ids]``, ``jnp.take(table, ids, axis=0)``): dims the
gather slices whole keep their split (column-wise); the one dim looked up
with slices of one row, split row-wise, reads this device's rows with
shifted ids in "fill with 0" mode, a partial sum over the axis like the
row-wise bags. The unsharded result is kept for every id: "clip" (and
"promise_in_bounds", which XLA clamps) first clamp the ids into the table;
"fill" has exactly one device write the fill value where an id is outside
the table. Floating-point tables only; other gathers (index dims not
replicated, batching dims) run as before: lookups in a replicated table.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lowering.from_jaxpr import Builder
from lowering.ir import Op, Value
from lowering.passes.partitioner import Partitioner, overlaps, spec_axes
from mtia_jax.primitives.embedding_bag import embedding_bag_p, split_operands

FILL = lax.GatherScatterMode.FILL_OR_DROP
# gather modes whose unsharded semantics a row-split table keeps
ROW_SPLIT_GATHER_MODES = (lax.GatherScatterMode.CLIP, lax.GatherScatterMode.PROMISE_IN_BOUNDS, FILL)


# ------------------------------------------------------------ per-device functions

def _device_index(axis):
    """This device's block along a dim split over ``axis`` (a spec entry: one
    mesh axis, or several, the first major)."""
    major, *minor = spec_axes(axis)
    index = lax.axis_index(major)
    for a in minor:
        index = index * lax.axis_size(a) + lax.axis_index(a)
    return index


def _first_row(axis, rows: int, dtype):
    """The global row where this device's block of ``rows`` rows starts."""
    return (_device_index(axis) * rows).astype(dtype)


def _row_split_bags(table, *rest, axis, num_rows: int, layout: str, mode: str, weighted: bool):
    """The bags pooled over this device's rows of a table split row-wise over
    ``axis`` (``num_rows`` rows in all): a partial sum over ``axis``."""
    _, indices, segments, weights = split_operands((table, *rest), layout, weighted)
    segs = () if segments is None else (segments,)
    shifted = indices - _first_row(axis, table.shape[-2], indices.dtype)
    pooled = embedding_bag_p.bind(table, shifted, *segs, *(() if weights is None else (weights,)),
                                  layout=layout, mode="sum" if mode == "mean" else mode,
                                  weighted=weighted)
    if mode != "mean":
        return pooled
    # in-range ids read row 0 of a one-row table of ones, the others row 1 (none)
    outside = ((indices < 0) | (indices >= num_rows)).astype(jnp.int32)
    count = embedding_bag_p.bind(jnp.ones((1, 1), jnp.float32), outside, *segs, layout=layout,
                                 mode="sum", weighted=False)
    return (pooled.astype(jnp.float32) / jnp.maximum(count, 1.0)).astype(table.dtype)


def _row_split_gather(table, indices, *, axis, row_dim: int, component: int, bounds: tuple,
                      dimension_numbers, slice_sizes, mode, fill_value, indices_are_sorted,
                      unique_indices):
    """The gather of this device's rows of a table split on ``row_dim`` over
    ``axis`` (rows elsewhere read as 0): a partial sum over ``axis``.
    ``component`` is the index-vector entry that addresses ``row_dim``;
    ``bounds`` the largest valid start of every entry in the whole table."""
    bounds = jnp.asarray(bounds, indices.dtype)
    if mode == FILL:
        outside = jnp.any((indices < 0) | (indices > bounds), axis=-1)
    else:  # "clip", and "promise_in_bounds" as XLA runs it
        indices = jnp.clip(indices, 0, bounds)
    shift = _first_row(axis, table.shape[row_dim], indices.dtype)
    if indices.shape[-1] > 1:  # only the entry addressing the split dim moves
        shift = jnp.where(jnp.arange(indices.shape[-1]) == component, shift, 0).astype(indices.dtype)
    out = lax.gather(table, indices - shift, dimension_numbers, slice_sizes, mode=FILL, fill_value=0,
                     indices_are_sorted=indices_are_sorted, unique_indices=unique_indices)
    if mode != FILL:
        return out
    # the fill value comes from one device; the others add 0
    fill = jnp.asarray(np.nan if fill_value is None else fill_value, out.dtype)
    outside = jnp.expand_dims(outside, dimension_numbers.offset_dims) & (_device_index(axis) == 0)
    return jnp.where(outside, fill, out)


@functools.lru_cache(maxsize=256)
def _traced(fn, types: tuple, axis, axis_env: tuple, **params):
    structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in types]
    return jax.make_jaxpr(functools.partial(fn, axis=axis, **params), axis_env=axis_env)(*structs)


def _emit_per_device(p: Partitioner, fn, operands: list[Value], axis, **params) -> list[Value]:
    """Append to ``p`` the ops of ``fn`` (a per-device function that may ask
    for its index along ``axis``, a spec entry) applied to ``operands``; its results."""
    types = tuple((v.type.shape, np.dtype(v.type.dtype)) for v in operands)
    axis_env = tuple((a, p.mesh[a]) for a in spec_axes(axis))
    closed = _traced(fn, types, axis, axis_env, **params)
    builder = Builder()
    results = builder.import_jaxpr(closed.jaxpr, closed.consts, operands)
    for new in builder.ops:
        new.source = p.source
    p.ops.extend(builder.ops)
    return results


def _holds(dtype, rows: int) -> bool:
    """Whether integer ids of ``dtype`` can address ``rows`` rows (so shifting
    them by a device's first row cannot wrap around)."""
    return np.iinfo(dtype).max >= rows


# ------------------------------------------------------------ rules

def _embedding_bag_rule(p: Partitioner, op: Op) -> None:
    """Table-wise (split stack of tables), row-wise (partial sums) and
    column-wise lookups; the ids keep their split on other axes."""
    layout, mode, weighted = op.params["layout"], op.params["mode"], op.params["weighted"]
    table, indices, segments, weights = split_operands(op.operands, layout, weighted)
    for v in op.operands:
        p.resolve(v)
    tspec, ispec = p.spec[table], p.spec[indices]
    stacked = len(table.type.shape) == 3
    # index sets: split like a split stack of tables, else as the ids come
    # (unless the table keeps that axis)
    s = tspec[0] if stacked and tspec[0] is not None else None if overlaps(ispec[0], tspec) else ispec[0]
    if not (p.fits(indices.type.shape[0], s) and (not stacked or p.fits(table.type.shape[0], s))):
        s = None
    r, c = tspec[-2:]
    if mode == "max" or not _holds(indices.type.dtype, table.type.shape[-2]):
        r = None
    b = ispec[1] if layout == "padded" and not overlaps(ispec[1], [s, r, c]) else None
    ltable = p.to_spec(table, ((s,) if stacked else ()) + (r, c))
    ids = (s, b, None) if layout == "padded" else (s, None)
    operands = [ltable, p.to_spec(indices, ids)]
    if segments is not None:
        operands.append(p.to_spec(segments, (s, None)))
    if weights is not None:
        operands.append(p.to_spec(weights, ids))
    out = (s, b, c)
    if r is None:
        return p.same_op(op, operands, [out])
    (pooled,) = _emit_per_device(p, _row_split_bags, operands, r, num_rows=table.type.shape[-2],
                                 layout=layout, mode=mode, weighted=weighted)
    p.bind(op.results[0], pooled, out, frozenset({r}))


def _row_dim(p: Partitioner, op: Op) -> int | None:
    """The operand dim a gather looks up with one-row slices that can stay
    split (row-wise), if any."""
    table, indices = op.operands
    dn, params = op.params["dimension_numbers"], op.params
    if not (jnp.issubdtype(table.type.dtype, jnp.floating) and params["mode"] in ROW_SPLIT_GATHER_MODES):
        return None
    for d in dn.start_index_map:
        if (p.spec[table][d] is not None and params["slice_sizes"][d] == 1
                and _holds(indices.type.dtype, table.type.shape[d])):
            return d
    return None


def _gather_rule(p: Partitioner, op: Op) -> None:
    """Lookups (embeddings): the output keeps the ids' split on its batch
    dims and the table's on the dims sliced whole; a row-split table gives a
    partial sum (see the module docstring). Gathers with batching dims run
    replicated."""
    table, indices = op.operands
    dn, sizes = op.params["dimension_numbers"], op.params["slice_sizes"]
    if dn.operand_batching_dims:
        return p.run_replicated(op)
    p.resolve(table)
    p.resolve(indices)
    shape = table.type.shape
    row = _row_dim(p, op)
    tspec = tuple(a if d == row or (d not in dn.start_index_map and sizes[d] == n) else None
                  for d, (n, a) in enumerate(zip(shape, p.spec[table])))
    ispec = tuple(None if overlaps(a, tspec) else a for a in p.spec[indices][:-1]) + (None,)
    operands = [p.to_spec(table, tspec), p.to_spec(indices, ispec)]
    offset = iter(None if d == row else a  # a one-row slice kept as an output dim is whole
                  for d, a in enumerate(tspec) if d not in dn.collapsed_slice_dims)
    batch = iter(ispec[:-1])
    out = tuple(next(offset) if d in dn.offset_dims else next(batch)
                for d in range(len(op.results[0].type.shape)))
    local_sizes = tuple(n // p.mesh[a] if a is not None and d != row else n
                        for d, (n, a) in enumerate(zip(sizes, tspec)))
    params = {**op.params, "slice_sizes": local_sizes}
    if row is None:
        return p.same_op(op, operands, [out], params=params)
    bounds = tuple(shape[d] - sizes[d] for d in dn.start_index_map)
    (result,) = _emit_per_device(p, _row_split_gather, operands, tspec[row], row_dim=row,
                                 component=dn.start_index_map.index(row), bounds=bounds, **params)
    p.bind(op.results[0], result, out, frozenset({tspec[row]}))


RULES = {
    "embedding_bag": _embedding_bag_rule,
    "gather": _gather_rule,
}
