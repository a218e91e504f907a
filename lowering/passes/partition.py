"""SPMD partitioning: a program over global arrays becomes the program every
device of the mesh runs, with the collectives it needs.

Each global value gets a *placement*: a spec (per dimension, None or the mesh
axis it is split over, or a tuple of several axes: split over their product,
the first axis major, as ``PartitionSpec(("data", "model"))`` in JAX) and a
set of mesh axes over which the per-device values are *partial sums* still
to be added up. Placements start at
the arguments' ``in_shardings`` and propagate forward, op by op, through a
table of rules keyed by op kind or category:

- elementwise: operands are brought to one spec (the first sharded operand's);
  sums (add, sub, neg, scaling by an unsharded factor) carry partial sums;
- contractions: matching sharded batch dims stay sharded, sharded contracting
  dims give a partial sum (resolved later by an all-reduce, or by a
  reduce-scatter when the consumer wants the result split), free dims keep
  their operand's axis; one side is sliced locally to match the other where
  that costs no communication; under a precision policy a contraction the
  precision pass may quantize is split only into whole MX blocks per device
  (else its contracting dims are gathered), so that the per-device program
  quantizes the unsharded program's blocks;
- reductions: a sum over a split dim is a partial sum; max/min all-reduce;
- broadcasts, transposes, reshapes, squeezes map dims; slices, concatenation,
  padding, reversal, sorting and scans along a dim keep the other dims split;
  scatters keep their batching dims and whole window dims split (a KV-cache
  write stays on each device's sequences and heads);
- attention (``flash_attention``, ``paged_attention``) keeps its batch or
  query tokens and its heads split (heads only when the mesh axis divides the
  K/V heads too); a paged KV pool split by blocks is gathered;
- embedding lookups (``gather``, ``embedding_bag``) from tables split
  table-, row- or column-wise: ``partition_embedding``;
- ``moe_ffn`` (expert parallelism: all-to-all dispatch and return) and
  ``mx_matmul``: ``partition_moe``;
- ``sharding_constraint`` reshards; a ``shard_map`` body is inlined (it is
  already per-device); ``scan``/``while``/``cond`` bodies are partitioned with
  their carries held at one placement;
- anything else runs replicated: its operands are all-gathered first. Always
  correct, never silently wrong, and visible in ``as_text()``.

Resharding uses the cheapest collective: a local slice (``shard_slice``, no
communication) to split a replicated dim, ``all_to_all`` to move an axis
between dims, ``all_gather`` to replicate, ``reduce_scatter``/``all_reduce``
to resolve partial sums. The result is a per-device module whose
``layout`` records the mesh and the placements of its inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from lowering import collectives
from lowering.ir import Module, Op, Value
from lowering.op_kinds import KIND_CATEGORY
from lowering.passes import partition_embedding, partition_moe
from lowering.passes.partitioner import (Partitioner, Spec, normalize_spec, overlaps, spec_axes,
                                         spec_entry)
from lowering.passes.precision import may_quantize, split_keeps_mx_blocks
from lowering.regions import REGION_KINDS

@dataclasses.dataclass(frozen=True)
class SpmdLayout:
    """How a per-device module relates to the global program."""

    mesh: tuple[tuple[str, int], ...]      # (axis, size) in mesh order
    in_specs: tuple[Spec, ...]
    out_specs: tuple[Spec, ...]

    @property
    def axes(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def devices(self) -> int:
        return math.prod(size for _, size in self.mesh)


LINEAR_UNARY = frozenset({"neg", "convert_element_type", "copy", "reduce_precision", "stop_gradient"})
ADDITIVE = frozenset({"add", "sub", "add_any"})


# ---------------------------------------------------------------- rules

def _merged_spec(p: Partitioner, values: list[Value], rank: int) -> list:
    target = [None] * rank
    for v in values:
        for d, a in enumerate(p.spec[v]):
            if a is not None and target[d] is None and not overlaps(a, target):
                target[d] = a
    return target


def _elementwise_rule(p: Partitioner, op: Op) -> None:
    rank = len(op.results[0].type.shape)
    arrays = [v for v in op.operands if len(v.type.shape) == rank and rank > 0]
    partials = [p.partial.get(v, frozenset()) for v in op.operands]
    keep = frozenset()
    if any(partials):
        first = next(x for x in partials if x)
        if op.kind in ADDITIVE and all(x == first for x in partials) and len(arrays) == len(op.operands):
            keep = first
        elif op.kind in LINEAR_UNARY:
            keep = first
        elif op.kind in ("mul", "div") and sum(bool(x) for x in partials) == 1 and (
                op.kind == "mul" or partials[0]):
            keep = first
    target = tuple(_merged_spec(p, arrays, rank))
    operands = []
    for v, part in zip(op.operands, partials):
        if v in arrays:
            operands.append(p.to_spec(v, target, keep_partial=bool(keep) and part == keep))
        else:
            p.resolve(v)
            operands.append(p.local[v])
    p.same_op(op, operands, [target] * len(op.results), keep)


def _reduction_rule(p: Partitioner, op: Op) -> None:
    (x,) = op.operands[:1]
    axes = tuple(op.params["axes"])
    if op.kind == "reduce_sum":
        spec = p.spec[x]
        lx = p.to_spec(x, spec, keep_partial=True)
        partial = p.partial.get(x, frozenset()) | {spec[d] for d in axes if spec[d] is not None}
        out = tuple(a for d, a in enumerate(spec) if d not in axes)
        p.same_op(op, [lx], [out], frozenset(partial))
        return
    if op.kind in ("reduce_max", "reduce_min"):
        p.resolve(x)
        spec = p.spec[x]
        out = tuple(a for d, a in enumerate(spec) if d not in axes)
        (result,) = op.results
        (local,) = p.emit(op.kind, [p.local[x]], [p.local_type(result.type, out)], dict(op.attrs))
        split = tuple(a for a in p.mesh if overlaps(a, [spec[d] for d in axes]))
        if split:
            local = p.collective("all_reduce", local, local.type.shape, axes=split,
                                 reduce=op.kind.removeprefix("reduce_"))
        p.bind(result, local, out)
        return
    # argmax, products, logical reductions: the reduced dims gathered first
    spec = tuple(None if d in axes else a for d, a in enumerate(p.spec[x]))
    lx = p.to_spec(x, spec)
    out = tuple(a for d, a in enumerate(spec) if d not in axes)
    p.same_op(op, [lx, *[p.replicated(v) for v in op.operands[1:]]], [out] * len(op.results))


def _assign(spec: list, dim: int, axis) -> None:
    for d, entry in enumerate(spec):
        if overlaps(axis, [entry]):
            spec[d] = None
    spec[dim] = axis


def _dot_general_rule(p: Partitioner, op: Op) -> None:
    lhs, rhs = op.operands
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    if may_quantize(op, p.precision):  # quantization is not linear: partial sums added up first
        p.resolve(lhs)
        p.resolve(rhs)
    lpart, rpart = p.partial.get(lhs, frozenset()), p.partial.get(rhs, frozenset())
    if lpart and rpart:
        p.resolve(rhs)
        rpart = frozenset()
    ls, rs = list(p.spec[lhs]), list(p.spec[rhs])
    partial = set(lpart | rpart)
    for i, j in (*zip(lb, rb), *zip(lc, rc)):
        a, b = ls[i], rs[j]
        if a == b:
            continue
        if a is not None and (b is None or overlaps(b, ls)):
            _assign(rs, j, a)
        elif b is not None and a is None:
            _assign(ls, i, b)
        else:
            _assign(rs, j, a)
    local_lhs = tuple(n // p.mesh[a] if a is not None and p.fits(n, a) else n
                      for n, a in zip(lhs.type.shape, ls))
    if not split_keeps_mx_blocks(op, local_lhs, p.precision):  # contract whole MX blocks, or gather K
        for i, j in zip(lc, rc):
            ls[i] = rs[j] = None
    for i, j in zip(lc, rc):
        partial.update(spec_axes(ls[i]))
    lfree = [d for d in range(len(ls)) if d not in (*lc, *lb)]
    rfree = [d for d in range(len(rs)) if d not in (*rc, *rb)]
    used = [ls[i] for i in lb] + [ls[i] for i in lfree] + list(partial)
    for j in rfree:  # one axis may split only one result dim
        if overlaps(rs[j], used):
            rs[j] = None
        used.append(rs[j])
    for i in lfree:
        if overlaps(ls[i], partial):
            ls[i] = None
    out = tuple([ls[i] for i in lb] + [ls[i] for i in lfree] + [rs[j] for j in rfree])
    operands = [p.to_spec(lhs, tuple(ls), keep_partial=bool(lpart)),
                p.to_spec(rhs, tuple(rs), keep_partial=bool(rpart))]
    p.same_op(op, operands, [out], frozenset(partial))


def _broadcast_rule(p: Partitioner, op: Op) -> None:
    (x,) = op.operands
    shape, dims = op.params["shape"], op.params["broadcast_dimensions"]
    spec = list(p.spec[x])
    out = [None] * len(shape)
    for i, d in enumerate(dims):
        if x.type.shape[i] == shape[d]:
            out[d] = spec[i]
        else:
            spec[i] = None
    lx = p.to_spec(x, tuple(spec), keep_partial=True)
    local = p.local_type(op.results[0].type, out).shape
    p.same_op(op, [lx], [tuple(out)], p.partial.get(x, frozenset()), {**op.params, "shape": local})


def _transpose_rule(p: Partitioner, op: Op) -> None:
    (x,) = op.operands
    spec = p.spec[x]
    out = tuple(spec[d] for d in op.params["permutation"])
    p.same_op(op, [p.to_spec(x, spec, keep_partial=True)], [out], p.partial.get(x, frozenset()))


def _reshape_rule(p: Partitioner, op: Op) -> None:
    """A split dim keeps its split on the output dims it becomes: the dim
    starting at the same element offset; a dim split over several axes
    (major first) over several output dims, each but the last split whole
    (heads over ("model", "rep") reshaped to (kv_heads, group), "model" on
    kv_heads and "rep" on group); and a dim following one split whole joins
    its output dim's split (the reverse merge). Otherwise it is gathered."""
    (x,) = op.operands
    src, dst = x.type.shape, op.results[0].type.shape
    spec = list(p.spec[x])
    out = [None] * len(dst)
    whole = {}  # output dim -> source dim ending there split whole (one index per device)
    for d, a in enumerate(spec):
        if a is None:
            continue
        prefix = math.prod(src[:d])
        # the output dim starting at the same element offset (size-1 dims skipped)
        j = next((j for j in range(len(dst)) if math.prod(dst[:j]) == prefix and dst[j] != 1), None)
        placed = _place_split(p, spec_axes(a), src[d], dst, j, out) if j is not None else None
        if placed is None:
            placed = _merge_split(p, spec_axes(a), src, d, dst, out, whole)
        if placed is None:
            spec[d] = None
            continue
        for k, axes in placed.items():
            out[k] = spec_entry(axes)
        last = max(placed)
        if p.mesh[tuple(a for axes in placed.values() for a in axes)] == src[d]:
            whole[last] = d
    lx = p.to_spec(x, tuple(spec), keep_partial=True)
    local = p.local_type(op.results[0].type, out).shape
    params = {**op.params, "new_sizes": local} if "new_sizes" in op.params else op.params
    p.same_op(op, [lx], [tuple(out)], p.partial.get(x, frozenset()), params)


def _place_split(p: Partitioner, axes: tuple, size: int, dst, j: int, out) -> dict | None:
    """Output dim -> axes for a source dim of ``size`` split over ``axes`` that
    starts at output dim ``j``; None when the split does not carry over."""
    if out[j] is None and dst[j] % p.mesh[axes] == 0 and (dst[j] % size == 0 or size % dst[j] == 0):
        return {j: axes}
    placed, taken, k = {}, (), j
    for axis in axes:  # whole groups of major axes on the leading output dims
        taken += (axis,)
        if k < len(dst) and p.mesh[taken] == dst[k] and len(taken) < len(axes) - len(sum(placed.values(), ())):
            placed[k], taken, k = taken, (), k + 1
    if not placed or not taken or k >= len(dst) or dst[k] % p.mesh[taken] != 0:
        return None
    placed[k] = taken
    if any(out[i] is not None for i in placed) or size % math.prod(dst[j:k + 1]) != 0:
        return None
    return placed


def _merge_split(p: Partitioner, axes: tuple, src, d: int, dst, out, whole: dict) -> dict | None:
    """A source dim ``d`` right after one split whole into output dim ``j``
    (both inside ``j``) adds its axes to ``j``'s split."""
    j = next((j for j, prev in whole.items() if prev == d - 1), None)
    if j is None or math.prod(src[:d + 1]) > math.prod(dst[:j + 1]):
        return None
    if dst[j] % p.mesh[(*spec_axes(out[j]), *axes)] != 0:
        return None
    del whole[j]
    return {j: (*spec_axes(out[j]), *axes)}


def _squeeze_rule(p: Partitioner, op: Op) -> None:
    (x,) = op.operands
    dims = set(op.params["dimensions"])
    out = tuple(a for d, a in enumerate(p.spec[x]) if d not in dims)
    p.same_op(op, [p.to_spec(x, p.spec[x], keep_partial=True)], [out], p.partial.get(x, frozenset()))


def _along_dims_rule(dims_of: Callable[[Op], set], shape_params: tuple = ()):
    """Ops that work along some dims (slice, concatenate, pad, sort, cumsum):
    the other dims stay split. ``shape_params`` name params holding per-dim
    sizes, rewritten to per-device sizes."""
    def rule(p: Partitioner, op: Op) -> None:
        touched = dims_of(op)
        arrays = [v for v in op.operands if len(v.type.shape) == len(op.results[0].type.shape)]
        target = tuple(None if d in touched else a
                       for d, a in enumerate(_merged_spec(p, arrays, len(op.results[0].type.shape))))
        operands = [p.to_spec(v, target) if v in arrays else p.replicated(v) for v in op.operands]
        params = dict(op.params)
        for name in shape_params:
            params[name] = tuple(n // p.mesh[a] if a else n for n, a in zip(params[name], target))
        p.same_op(op, operands, [target] * len(op.results), params=params)
    return rule


def _scatter_rule(p: Partitioner, op: Op) -> None:
    """``scatter`` and its combining kinds: operand dims that are batching
    dims (with the indices' and updates' matching dims) or window dims the
    updates cover whole keep their split; the scattered dims are gathered.
    So a KV-cache write (one row per sequence, ``operand_batching_dims`` over
    the batch) stays on each device's sequences and heads."""
    operand, indices, updates = op.operands[:3]
    dn = op.params["dimension_numbers"]
    rank = len(operand.type.shape)
    batching = tuple(getattr(dn, "operand_batching_dims", ()))
    index_batching = tuple(getattr(dn, "scatter_indices_batching_dims", ()))
    window = [d for d in range(rank) if d not in dn.inserted_window_dims and d not in batching]
    update_of = dict(zip(window, dn.update_window_dims))
    scattered_update_dims = [d for d in range(len(updates.type.shape)) if d not in dn.update_window_dims]
    index_dims = list(range(len(indices.type.shape) - 1))  # the last is the index vector
    p.resolve(operand)
    target = [None] * rank
    for d in window:
        if updates.type.shape[update_of[d]] == operand.type.shape[d]:
            target[d] = p.spec[operand][d]
    for d in batching:
        target[d] = p.spec[operand][d]
    target = [a if a is not None and p.fits(n, a) else None for n, a in zip(operand.type.shape, target)]
    index_spec = [None] * len(indices.type.shape)
    update_spec = [None] * len(updates.type.shape)
    for d in window:
        update_spec[update_of[d]] = target[d]
    for d, index_dim in zip(batching, index_batching):
        index_spec[index_dim] = target[d]
        update_spec[scattered_update_dims[index_dims.index(index_dim)]] = target[d]
    operands = [p.to_spec(operand, tuple(target)), p.to_spec(indices, tuple(index_spec)),
                p.to_spec(updates, tuple(update_spec)), *(p.replicated(v) for v in op.operands[3:])]
    p.same_op(op, operands, [tuple(target)])


def _slice_dims(op: Op) -> set:
    (x,) = op.operands
    strides = op.params.get("strides") or (1,) * len(x.type.shape)
    return {d for d, (s, e, st, n) in enumerate(zip(op.params["start_indices"], op.params["limit_indices"],
                                                    strides, x.type.shape)) if (s, e, st) != (0, n, 1)}


def _flash_attention_rule(p: Partitioner, op: Op) -> None:
    """``flash_attention`` (B, T, N, H): batch and heads stay split (heads only
    when the mesh axis also divides the K/V heads); masks, biases and
    lengths follow; the op runs on each device's heads."""
    if op.regions:  # a recognised pattern: its body partitions like any program
        return _region_rule(p, op)
    q, k = op.operands[0], op.operands[1]
    for v in op.operands:
        p.resolve(v)
    b, _, n, _ = p.spec[q]
    n_kv = n if n is None or k.type.shape[2] % p.mesh[n] == 0 else _kv_heads_split(p, n, k.type.shape[2])
    if n is not None and (n_kv is None or q.type.shape[2] % p.mesh[n]):
        n = n_kv = None
    if b is not None and any(v.type.shape[0] % p.mesh[b] for v in op.operands[:3]):
        b = None
    roles = ("query", "key", "value") + tuple(op.params.get("optional_operands", ()))
    operands = []
    for role, v in zip(roles, op.operands):
        shape = v.type.shape
        if role in ("query", "key", "value"):
            spec = (b, None, n if role == "query" else n_kv, None)
        elif role in ("bias", "mask"):
            spec = (b if shape[0] == q.type.shape[0] else None,
                    n if shape[1] == q.type.shape[2] else None) + (None,) * (len(shape) - 2)
        else:  # per-sequence lengths
            spec = (b,)
        operands.append(p.to_spec(v, spec))
    p.same_op(op, operands, [(b, None, n, None)])


def _heads_split(p: Partitioner, n, heads: int, kv_heads: int):
    """(query heads, K/V heads) entries of a split of the query heads over
    ``n``, or (None, None) when it does not divide both (as for ``flash_attention``)."""
    if n is None:
        return None, None
    n_kv = n if kv_heads % p.mesh[n] == 0 else _kv_heads_split(p, n, kv_heads)
    if n_kv is None or heads % p.mesh[n]:
        return None, None
    return n, n_kv


def _paged_attention_rule(p: Partitioner, op: Op) -> None:
    """``paged_attention`` q (N, heads, H), pools (num_blocks, bs, K, H): the
    heads split as ``flash_attention``'s (q's split, else the pools' K/V-head
    split; only when the mesh axes divide both head counts); the query tokens
    N keep a split (seq_ids and positions follow it: each device attends its
    tokens over the whole block tables). Pool blocks, block positions, head
    dims and the block tables are replicated: a pool split by blocks is
    gathered (a sequence's blocks may sit anywhere in the pool), which is
    correct and visible in ``as_text()``."""
    q, k_pool, v_pool, tables, seq_ids, positions = op.operands
    for v in op.operands:
        p.resolve(v)
    heads, kv_heads = q.type.shape[1], k_pool.type.shape[2]
    n, n_kv = _heads_split(p, p.spec[q][1], heads, kv_heads)
    if n is None:  # q's heads whole: the pools' K/V-head split, when q's heads can follow it
        pool_axis = p.spec[k_pool][2]
        if pool_axis is not None and p.spec[v_pool][2] == pool_axis:
            n, n_kv = _heads_split(p, pool_axis, heads, kv_heads)
            if n_kv != pool_axis:
                n = n_kv = None
    t = p.spec[q][0]
    if t is not None and (not p.fits(q.type.shape[0], t) or overlaps(t, (n, n_kv))):
        t = None
    operands = [p.to_spec(q, (t, n, None)), p.to_spec(k_pool, (None, None, n_kv, None)),
                p.to_spec(v_pool, (None, None, n_kv, None)), p.replicated(tables),
                p.to_spec(seq_ids, (t,)), p.to_spec(positions, (t,))]
    p.same_op(op, operands, [(t, n, None)])


def _kv_heads_split(p: Partitioner, n, kv_heads: int):
    """Query heads split over several axes, K/V heads fewer than the devices:
    the major axes that give each device exactly one K/V head (the one its
    query heads read, GQA), or None."""
    axes = spec_axes(n)
    for j in range(1, len(axes)):
        if p.mesh[axes[:j]] == kv_heads:
            return spec_entry(axes[:j])
    return None


def _norm_rule(p: Partitioner, op: Op) -> None:
    """``rms_norm`` / ``layer_norm`` normalise the last dim: it is gathered,
    the other dims keep their split; weights and biases are replicated."""
    x = op.operands[0]
    spec = p.spec[x][:-1] + (None,)
    operands = [p.to_spec(x, spec)] + [p.replicated(v) for v in op.operands[1:]]
    p.same_op(op, operands, [spec])


def _swiglu_rule(p: Partitioner, op: Op) -> None:
    """``swiglu``: column parallel, the FFN width of both weights split alike
    (no communication); x's rows keep their split."""
    x, w_gate, w_up = op.operands
    f = p.spec[w_gate][1] or p.spec[w_up][1]
    spec = p.spec[x][:-1] + (None,)
    if overlaps(f, spec):
        f = None
    operands = [p.to_spec(x, spec), p.to_spec(w_gate, (None, f)), p.to_spec(w_up, (None, f))]
    p.same_op(op, operands, [spec[:-1] + (f,)])


def _sharding_constraint_rule(p: Partitioner, op: Op) -> None:
    (x,), (result,) = op.operands, op.results
    target = normalize_spec(op.attrs["spec"], len(x.type.shape))
    p.bind(result, p.to_spec(x, target), p.spec[x])


def _shard_map_rule(p: Partitioner, op: Op) -> None:
    body = op.regions["body"]
    if dict(op.attrs["mesh"]) != p.mesh:
        raise ValueError(f"a shard_map over mesh {op.attrs['mesh']} inside a program partitioned over "
                         f"{p.mesh}: use one mesh")
    for x, param, pspec in zip(op.operands, body.params, op.attrs["in_specs"]):
        lx = p.to_spec(x, normalize_spec(pspec, len(x.type.shape)))
        p.bind(param, lx, (None,) * len(param.type.shape))
    rename = {param: p.local[param] for param in body.params}
    for body_op in body.ops:  # already per-device: copied, reading the resharded operands
        p.ops.append(dataclasses.replace(body_op, operands=[rename.get(v, v) for v in body_op.operands]))
        for r in body_op.results:
            p.bind(r, r, (None,) * len(r.type.shape))
    for result, out, pspec in zip(op.results, body.outputs, op.attrs["out_specs"]):
        p.bind(result, rename.get(out, p.local.get(out, out)), normalize_spec(pspec, len(result.type.shape)))


def _replicated_rule(p: Partitioner, op: Op) -> None:
    """The fallback: every operand replicated, the op runs whole on every device."""
    if not op.regions:
        return p.run_replicated(op)
    for v in op.operands:
        p.replicated(v)
    _region_rule(p, op)


# ------------------------------------------------------------ regions

def _partition_function(outer: Partitioner, module: Module, in_specs: list[Spec],
                        out_specs: list[Spec | None] | None) -> tuple[Module, list[Spec]]:
    """The per-device version of ``module`` (a program or a region, with the
    mesh and policy of ``outer``) and the specs of its outputs; ``out_specs``
    entries of None leave an output as it comes."""
    inner = Partitioner(outer.mesh, outer.precision, outer.rule_for)
    params = []
    for v, s in zip(module.params, in_specs, strict=True):
        local = Value(inner.local_type(v.type, s))
        inner.bind(v, local, s)
        params.append(local)
    inner.run_ops(module.ops)
    outs, final = [], []
    for i, v in enumerate(module.outputs):
        want = out_specs[i] if out_specs is not None else None
        inner.resolve(v, want)
        outs.append(inner.to_spec(v, want) if want is not None else inner.local[v])
        final.append(want if want is not None else inner.spec[v])
    return Module(module.name, params, inner.ops, outs), final


def _region_rule(p: Partitioner, op: Op) -> None:
    for v in op.operands:
        p.resolve(v)
    specs = [p.spec[v] for v in op.operands]
    regions, result_specs = {}, None
    if op.kind == "scan":
        n_consts, n_carry = op.params["num_consts"], op.params["num_carry"]
        xs = op.operands[n_consts + n_carry:]
        for v in xs:  # the scanned dim is never split
            p.to_spec(v, (None,) + p.spec[v][1:])
        specs = [p.spec[v] for v in op.operands]
        carry = specs[n_consts:n_consts + n_carry]
        body_specs = specs[:n_consts + n_carry] + [s[1:] for s in specs[n_consts + n_carry:]]
        n_ys = len(op.results) - n_carry
        body, outs = _partition_function(p, op.regions["body"], body_specs, list(carry) + [None] * n_ys)
        regions["body"] = body
        result_specs = list(carry) + [(None,) + s for s in outs[n_carry:]]
    elif op.kind == "while":
        n_cond, n_body = op.params["cond_nconsts"], op.params["body_nconsts"]
        carry = specs[n_cond + n_body:]
        cond, _ = _partition_function(p, op.regions["cond"], specs[:n_cond] + carry, [()])
        body, _ = _partition_function(p, op.regions["body"], specs[n_cond:n_cond + n_body] + carry, carry)
        regions = {"cond": cond, "body": body}
        result_specs = carry
    elif op.kind == "cond":
        p.to_spec(op.operands[0], ())
        names = sorted(op.regions, key=lambda n: int(n.removeprefix("branch")))
        first, result_specs = _partition_function(p, op.regions[names[0]], specs[1:], None)
        regions[names[0]] = first
        for n in names[1:]:
            regions[n], _ = _partition_function(p, op.regions[n], specs[1:], result_specs)
    else:  # an op computed by its body (a recognised pattern): run it whole
        operands = [p.replicated(v) for v in op.operands]
        p.same_op(op, operands, [(None,) * len(r.type.shape) for r in op.results])
        return
    operands = [p.local[v] for v in op.operands]
    types = [p.local_type(r.type, s) for r, s in zip(op.results, result_specs)]
    results = p.emit(op.kind, operands, types, dict(op.attrs), regions)
    for r, lr, s in zip(op.results, results, result_specs):
        p.bind(r, lr, s)


RULES_BY_CATEGORY: dict[str, Callable[[Partitioner, Op], None]] = {
    "elementwise": _elementwise_rule,
    "transcendental": _elementwise_rule,
    "reduction": _reduction_rule,
    "contraction": _dot_general_rule,
    "constant": lambda p, op: [p.bind(r, r, (None,) * len(r.type.shape)) for r in op.results]
    and p.ops.append(op),
}

RULES_BY_KIND: dict[str, Callable[[Partitioner, Op], None]] = {
    "broadcast_in_dim": _broadcast_rule,
    "transpose": _transpose_rule,
    "reshape": _reshape_rule,
    "squeeze": _squeeze_rule,
    "stop_gradient": _elementwise_rule,
    "sharding_constraint": _sharding_constraint_rule,
    "shard_map": _shard_map_rule,
    "slice": _along_dims_rule(_slice_dims, ("limit_indices",)),
    "concatenate": _along_dims_rule(lambda op: {op.params["dimension"]}),
    "pad": _along_dims_rule(lambda op: {d for d, c in enumerate(op.params["padding_config"])
                                        if tuple(c) != (0, 0, 0)}),
    "rev": _along_dims_rule(lambda op: set(op.params["dimensions"])),
    "sort": _along_dims_rule(lambda op: {op.params["dimension"]}),
    "dynamic_slice": _along_dims_rule(
        lambda op: {d for d, (n, k) in enumerate(zip(op.operands[0].type.shape, op.params["slice_sizes"]))
                    if n != k}, ("slice_sizes",)),
    "dynamic_update_slice": _along_dims_rule(
        lambda op: {d for d, (n, k) in enumerate(zip(op.operands[0].type.shape, op.operands[1].type.shape))
                    if n != k}),
    "flash_attention": _flash_attention_rule,
    "paged_attention": _paged_attention_rule,
    **{k: _scatter_rule for k in ("scatter", "scatter-add", "scatter-sub", "scatter-mul",
                                  "scatter-min", "scatter-max")},
    "rms_norm": _norm_rule,
    "layer_norm": _norm_rule,
    "swiglu": _swiglu_rule,
    "split": _along_dims_rule(lambda op: {op.params["axis"]}),
    **{k: _along_dims_rule(lambda op: {op.params["axis"]}) for k in
       ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
    **{k: _region_rule for k in REGION_KINDS},
}


def _constant_rule(p: Partitioner, op: Op) -> None:
    p.ops.append(op)
    for r in op.results:
        p.bind(r, r, (None,) * len(r.type.shape))


RULES_BY_CATEGORY["constant"] = _constant_rule

# Rules for the accelerated ops that need more than a placement (index
# arithmetic, dispatch collectives) live in their own modules.
RULES_BY_KIND.update(partition_embedding.RULES)
RULES_BY_KIND.update(partition_moe.RULES)


def rule_for(op: Op) -> Callable[[Partitioner, Op], None]:
    """The rule that partitions ``op``: by kind, by category, else replicated."""
    return (RULES_BY_KIND.get(op.kind) or RULES_BY_CATEGORY.get(KIND_CATEGORY.get(op.kind, ""))
            or _replicated_rule)


def partition(module: Module, mesh: dict[str, int], in_specs: list[Spec],
              out_specs: list[Spec | None] | None = None, precision=None,
              scale_out_axes=()) -> Module:
    """The per-device module of ``module`` over ``mesh``; ``precision`` is the
    policy the precision pass will apply (see ``Partitioner``);
    ``scale_out_axes`` the mesh axes whose collectives cross scale-up domains."""
    result, final = _partition_function(Partitioner(mesh, precision, rule_for), module,
                                        list(in_specs), out_specs)
    layout = SpmdLayout(tuple(mesh.items()), tuple(tuple(s) for s in in_specs), tuple(final))
    result = dataclasses.replace(result, layout=layout)
    collectives.set_groups(result, mesh, scale_out_axes)
    return result


def contains_shard_map(module: Module) -> dict[str, int] | None:
    for op in module.ops:
        if op.kind == "shard_map":
            return dict(op.attrs["mesh"])
    return None


def run(module: Module, ctx) -> Module:
    mesh = getattr(ctx, "mesh", None) or contains_shard_map(module)
    if not mesh:
        return module
    in_specs = getattr(ctx, "in_specs", None) or [(None,) * len(v.type.shape) for v in module.params]
    return partition(module, dict(mesh), list(in_specs), getattr(ctx, "out_specs", None),
                     getattr(ctx, "precision", None), getattr(ctx, "scale_out_axes", ()))
