"""Attention pattern pass: attention written in plain jnp becomes one
``flash_attention`` op.

What is matched (after canonicalize), anchored on two ``dot_general``s that
both have batch dimensions (batch, heads):

    scores = dot_general(q, k)                                 # "QK"
    ... scale (mul/div), bias (add), mask (select_n), converts,
    ... softmax: [reduce_max, max, stop_gradient,] sub, exp, reduce_sum, div
    out = dot_general(probs, v) or dot_general(v, probs)       # "PV"
    ... then layout ops of the output (transpose, reshape)

The *main path* is every op on a path from QK to PV; it may contain only
elementwise arithmetic, converts, layout ops, the two reductions and exactly
one ``exp`` (``MAIN_KINDS``), and must hold the softmax's ``exp``,
``reduce_sum`` and ``div`` over an axis of length S (the contraction of PV and
the free dimension of k in QK). This covers the quickstart/benchmark
``attention`` (both einsum layouts), ``jax.nn.dot_product_attention``'s own
XLA jaxpr (grouped heads, bias, mask, causal, windows, sequence lengths),
bfloat16 softmaxes with their converts, and GQA written with
``jnp.repeat``/broadcasts of k and v.

The matched ops move unchanged into the ``body`` region of one op of kind
``flash_attention``, so host numerics stay bit for bit those of ``jax.jit``
(the executor runs the body). Values the body reads from outside are pulled
in by *cloning* their producers when they are cheap to regenerate in the
kernel: layout ops of q, k and v (head reshapes, the GQA repeat of k/v),
constants and index arithmetic building masks (iota, compares, logical ops,
integer arithmetic), broadcasts of fill values. The originals stay for any
other reader (dead ones are removed). Whatever remains outside - q, k, v,
a bias, a mask or lengths given as arguments - becomes an operand; the op's
one result is the attention output.

A program is left alone when any intermediate of the main path (scores,
probabilities, ...) is read outside it or is a program output (the user also
returns the attention weights, say), when the ops between the matmuls are
anything else (a second exp, a tanh soft-cap, a matmul), or when the
matmuls have no batch dimensions.

The op's attributes describe the attention, for ``as_text()`` and the cost
rule (``runtime.accelerated.attention``): ``batch``, ``q_len``, ``kv_len``,
``heads``, ``kv_heads``, ``head_dim`` (``value_dim`` when it differs),
``dtype`` (the query's), ``mask`` ("causal", "constant" or "operand" when a
select_n masks the scores), ``visible`` (the fraction of scores a constant
mask keeps: the mask is evaluated at compile time in slabs of rows, never
whole; beyond ``MASK_SAMPLE_SLABS`` slabs, evenly spaced slabs are sampled,
and a mask whose samples all match jax's causal mask gets the exact causal
fraction), ``bias`` (an additive operand), and ``q_block`` (query rows per
block of a software FlashAttention on the compile's chip, see
``query_block_rows``). The split of the QK batch dimensions into batch and
heads assumes they come in that order; when the QK batch dimensions are not
two, the attention is described as ``batch=1`` and ``heads`` = the product
of the batch dimensions, which gives the same counts.

Ops of the ``flash_attention`` and ``paged_attention`` primitives get their
``q_block`` here too.
"""

from __future__ import annotations

import math
import dataclasses
from typing import Iterable

import jax
import numpy as np

from lowering.ir import Module, Op, Value
from lowering.op_kinds import KIND_CATEGORY
from lowering.passes import dce
from lowering.passes.tiling import ACCUMULATOR_BYTES, DPE_NATIVE_TILE
from lowering.regions import REGION_KINDS

# ------------------------------------------------------------ query blocks

# Assumption: a software FlashAttention streams K and V through a PE in
# tiles of the Dot Product Engine's native 32 rows (``tiling.DPE_NATIVE_TILE``).
KV_TILE_ROWS = DPE_NATIVE_TILE
# running max and running sum per query row, float32
ROW_STATS_BYTES = 2 * ACCUMULATOR_BYTES


def query_block_rows(chip, head_dim: int, value_dim: int, itemsize: int) -> int:
    """Query rows one PE holds while K and V stream past it: the Q tile
    (``itemsize`` per element), the float32 output accumulator, the running
    max and sum and a float32 score row against one K/V tile per query row,
    next to double-buffered K and V tiles of ``KV_TILE_ROWS`` rows, all in the
    PE's local memory (``chip.pe_local_bytes``). Rounded down to a multiple of
    ``KV_TILE_ROWS`` when at least that many fit."""
    kv_tiles = 2 * KV_TILE_ROWS * (head_dim + value_dim) * itemsize
    per_row = (head_dim * itemsize + value_dim * ACCUMULATOR_BYTES + ROW_STATS_BYTES
               + KV_TILE_ROWS * ACCUMULATOR_BYTES)
    rows = (chip.pe_local_bytes - kv_tiles) // per_row
    if rows >= KV_TILE_ROWS:
        rows = rows // KV_TILE_ROWS * KV_TILE_ROWS
    return max(int(rows), 1)


# ------------------------------------------------------------ op classes

LAYOUT_KINDS = frozenset({"reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims"})

# ops allowed on the main path between the two matmuls
MAIN_KINDS = LAYOUT_KINDS | frozenset({
    "mul", "div", "add", "sub", "max", "select_n", "reduce_max", "reduce_sum", "exp",
    "convert_element_type", "stop_gradient", "is_finite",
})

# index arithmetic that builds masks: cloned into the body when its result is
# an integer or a boolean
INDEX_KINDS = frozenset({
    "add", "sub", "mul", "max", "min", "rem", "select_n", "convert_element_type", "and", "or",
    "not", "xor", "eq", "ne", "lt", "le", "gt", "ge",
})

# cloned whatever their dtype: no arithmetic
FREE_KINDS = LAYOUT_KINDS | frozenset({"constant", "iota", "stop_gradient"})

MAX_CLONED_OPS = 256             # per match: a bigger side computation stays outside
MAX_WALKED_OPS = 4096            # backward walk from a candidate PV matmul
MASK_SAMPLE_ELEMENTS = 1 << 20  # elements of a constant mask evaluated per slab
MASK_SAMPLE_SLABS = 16          # slabs evaluated of a mask bigger than one slab


def _is_index(value: Value) -> bool:
    dtype = value.type.dtype
    return isinstance(dtype, np.dtype) and (dtype == np.bool_ or np.issubdtype(dtype, np.integer))


def _size(shape: Iterable[int]) -> int:
    return math.prod(shape)


# ------------------------------------------------------------ the graph

class _Graph:
    """Producers, readers and positions of the values of one module."""

    def __init__(self, module: Module):
        self.module = module
        self.index = {id(op): i for i, op in enumerate(module.ops)}
        self.producer: dict[Value, Op] = {}
        self.users: dict[Value, list[Op]] = {}
        for op in module.ops:
            for r in op.results:
                self.producer[r] = op
            for v in op.operands:
                self.users.setdefault(v, []).append(op)
        self.outputs = set(module.outputs)
        self.mask_stats: dict = {}  # (mask value, polarity) -> _mask_stats, shared by layers

    def pos(self, op: Op) -> int:
        return self.index[id(op)]


@dataclasses.dataclass
class _Match:
    moved: list[Op]            # original ops, in program order
    body: Module
    operands: list[Value]
    output: Value
    attrs: dict


class _Cloner:
    """Copies the cheap producers of values the body reads into the body."""

    def __init__(self, graph: _Graph, inside: set):
        self.graph = graph
        self.inside = inside  # ids of the ops moved into this or an earlier match's body
        self.copies: dict[Value, Value] = {}
        self.ops: list[Op] = []
        self.roots: dict[Value, Value] = {}  # value -> the outside value its layout chain reads

    def pull(self, value: Value, layout_only: bool) -> Value:
        """``value`` as the body sees it: a clone, or the outside value itself."""
        if value in self.copies:
            return self.copies[value]
        op = self.graph.producer.get(value)
        if op is None or id(op) in self.inside or len(self.ops) >= MAX_CLONED_OPS:
            return value
        allowed = op.kind in FREE_KINDS or (
            not layout_only and op.kind in INDEX_KINDS and all(_is_index(r) for r in op.results)) or (
            # scalar side computations, such as the 1 / sqrt(head_dim) scale
            not layout_only and op.primitive is not None and all(r.type.size == 1 for r in op.results))
        if not allowed or op.regions or len(op.results) != 1:
            return value
        if layout_only and op.kind not in LAYOUT_KINDS | {"constant"}:
            return value
        operands = [self.pull(v, layout_only) for v in op.operands]
        result = Value(op.results[0].type)
        self.ops.append(dataclasses.replace(op, operands=operands, results=[result]))
        self.copies[value] = result
        if op.operands:
            self.roots[value] = self.roots.get(op.operands[0], op.operands[0])
        return result

    def root(self, value: Value) -> Value:
        """The outside value a (cloned) layout chain of ``value`` starts from."""
        return self.roots.get(value, value)


# ------------------------------------------------------------ matching

def _dot_dims(op: Op):
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    return tuple(lc), tuple(rc), tuple(lb), tuple(rb)


def _free(shape, contract, batch) -> list[int]:
    return [shape[d] for d in range(len(shape)) if d not in contract and d not in batch]


def _reduced_size(op: Op) -> int:
    shape = op.operands[0].type.shape
    return _size(shape[a] for a in op.params["axes"])


def _backward(graph: _Graph, start: Value, stop: int) -> tuple[list[Op], list[Op]]:
    """Ops reachable backwards from ``start`` through ``MAIN_KINDS`` (positions
    before ``stop``), and the dot_generals where the walk stopped."""
    seen: dict[int, Op] = {}
    dots: dict[int, Op] = {}
    stack = [start]
    while stack and len(seen) < MAX_WALKED_OPS:
        op = graph.producer.get(stack.pop())
        if op is None or id(op) in seen or graph.pos(op) >= stop or op.regions:
            continue
        if op.kind == "dot_general":
            dots[id(op)] = op
            seen[id(op)] = op
        elif op.kind in MAIN_KINDS:
            seen[id(op)] = op
            stack.extend(op.operands)
    return sorted(seen.values(), key=graph.pos), sorted(dots.values(), key=graph.pos)


def _main_path(graph: _Graph, back: list[Op], qk: Op) -> list[Op]:
    """The ops of ``back`` that read (transitively) the result of ``qk``."""
    reached = {qk.results[0]}
    path = [qk]
    for op in back:
        if graph.pos(op) > graph.pos(qk) and any(v in reached for v in op.operands):
            path.append(op)
            reached.update(op.results)
    return path


def _exclusive(graph: _Graph, ops: list[Op], allowed: set) -> bool:
    """Every result of ``ops`` is read only by ops in ``allowed`` (ids) and is
    not a program output."""
    for op in ops:
        for r in op.results:
            if r in graph.outputs or any(id(u) not in allowed for u in graph.users.get(r, ())):
                return False
    return True


def _match_at(graph: _Graph, pv: Op, probs_index: int, chip, taken: set) -> _Match | None:
    probs = pv.operands[probs_index]
    lc, rc, lb, rb = _dot_dims(pv)
    probs_contract, probs_batch = (lc, lb) if probs_index == 0 else (rc, rb)
    if not probs_batch:
        return None
    kv_len = _size(probs.type.shape[d] for d in probs_contract)
    back, dots = _backward(graph, probs, graph.pos(pv))
    if not any(op.kind == "exp" for op in back):
        return None
    for qk in reversed(dots):
        path = _main_path(graph, back, qk)
        if graph.producer.get(probs) not in path:
            continue
        found = _validated(graph, pv, qk, path, kv_len)
        if found is not None:
            return _build(graph, pv, probs_index, qk, path, kv_len, found, chip, taken)
    return None


def _validated(graph: _Graph, pv: Op, qk: Op, path: list[Op], kv_len: int):
    """The index of q among QK's operands if ``path`` is an attention's
    softmax between QK and PV over an axis of length ``kv_len``, else None."""
    kinds = [op.kind for op in path[1:]]
    if kinds.count("exp") != 1 or "reduce_sum" not in kinds or "div" not in kinds:
        return None
    if any(k not in MAIN_KINDS for k in kinds):
        return None
    if any(_reduced_size(op) != kv_len for op in path if op.kind in ("reduce_sum", "reduce_max")):
        return None
    if not _exclusive(graph, path, {id(op) for op in path} | {id(pv)}):
        return None
    lc, rc, lb, rb = _dot_dims(qk)
    if not lb:
        return None
    lhs, rhs = (o.type.shape for o in qk.operands)
    if _size(_free(rhs, rc, rb)) == kv_len:
        return 0
    if _size(_free(lhs, lc, lb)) == kv_len:
        return 1
    return None


def _trailing(graph: _Graph, pv: Op) -> list[Op]:
    """Layout ops that only rearrange the attention output."""
    ops = []
    value = pv.results[0]
    while value not in graph.outputs:
        users = graph.users.get(value, [])
        if len(users) != 1 or users[0].kind not in LAYOUT_KINDS:
            break
        ops.append(users[0])
        value = users[0].results[0]
    return ops


def _build(graph: _Graph, pv: Op, probs_index: int, qk: Op, path: list[Op], kv_len: int,
           q_index: int, chip, taken: set) -> _Match:
    moved = sorted([*path, pv, *_trailing(graph, pv)], key=graph.pos)
    produced = {r for op in moved for r in op.results}
    cloner = _Cloner(graph, {id(op) for op in moved} | taken)
    q, k = qk.operands[q_index], qk.operands[1 - q_index]
    v = pv.operands[1 - probs_index]
    for value in (q, k, v):  # layout chains of q, k, v (head reshapes, GQA repeats)
        cloner.pull(value, layout_only=True)
    body_ops = []
    for op in moved:
        operands = [x if x in produced else cloner.pull(x, layout_only=op not in path[1:])
                    for x in op.operands]
        body_ops.append(dataclasses.replace(op, operands=operands))
    body_ops = cloner.ops + body_ops
    defined = {r for op in body_ops for r in op.results}
    external = list(dict.fromkeys(x for op in body_ops for x in op.operands if x not in defined))
    first = [cloner.root(x) for x in (q, k, v)]  # q, k, v lead, then masks, biases, lengths
    operands = list(dict.fromkeys([x for x in first if x in external] + external))
    output = moved[-1].results[0]
    body = Module("flash_attention_body", operands, body_ops, [output])
    attrs = _describe(graph, qk, q_index, pv, path, kv_len, cloner.root(k), chip)
    return _Match(moved, body, operands, output, attrs)


# ------------------------------------------------------------ attributes

def _describe(graph: _Graph, qk: Op, q_index: int, pv: Op, path: list[Op], kv_len: int,
              k_root: Value, chip) -> dict:
    lc, rc, lb, rb = _dot_dims(qk)
    q_shape = qk.operands[q_index].type.shape
    q_contract, q_batch = (lc, lb) if q_index == 0 else (rc, rb)
    head_dim = _size(q_shape[d] for d in q_contract)
    scores = qk.results[0].type.size
    rows = scores // kv_len                                  # B * N * T
    value_dim = pv.results[0].type.size // max(rows, 1)
    batch_sizes = [q_shape[d] for d in q_batch]
    q_free = _free(q_shape, q_contract, q_batch)
    if len(batch_sizes) == 2 and len(q_free) in (1, 2):
        batch, groups = batch_sizes
        q_len = q_free[0]
        heads = groups * (q_free[1] if len(q_free) == 2 else 1)
        per_head = batch * kv_len * head_dim
        kv_heads = k_root.type.size // per_head if k_root.type.size % per_head == 0 else groups
        if kv_heads < 1 or heads % kv_heads:
            kv_heads = groups
    else:  # batch and heads cannot be told apart: one batch of independent heads
        batch, heads = 1, _size(batch_sizes)
        kv_heads, q_len = heads, _size(q_free)
    dtype = np.dtype(qk.operands[q_index].type.dtype)
    attrs = {"pattern": "jnp attention", "batch": batch, "q_len": q_len, "kv_len": kv_len,
             "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}
    if value_dim != head_dim:
        attrs["value_dim"] = value_dim
    attrs["dtype"] = dtype.name
    attrs.update(_mask_attrs(graph, path, q_len, kv_len))
    if chip is not None:
        attrs["q_block"] = query_block_rows(chip, head_dim, value_dim, dtype.itemsize)
    return attrs


def _constant_cone(graph: _Graph, value: Value) -> list[Value] | None:
    """The values ``value`` is computed from, if they all derive from
    constants alone (no argument, no region op, at most ``MAX_CLONED_OPS``)."""
    cone: dict[Value, None] = {}
    stack = [value]
    while stack:
        v = stack.pop()
        if v in cone:
            continue
        op = graph.producer.get(v)
        if op is None or op.regions or len(cone) >= MAX_CLONED_OPS:
            return None
        if op.kind != "constant" and op.primitive is None:
            return None  # per-device ops (axis_index, shard_slice) have no value out of context
        cone[v] = None
        stack.extend(op.operands)
    return list(cone)


def _is_true_scalar(graph: _Graph, value: Value) -> bool:
    op = graph.producer.get(value)
    return (op is not None and op.kind == "constant" and value.type.size == 1
            and np.asarray(op.attrs["value"]).dtype == np.bool_ and bool(op.attrs["value"]))


def _strip(graph: _Graph, value: Value) -> Value:
    """A value with the same fraction of True as the boolean ``value``:
    broadcasts, layout ops and ``and`` with an all-True scalar removed."""
    op = graph.producer.get(value)
    if op is None:
        return value
    if op.kind in LAYOUT_KINDS or op.kind == "stop_gradient":
        return _strip(graph, op.operands[0])
    if op.kind == "and":
        a, b = (_strip(graph, x) for x in op.operands)
        if _is_true_scalar(graph, a):
            return b
        if _is_true_scalar(graph, b):
            return a
    return value


# Mask arithmetic evaluated with NumPy (exact for the integer and boolean ops
# masks are built from); anything else binds its primitive, which compiles it.
_NUMPY_OPS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum, "min": np.minimum,
    "neg": np.negative, "abs": np.abs, "eq": np.equal, "ne": np.not_equal, "lt": np.less,
    "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal, "and": np.logical_and,
    "or": np.logical_or, "not": np.logical_not,
}


def _iota(op: Op, args: list) -> np.ndarray:
    shape, dim = op.params["shape"], op.params["dimension"]
    ramp = np.arange(shape[dim]).reshape([-1 if d == dim else 1 for d in range(len(shape))])
    return np.broadcast_to(ramp, shape)


def _broadcast_in_dim(op: Op, args: list) -> np.ndarray:
    shape, dims = op.params["shape"], op.params["broadcast_dimensions"]
    expanded = [1] * len(shape)
    for axis, d in enumerate(dims):
        expanded[d] = np.shape(args[0])[axis]
    return np.broadcast_to(np.reshape(args[0], expanded), shape)


def _transposed(x, permutation):
    # reshape[dimensions=p] reshapes its operand transposed by p (None: as it is)
    return x if permutation is None else np.transpose(x, permutation)


# layout ops and iota, exact in NumPy for any dtype (no XLA compile for a mask)
_NUMPY_LAYOUT = {
    "iota": _iota,
    "broadcast_in_dim": _broadcast_in_dim,
    "reshape": lambda op, args: np.reshape(_transposed(args[0], op.params["dimensions"]),
                                           op.params["new_sizes"]),
    "transpose": lambda op, args: np.transpose(args[0], op.params["permutation"]),
    "squeeze": lambda op, args: np.squeeze(args[0], tuple(op.params["dimensions"])),
}


def _apply(op: Op, args: list) -> np.ndarray:
    """``op`` on constant operands."""
    exact = all(np.asarray(a).dtype.kind in "biu" for a in args)
    result_dtype = op.results[0].type.dtype
    if op.kind in _NUMPY_LAYOUT:
        return np.asarray(_NUMPY_LAYOUT[op.kind](op, args)).astype(result_dtype)
    if op.kind in _NUMPY_OPS and exact:
        if op.kind in ("and", "or", "not") and np.dtype(result_dtype).kind != "b":
            pass  # bitwise on integers: let XLA do it
        else:
            return np.asarray(_NUMPY_OPS[op.kind](*args)).astype(result_dtype)
    if op.kind == "select_n":
        which, *cases = args
        return np.asarray(np.choose(np.asarray(which).astype(np.int32), cases)).astype(result_dtype)
    if op.kind == "convert_element_type" and exact:
        return np.asarray(args[0]).astype(op.params["new_dtype"])
    with jax.ensure_compile_time_eval():
        out = op.primitive.bind(*args, **op.params)
    return np.asarray(out[0] if op.primitive.multiple_results else out)


def _evaluate(graph: _Graph, value: Value, memo: dict) -> np.ndarray:
    """A value computed from constants alone, evaluated whole."""
    if value in memo:
        return memo[value]
    op = graph.producer[value]
    if op.kind == "constant":
        out = np.asarray(op.attrs["value"])
    else:
        args = [_evaluate(graph, x, memo) for x in op.operands]
        if op.primitive.multiple_results:
            with jax.ensure_compile_time_eval():
                out = np.asarray(op.primitive.bind(*args, **op.params)[op.results.index(value)])
        else:
            out = _apply(op, args)
    memo[value] = out
    return out


def _slab(graph: _Graph, value: Value, axis: int, start: int, stop: int,
          memo: dict) -> np.ndarray | None:
    """Elements ``start:stop`` along ``axis`` of a constant-cone value (whole
    if that axis has size 1), computed from the same slab of its operands;
    None if its cone holds an op that does not slice that way."""
    key = (value, axis)
    if key in memo:
        return memo[key]
    op = graph.producer[value]
    shape = value.type.shape
    sliced = len(shape) > axis and shape[axis] != 1
    local = list(shape)
    if sliced:
        local[axis] = stop - start

    def cut(whole: np.ndarray) -> np.ndarray:
        return np.take(whole, np.arange(start, stop), axis=axis) if sliced else whole

    if value.type.size <= MASK_SAMPLE_ELEMENTS:
        out = cut(_evaluate(graph, value, {}))  # a small piece: scalars, position vectors
    elif op.kind == "constant":
        out = cut(np.asarray(op.attrs["value"]))
    elif op.kind == "iota":
        dim = op.params["dimension"]
        index = np.arange(start, stop) if dim == axis else np.arange(shape[dim])
        along = [1] * len(shape)
        along[dim] = index.size
        out = np.broadcast_to(index.reshape(along), local).astype(op.params["dtype"])
    elif op.kind == "broadcast_in_dim":
        dims = op.params["broadcast_dimensions"]
        operand = op.operands[0]
        if axis in dims:
            piece = _slab(graph, operand, dims.index(axis), start, stop, memo)
        elif operand.type.size <= MASK_SAMPLE_ELEMENTS:
            piece = _evaluate(graph, operand, {})
        else:
            piece = None
        if piece is None:
            return None
        along = [1] * len(shape)
        for src, dst in enumerate(dims):
            along[dst] = piece.shape[src]
        out = np.broadcast_to(piece.reshape(along), local)
    elif KIND_CATEGORY.get(op.kind) == "elementwise" and op.primitive is not None:
        args = [_slab(graph, x, axis, start, stop, memo) for x in op.operands]
        if any(a is None for a in args):
            return None
        out = _apply(op, args)
    else:
        out = None
    memo[key] = out
    return out


def _tril_slab(shape: tuple, rows_cols: tuple[int, int], axis: int, start: int, stop: int):
    """The slab of jax's causal mask (key <= query) laid out in ``shape``,
    with queries along ``rows_cols[0]`` and keys along ``rows_cols[1]``."""
    def index(dim):
        idx = np.arange(start, stop) if dim == axis else np.arange(shape[dim])
        along = [1] * len(shape)
        along[dim] = idx.size
        return idx.reshape(along)
    rows, cols = rows_cols
    return index(rows) >= index(cols)


def _mask_stats(graph: _Graph, predicate: Value, keeps_when_true: bool, q_len: int,
                kv_len: int) -> tuple[float, bool] | None:
    """(fraction of scores kept, whether the mask is jax's causal mask) for a
    constant mask. Evaluated in slabs along its longest axis; a mask of more
    than ``MASK_SAMPLE_ELEMENTS`` is sampled at ``MASK_SAMPLE_SLABS`` evenly
    spaced slabs (the fraction is then an estimate, unless the samples are
    all causal, whose fraction is known exactly). None if it cannot be evaluated."""
    shape = predicate.type.shape
    if not shape:
        keep = bool(_evaluate(graph, predicate, {})) == keeps_when_true
        return float(keep), False
    axis = int(np.argmax(shape))
    length, size = shape[axis], predicate.type.size
    per = max(1, MASK_SAMPLE_ELEMENTS // max(size // length, 1))
    starts = list(range(0, length, per))
    if len(starts) > MASK_SAMPLE_SLABS:
        picks = np.unique(np.linspace(0, len(starts) - 1, MASK_SAMPLE_SLABS).round().astype(int))
        starts = [starts[i] for i in picks]
    big = [i for i, d in enumerate(shape) if d != 1][-2:]  # queries, keys: the last two dims
    rows_cols = tuple(big) if [shape[i] for i in big] == [q_len, kv_len] else None
    kept = seen = 0
    causal = rows_cols is not None
    for start in starts:
        stop = min(length, start + per)
        slab = _slab(graph, predicate, axis, start, stop, {})
        if slab is None:
            return None
        keep = slab.astype(bool) if keeps_when_true else ~slab.astype(bool)
        kept += int(keep.sum())
        seen += keep.size
        causal = causal and bool((keep == _tril_slab(shape, rows_cols, axis, start, stop)).all())
    if causal:
        return _causal_fraction(q_len, kv_len), True
    return kept / max(seen, 1), False


def _causal_fraction(q_len: int, kv_len: int) -> float:
    """Fraction of (query t, key s) pairs with s <= t (no row is empty)."""
    t = np.arange(q_len, dtype=np.int64)
    return float(np.minimum(t + 1, kv_len).sum()) / (q_len * kv_len)


def _mask_attrs(graph: _Graph, path: list[Op], q_len: int, kv_len: int) -> dict:
    on_path = {r for op in path for r in op.results}
    attrs: dict = {}
    masks = [op for op in path if op.kind == "select_n" and op.operands[0] not in on_path
             and any(x in on_path for x in op.operands[1:])]
    if any(op.kind == "add" and any(x not in on_path and x.type.size > 1 for x in op.operands)
           for op in path):
        attrs["bias"] = True
    if not masks:
        return attrs
    if len(masks) > 1:
        attrs["mask"] = "operand"
        return attrs
    (select,) = masks
    keeps_when_true = select.operands.index(
        next(x for x in select.operands[1:] if x in on_path)) == 2
    predicate = _strip(graph, select.operands[0])
    if _constant_cone(graph, predicate) is None:
        attrs["mask"] = "operand"
        return attrs
    stats = graph.mask_stats.get((predicate, keeps_when_true))
    if stats is None:
        stats = _mask_stats(graph, predicate, keeps_when_true, q_len, kv_len)
        graph.mask_stats[(predicate, keeps_when_true)] = stats
    attrs["mask"] = "causal" if stats is not None and stats[1] else "constant"
    if stats is not None:  # else: every score is charged
        attrs["visible"] = stats[0]
    return attrs


# ------------------------------------------------------------ rewriting

def _find_matches(graph: _Graph, chip) -> list[_Match]:
    matches = []
    taken: set[int] = set()
    for op in graph.module.ops:
        if op.kind != "dot_general" or id(op) in taken:
            continue
        for probs_index in (0, 1):
            match = _match_at(graph, op, probs_index, chip, taken)
            if match is not None and not any(id(m) in taken for m in match.moved):
                taken.update(id(m) for m in match.moved)
                matches.append(match)
                break
    return matches


# attention primitives whose cost reads the query block of the compile's chip
PRIMITIVE_KINDS = frozenset({"flash_attention", "paged_attention"})


def _annotate_primitive(op: Op, chip) -> Op:
    """A ``flash_attention`` or ``paged_attention`` primitive op with its
    query block on ``chip``."""
    query, _, value = (v.type for v in op.operands[:3])
    block = query_block_rows(chip, query.shape[-1], value.shape[-1],
                             np.dtype(query.dtype).itemsize)
    return dataclasses.replace(op, attrs={**op.attrs, "q_block": block})


def rewrite(module: Module, chip=None) -> Module:
    """``module`` with every recognised jnp attention as one ``flash_attention`` op."""
    ops = []
    for op in module.ops:
        if op.kind in REGION_KINDS:  # control flow: its bodies may hold attentions too
            op = dataclasses.replace(op, regions={k: rewrite(r, chip) for k, r in op.regions.items()})
        elif op.kind in PRIMITIVE_KINDS and op.primitive is not None and chip is not None:
            op = _annotate_primitive(op, chip)
        ops.append(op)
    module = Module(module.name, module.params, ops, module.outputs)
    graph = _Graph(module)
    matches = _find_matches(graph, chip)
    if not matches:
        return module
    removed = {id(op) for m in matches for op in m.moved}
    emit_at = {id(m.moved[-1]): m for m in matches}
    ops = []
    for op in module.ops:
        match = emit_at.get(id(op))
        if match is not None:
            ops.append(Op("flash_attention", match.operands, [match.output], match.attrs,
                          op.source, regions={"body": match.body}))
        elif id(op) not in removed:
            ops.append(op)
    return dce.run(Module(module.name, module.params, ops, module.outputs))


def run(module: Module, ctx=None) -> Module:
    return rewrite(module, getattr(ctx, "chip", None))
