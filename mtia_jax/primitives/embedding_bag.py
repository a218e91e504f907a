"""``embedding_bag``: pooled embedding lookups (DLRM / TorchRec), one kernel.

    pooled = embedding_bag(table, indices, offsets=offsets)          # PyTorch EmbeddingBag
    pooled = embedding_bag(table, indices, lengths=lengths)          # TorchRec jagged
    pooled = embedding_bag(table, padded)                            # (bags, max_len), -1 pads
    # table (N, D) -> pooled (bags, D)

Bags (the three conventions):

- ``offsets`` (1-D ``indices`` of n entries, ``offsets`` of shape (B,)):
  bag b is ``indices[offsets[b]:offsets[b+1]]``; the last bag runs to the
  end of ``indices`` (PyTorch ``nn.EmbeddingBag``). Offsets must be
  non-decreasing and start at 0, as PyTorch requires; bag 0 always starts
  at index 0, and offsets are clipped to [0, n] (other offsets give
  unspecified bags).
- ``lengths`` (1-D ``indices``, ``lengths`` of shape (B,)): bag b holds the
  next ``lengths[b]`` indices (TorchRec ``KeyedJaggedTensor`` values and
  lengths; a negative length counts as 0). Indices after the last bag (past
  ``sum(lengths)``) are not read.
- padded (2-D ``indices`` of shape (B, L), no offsets/lengths): bag b is row b
  of ``indices``; entries equal to -1 are padding.

Pooling (``mode``): ``"sum"`` (optionally weighted by ``per_sample_weights``,
one weight per index, as PyTorch allows for "sum" only), ``"mean"`` (sum
divided by the number of entries in the bag) or ``"max"`` (elementwise).
An empty bag (no entries, or only padding) pools to zeros in every mode.
Rows are pooled in float32 and the result is rounded once to the table's dtype.

Out-of-range indices (``< 0`` or ``>= N``; in the padded form any negative
index other than the -1 padding): by default they contribute nothing (they
are dropped like padding and not counted by "mean"), because a compiled
program cannot raise on data. To have them raise, run the function under
``jax.experimental.checkify`` with index checks: the primitive registers a
checkify rule (an ``OOBError`` naming ``embedding_bag``, the table's shape
and the first offending index)::

    err, pooled = checkify.checkify(f, errors=checkify.index_checks)(table, idx)
    err.throw()   # JaxRuntimeError: out-of-bounds indexing for array of shape (N, D) ...

The same index checks raise for offsets that do not start at 0 or decrease.

The rule is registered through ``jax._src.checkify`` (JAX has no public API
for checkify rules of new primitives).

The primitive ``embedding_bag_p`` sees a canonical form with a leading axis
of S independent *index sets*: the table, ``indices (S, n)`` or
``(S, B, L)``, then ``offsets``/``lengths (S, B)`` (flat forms only), then
``per_sample_weights`` (shaped like ``indices``, when ``weighted``); params
``layout`` ("offsets", "lengths" or "padded"), ``mode`` and ``weighted``;
result ``(S, B, D)``. The table is either

- ``(N, D)``: one table shared by every index set, or
- ``(T, N, D)``: a stack of T equal-shape tables, S a multiple of T; the
  sets come in T consecutive groups of S / T, group t reading table t.

The public function uses S = 1 and a 2-D table. ``jax.vmap`` keeps one
kernel for every set: over index sets it folds the batch into S; over
tables (TorchRec's several tables of one embedding dim,
``jax.vmap(embedding_bag)(tables, ids)``) it stacks them, so the per-table
lookups become one op with a ``(T, N, D)`` table.

Derivatives: JVP (and so ``jax.grad``) differentiates the reference w.r.t.
the table and the per-sample weights (indices, offsets and lengths are
integers). The gradient of "max" goes to the row that attains the maximum.

Sharded tables (table-wise as a stack split on T, row-wise, column-wise)
are partitioned by ``lowering.passes.partition_embedding``.

Cost (``runtime.accelerated.embedding``): rows gathered at random at the
chip's random-access HBM efficiency, indices and pooled output streamed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import checkify as _checkify
from jax._src import core as _core
from jax.interpreters import ad

from mtia_jax.primitives._base import define_primitive

__all__ = ["embedding_bag", "embedding_bag_p", "split_operands", "MODES", "LAYOUTS"]

MODES = ("sum", "mean", "max")
LAYOUTS = ("offsets", "lengths", "padded")
PADDING_INDEX = -1  # padding entry of the 2-D (padded) form


# ------------------------------------------------------------ operands

def split_operands(operands, layout: str, weighted: bool):
    """(table, indices, segments or None, weights or None) from the canonical
    operand list of ``embedding_bag_p`` (values, avals or IR values alike)."""
    table, indices, *rest = operands
    segments = rest.pop(0) if layout != "padded" else None
    weights = rest.pop(0) if weighted else None
    return table, indices, segments, weights


# ------------------------------------------------------------ reference

def _flat_bags(indices, segments, layout: str):
    """Bag of every entry of flat ``indices (S, n)``: ``(S, n)`` in [0, B], B = none.

    Bag of position p = the number of bag boundaries at or before p: the
    starts of bags 1.. (offsets) or the ends of bags 0.. (lengths), found by
    counting boundaries into an (n + 1)-slot histogram and prefix-summing."""
    s, n = indices.shape
    if layout == "offsets":
        boundaries = segments[:, 1:]
    else:
        boundaries = jnp.cumsum(jnp.maximum(segments, 0), axis=1)
    boundaries = jnp.clip(boundaries, 0, n).astype(jnp.int32)
    sets = jnp.broadcast_to(jnp.arange(s)[:, None], boundaries.shape)
    marks = jnp.zeros((s, n + 1), jnp.int32).at[sets, boundaries].add(1)
    return jnp.cumsum(marks, axis=1)[:, :n]


def _table_rows(table, indices):
    """Rows of ``table`` flattened to ``(rows, D)`` that ``indices (S, n)``
    read, clipped into the table (the invalid entries are dropped later)."""
    n_rows = table.shape[-2]
    rows = jnp.clip(indices, 0, n_rows - 1)
    if table.ndim == 3:  # set group t reads table t: its rows start at t N
        sets = indices.shape[0]
        first = jnp.arange(sets, dtype=jnp.int32) // (sets // table.shape[0]) * n_rows
        rows = rows + first[:, None]
    return rows.reshape(-1)


def _reference(*operands, layout: str, mode: str, weighted: bool):
    """Pool the rows of every bag of every index set (see the module docstring)."""
    table, indices, segments, weights = split_operands(operands, layout, weighted)
    n_rows, d = table.shape[-2:]
    s = indices.shape[0]
    if layout == "padded":
        num_bags = indices.shape[1]
        bags = jnp.broadcast_to(jnp.arange(num_bags, dtype=jnp.int32)[None, :, None],
                                indices.shape)
        in_bag = jnp.ones(indices.shape, bool)
        indices, bags = indices.reshape(s, -1), bags.reshape(s, -1)
        in_bag = in_bag.reshape(s, -1)
        if weights is not None:
            weights = weights.reshape(s, -1)
    else:
        num_bags = segments.shape[1]
        bags = _flat_bags(indices, segments, layout)
        in_bag = bags < num_bags
    valid = in_bag & (indices >= 0) & (indices < n_rows)
    # one segment per (set, bag); invalid entries go to an extra dropped segment
    num_segments = s * num_bags
    segment = jnp.where(valid, jnp.arange(s, dtype=jnp.int32)[:, None] * num_bags + bags,
                        num_segments).reshape(-1)
    rows = jnp.take(table.reshape(-1, d), _table_rows(table, indices), axis=0,
                    mode="clip").astype(jnp.float32)
    keep = valid.reshape(-1, 1)
    count = jax.ops.segment_sum(valid.reshape(-1).astype(jnp.float32), segment,
                                num_segments + 1)[:num_segments, None]
    if mode == "max":
        rows = jnp.where(keep, rows, -jnp.inf)
        pooled = jax.ops.segment_max(rows, segment, num_segments + 1)[:num_segments]
    else:
        if weights is not None:
            rows = rows * weights.reshape(-1, 1).astype(jnp.float32)
        rows = jnp.where(keep, rows, 0.0)
        pooled = jax.ops.segment_sum(rows, segment, num_segments + 1)[:num_segments]
        if mode == "mean":
            pooled = pooled / jnp.maximum(count, 1.0)
    pooled = jnp.where(count > 0, pooled, 0.0)
    return pooled.reshape(s, num_bags, d).astype(table.dtype)


# ------------------------------------------------------------ rules

def _abstract_eval(*avals, layout, mode, weighted):
    table, indices, segments, _ = split_operands(avals, layout, weighted)
    sets = indices.shape[0]
    if table.ndim == 3 and sets % table.shape[0]:
        raise ValueError(f"embedding_bag_p: {sets} index sets cannot be grouped over a stack of "
                         f"{table.shape[0]} tables {tuple(table.shape)}: the sets must be a "
                         f"multiple of the tables")
    num_bags = indices.shape[1] if layout == "padded" else segments.shape[1]
    return _core.ShapedArray((sets, num_bags, table.shape[-1]), table.dtype)


def _jvp(primals, tangents, *, layout, mode, weighted):
    """Differentiate the reference w.r.t. the table and the weights only."""
    table, indices, segments, weights = split_operands(primals, layout, weighted)
    t_table, _, _, t_weights = split_operands(tangents, layout, weighted)
    params = dict(layout=layout, mode=mode, weighted=weighted)

    def pooled(table, weights):
        ints = (indices,) if segments is None else (indices, segments)
        extra = (weights,) if weighted else ()
        return _reference(table, *ints, *extra, **params)

    out = embedding_bag_p.bind(*primals, **params)
    t_weights = ad.instantiate_zeros(t_weights) if weighted else None
    _, t_out = jax.jvp(pooled, (table, weights), (ad.instantiate_zeros(t_table), t_weights))
    return out, t_out


def _fold_outer(a, dim, size: int):
    """``a`` with the batch (of ``size``) folded into its leading axis, batch major."""
    a = jnp.broadcast_to(a, (size, *a.shape)) if dim is None else jnp.moveaxis(a, dim, 0)
    return a.reshape(size * a.shape[1], *a.shape[2:])


def _fold_inner(a, dim, size: int):
    """``a`` with the batch folded into its leading axis, batch minor."""
    if dim is None:
        a = jnp.broadcast_to(a[:, None], (a.shape[0], size, *a.shape[1:]))
    else:
        a = jnp.moveaxis(a, dim, 1)
    return a.reshape(a.shape[0] * size, *a.shape[2:])


def _batching_rule(args, dims, *, layout, mode, weighted):
    """One kernel for the whole batch: the batch folds into the set axis S.

    A batched table becomes (more) stacked tables, batch major, with the
    index sets batch major alike, so set group t still reads table t. A
    stacked table the batch does not map keeps its T tables; the batch
    folds into each table's group of sets (batch minor)."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    table, index_args = args[0], zip(args[1:], dims[1:])
    params = dict(layout=layout, mode=mode, weighted=weighted)
    if dims[0] is None and table.ndim == 3:
        out = embedding_bag_p.bind(table, *[_fold_inner(a, d, size) for a, d in index_args], **params)
        return out.reshape(-1, size, *out.shape[1:]), 1
    if dims[0] is not None:
        table = jnp.moveaxis(table, dims[0], 0)
        table = table.reshape(-1, *table.shape[-2:])
    out = embedding_bag_p.bind(table, *[_fold_outer(a, d, size) for a, d in index_args], **params)
    return out.reshape(size, -1, *out.shape[1:]), 0


def _checkify_rule(error, enabled_errors, *operands, layout, mode, weighted):
    """Under ``checkify`` with index checks: an OOBError for the first index
    of a bag that is outside the table (padding excepted)."""
    out = embedding_bag_p.bind(*operands, layout=layout, mode=mode, weighted=weighted)
    if _checkify.OOBError not in enabled_errors:
        return error, out
    table, indices, segments, _ = split_operands(operands, layout, weighted)
    n_rows = table.shape[-2]
    if layout == "padded":
        bad = (indices < PADDING_INDEX) | (indices >= n_rows)
    else:
        in_bag = _flat_bags(indices, segments, layout) < segments.shape[1]
        bad = in_bag & ((indices < 0) | (indices >= n_rows))
    first = jnp.argmax(bad.reshape(-1))
    payload = jnp.array([indices.reshape(-1)[first], 0, n_rows], dtype=np.int32)
    oob = _checkify.OOBError(_checkify.get_traceback(), "embedding_bag", table.shape, payload)
    error = _checkify.assert_func(error, jnp.any(bad), oob)
    if layout == "offsets":
        segments = jnp.asarray(segments)  # a constant may arrive as a NumPy array
        wrong = _bad_offsets(segments)
        at = jnp.argmax(wrong.reshape(-1))
        failed = _checkify.FailedCheckError(
            _checkify.get_traceback(), "embedding_bag: offsets must start at 0 and be "
            "non-decreasing; offsets[{}] = {}", at, segments.reshape(-1)[at])
        error = _checkify.assert_func(error, jnp.any(wrong), failed)
    return error, out


def _bad_offsets(offsets, xp=jnp):
    """Per offset of each set (S, B): True where it breaks PyTorch's rule (the
    first is not 0, or it is smaller than the one before); ``xp``: jnp for
    traced offsets, np for concrete ones (checked outside any trace)."""
    first = offsets[:, :1] != 0
    return xp.concatenate([first, offsets[:, 1:] < offsets[:, :-1]], axis=1)


embedding_bag_p = define_primitive("embedding_bag", _reference, abstract_eval=_abstract_eval,
                                   jvp=_jvp, batching_rule=_batching_rule)
_checkify.error_checks[embedding_bag_p] = _checkify_rule


# ------------------------------------------------------------ public API

def _as_array(value):
    return value if hasattr(value, "dtype") and hasattr(value, "shape") else np.asarray(value)


def _with_set_axis(a):
    """``a`` as a set of one (a reshape: no data moves)."""
    return jnp.reshape(a, (1, *a.shape))


def _check_kind(name: str, value, kind: str) -> None:
    test = {"integer": jnp.integer, "floating-point": jnp.floating}[kind]
    if not jnp.issubdtype(value.dtype, test):
        article = "an" if kind == "integer" else "a"
        raise TypeError(f"embedding_bag: {name} must be {article} {kind} array, got dtype "
                        f"{np.dtype(value.dtype).name} with shape {tuple(value.shape)}")


def _check_segments(name: str, value) -> None:
    _check_kind(name, value, "integer")
    if value.ndim != 1:
        raise ValueError(f"embedding_bag: {name} must be 1-D (bags,), got shape "
                         f"{tuple(value.shape)}")


def embedding_bag(table, indices, *, offsets=None, lengths=None, mode: str = "sum",
                  per_sample_weights=None):
    """Pooled embedding lookups: one row of ``(bags, D)`` per bag of indices.

    Args:
      table: floating-point array ``(N, D)``.
      indices: integer array; 1-D ``(n,)`` with ``offsets`` or ``lengths``, or
        2-D ``(bags, max_len)`` padded with -1 (then neither is given).
      offsets: integer ``(bags,)``: bag b = ``indices[offsets[b]:offsets[b+1]]``,
        the last bag runs to the end (PyTorch ``EmbeddingBag``).
      lengths: integer ``(bags,)``: bag b = the next ``lengths[b]`` indices (TorchRec).
      mode: "sum", "mean" or "max".
      per_sample_weights: floating-point array shaped like ``indices``; each
        row is scaled by its weight before summing (``mode="sum"`` only).

    Returns ``(bags, D)`` in the table's dtype; empty bags are zeros.
    Out-of-range indices contribute nothing (see the module docstring for
    raising on them with ``checkify``).
    """
    table, indices = _as_array(table), _as_array(indices)
    _check_kind("table", table, "floating-point")
    if table.ndim != 2:
        raise ValueError(f"embedding_bag: table must be 2-D (N, D), got shape {tuple(table.shape)}")
    if table.shape[0] == 0:
        raise ValueError(f"embedding_bag: table must have at least one row, got shape "
                         f"{tuple(table.shape)}")
    _check_kind("indices", indices, "integer")
    if mode not in MODES:
        raise ValueError(f"embedding_bag: mode must be one of {', '.join(map(repr, MODES))}, "
                         f"got {mode!r}")
    if offsets is not None and lengths is not None:
        raise ValueError("embedding_bag: give offsets (PyTorch convention) or lengths (TorchRec "
                         "convention), not both")
    if indices.ndim == 2:
        if offsets is not None or lengths is not None:
            raise ValueError(f"embedding_bag: 2-D indices {tuple(indices.shape)} are padded bags "
                             f"(bags, max_len) with -1 padding; offsets/lengths are only for 1-D "
                             f"indices")
        layout, segments = "padded", ()
    elif indices.ndim == 1:
        if offsets is None and lengths is None:
            raise ValueError(f"embedding_bag: 1-D indices {tuple(indices.shape)} need offsets= "
                             f"or lengths= (bags,) to say where each bag starts")
        layout = "offsets" if offsets is not None else "lengths"
        seg = _as_array(offsets if offsets is not None else lengths)
        _check_segments(layout, seg)
        if layout == "offsets" and not isinstance(seg, jax.core.Tracer):
            bad = np.flatnonzero(_bad_offsets(np.asarray(seg)[None], np)[0])
            if bad.size:
                raise ValueError(f"embedding_bag: offsets must start at 0 and be non-decreasing "
                                 f"(PyTorch's rule); offsets[{bad[0]}] = {np.asarray(seg)[bad[0]]} "
                                 f"in {np.asarray(seg).tolist()[:16]}")
        segments = (_with_set_axis(seg),)
    else:
        raise ValueError(f"embedding_bag: indices must be 1-D (with offsets or lengths) or 2-D "
                         f"(bags, max_len), got shape {tuple(indices.shape)}")
    weights = ()
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(f"embedding_bag: per_sample_weights are only supported with "
                             f"mode='sum' (as in PyTorch), got mode={mode!r}")
        w = _as_array(per_sample_weights)
        _check_kind("per_sample_weights", w, "floating-point")
        if tuple(w.shape) != tuple(indices.shape):
            raise ValueError(f"embedding_bag: per_sample_weights must have the shape of indices "
                             f"{tuple(indices.shape)}, got shape {tuple(w.shape)}")
        weights = (_with_set_axis(w),)
    out = embedding_bag_p.bind(table, _with_set_axis(indices), *segments, *weights, layout=layout,
                               mode=mode, weighted=bool(weights))
    return out.reshape(out.shape[1:])
