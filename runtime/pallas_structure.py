"""The structure of a Pallas kernel (``pallas_call``): the block traffic its
grid causes and the work its body does, read from the kernel itself.

``analyze(params, in_avals, parallel_units=P)`` takes the params of a
``pallas_call`` jaxpr equation and returns a ``KernelStructure``. It is pure
structure, independent of any chip: counts of grid steps, block transfers,
bytes, FLOPs and operations. A cost model turns them into time.

The model
---------
Grid and parallelism. The grid runs in row-major order (last axis fastest),
as Pallas runs it. Each grid axis is ``"parallel"`` or ``"arbitrary"``
(sequential), read from ``compiler_params.dimension_semantics`` exactly as
Pallas TPU (Mosaic) reads it (``lowering.pallas.dimension_semantics``): the user's semantics cover the user's grid
axes, axes added by ``vmap`` are parallel, ``"core_parallel"`` /
``"subcore_parallel"`` count as parallel and ``"sequential"`` (Mosaic GPU's
spelling) as arbitrary. Without semantics every axis is arbitrary, Pallas
TPU's default: nothing runs in parallel unless the author says it may. The
parallel iterations (the row-major flattening of the parallel axes) are
split into ``parallel_units`` contiguous chunks as equal as possible (the
first chunks one larger); each unit runs the grid points of its chunk in
grid order. ``parallel_units`` beyond the parallel iterations stay idle.

Block traffic. Every operand with a ``BlockSpec`` is pipelined: its index
map is evaluated at every grid point (vectorized, one compiled function for
all maps). An input block is fetched from HBM at the first step a unit runs
and at every step whose block index differs from the previous step's on
that unit (Pallas does not re-fetch an unchanged block). An output block is
written back when its index changes and at the end, so its write-backs are
counted the same way. Bytes moved are the *in-bounds* part of each block: a
partial block at an array edge moves only the elements inside the array
(the DMA is clipped, and the edge is what HBM bandwidth sees); a block's
on-chip footprint is always the full block. ``BoundedSlice`` / ``Indirect``
dimensions move their full block size. Operands in ``pl.ANY`` / HBM memory
space are not pipelined: the kernel moves them itself (manual DMA is not
counted) and they take no block buffer.

Index maps that read scalar-prefetch operands depend on data. With the
operands' values (``index_operands=``) they are evaluated exactly; without,
such a block is counted as transferred at every step (an upper bound) and a
note says so.

On-chip memory. ``block_set_bytes`` = sum over pipelined operands of
buffers x block bytes (2 buffers, double buffering, unless the spec says
``pipeline_mode=pl.Buffered(n)``) + the scratch operands' bytes
(semaphores take none). Scoped allocations (``pl.run_scoped``) are not
counted.

Body work, per grid step, by engine, with the project's primitive grouping
(``lowering.op_kinds``) and its counting conventions (``runtime.op_work``):

- ``matrix_flops``: 2 x M x N x K per ``dot_general`` (output elements x
  contraction length x 2), keyed by the dtype of its left operand.
- ``vector_ops``: one per output element of an elementwise op (including
  ``convert_element_type`` and ``select_n``, i.e. ``jnp.where``), one per
  folded element of a reduction (input elements - output elements), one
  per element of a cumulative op, one per update element of a scatter and
  of a ``ref[...] += x`` update. Scalar index arithmetic (every operand and
  result of rank 0) runs on the scalar unit and is not counted.
- ``transcendentals``: one per output element of exp, log, tanh, logistic,
  sqrt, rsqrt, ... (and ``pl.reciprocal``).
- ``relayout_elements``: one per output element of an in-register data
  movement (broadcast, transpose, iota, slice, concatenate, gather, roll,
  ...). Kept apart from ``vector_ops``: loads and stores of blocks are
  not counted at all; views (reshape, squeeze) are free.

Control flow. A ``scan`` (``lax.fori_loop`` with static bounds) multiplies
its body by its length. A ``while`` in the shape of a ``fori_loop``
(``i < upper``, ``i += 1``) whose bounds are literals or functions of
``pl.program_id`` / ``pl.num_programs`` multiplies its body by its trip
count at each grid step (so a causal loop ``fori_loop(0, program_id(0) + 1,
...)`` is counted exactly). Any other ``while`` (a bound read from memory,
a convergence loop) is counted as one trip, with a note. A ``cond``
(``pl.when``, ``lax.cond``/``switch``) whose predicate is a function of the
grid position takes, at each step, the branch that runs there; otherwise
it counts its larger branch (per counter). So per-step work varies between
steps only through such conds and loops: ``work_per_step`` holds the
maximum of each counter over the grid steps, ``work_total`` the sums and
``unit_work`` the sums over each parallel unit's steps.

A primitive with no rule is counted as one vector operation per output
element, with a note naming it. Units: bytes, FLOPs, operations, elements,
steps: all plain ints.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.state.discharge import discharge_state  # Refs -> values (scalar prefetch)
from jax.extend import core as jcore

from lowering.op_kinds import KIND_CATEGORY
from lowering.pallas import PARALLEL, dimension_semantics

# memory spaces whose operands stay in HBM (the kernel moves them itself)
_UNPIPELINED_SPACES = frozenset({"any", "hbm"})
DEFAULT_BUFFERS = 2  # double buffering: one block computes while the next one moves

# Pallas's own primitives (not in lowering.op_kinds): what each costs
_FREE = frozenset({
    "program_id", "num_programs", "get", "swap", "masked_load", "masked_swap", "multiple_of",
    "max_contiguous", "delay", "trace_value", "debug_print", "debug_callback", "semaphore_read",
    "semaphore_signal", "semaphore_wait", "get_barrier_semaphore", "pin", "unpin",
    "add_dependency", "dma_wait",
})
_PALLAS_RELAYOUT = frozenset({"roll", "broadcast_to", "bitcast", "pack_elementwise",
                              "unpack_elementwise"})
_PALLAS_TRANSCENDENTAL = frozenset({"reciprocal"})


@dataclasses.dataclass(frozen=True)
class BodyWork:
    """Work of the kernel body: per step, in total, or on one parallel unit."""

    matrix_flops_by_dtype: tuple[tuple[str, int], ...] = ()  # (left operand dtype, FLOPs)
    vector_ops: int = 0
    transcendentals: int = 0
    relayout_elements: int = 0

    @property
    def matrix_flops(self) -> int:
        return sum(flops for _, flops in self.matrix_flops_by_dtype)


@dataclasses.dataclass(frozen=True)
class BlockTraffic:
    """One operand of the kernel: its block and how often the block crosses HBM."""

    origin: str                     # Pallas's name for the BlockSpec ("args[0]", "outputs", ...)
    role: str                       # "input" or "output"
    array_shape: tuple[int, ...]
    dtype: str
    block_shape: tuple[int | None, ...]  # None: a squeezed dimension
    block_bytes: int                # the full block (its on-chip footprint)
    buffers: int                    # on-chip copies of the block (0: not pipelined)
    transfers: int                  # fetches (input) or write-backs (output), all units
    hbm_bytes: int                  # in-bounds bytes of those transfers
    unit_transfers: tuple[int, ...]  # per parallel unit
    unit_hbm_bytes: tuple[int, ...]
    data_dependent: bool = False    # index map reads scalar-prefetch values it was not given

    @property
    def fetches(self) -> int:
        return self.transfers if self.role == "input" else 0

    @property
    def write_backs(self) -> int:
        return self.transfers if self.role == "output" else 0


@dataclasses.dataclass(frozen=True)
class KernelStructure:
    """What one ``pallas_call`` asks of the hardware (see the module docstring)."""

    grid: tuple[int, ...]
    dimension_semantics: tuple[str, ...]  # "parallel" / "arbitrary", one per grid axis
    steps: int                 # grid points
    parallel_steps: int        # product of the parallel axes
    sequential_steps: int      # product of the arbitrary axes
    parallel_units: int        # units asked for
    units_used: int            # min(parallel_units, parallel_steps)
    unit_steps: tuple[int, ...]  # grid points each used unit runs
    operands: tuple[BlockTraffic, ...]  # inputs, then outputs, in order
    scratch_bytes: int
    block_set_bytes: int       # on-chip bytes: buffered blocks + scratch
    work_per_step: BodyWork    # maximum of each counter over the steps
    work_total: BodyWork
    unit_work: tuple[BodyWork, ...]
    notes: tuple[str, ...] = ()  # where the analysis assumed something
    # every dot_general of the body, once: (rows, cols, contraction, lhs dtype)
    dots: tuple[tuple[int, int, int, str], ...] = ()

    @property
    def inputs(self) -> tuple[BlockTraffic, ...]:
        return tuple(o for o in self.operands if o.role == "input")

    @property
    def outputs(self) -> tuple[BlockTraffic, ...]:
        return tuple(o for o in self.operands if o.role == "output")

    @property
    def hbm_read_bytes(self) -> int:
        return sum(o.hbm_bytes for o in self.inputs)

    @property
    def hbm_write_bytes(self) -> int:
        return sum(o.hbm_bytes for o in self.outputs)

    @property
    def unit_read_bytes(self) -> tuple[int, ...]:
        return tuple(sum(col) for col in zip(*(o.unit_hbm_bytes for o in self.inputs))) \
            or (0,) * self.units_used

    @property
    def unit_write_bytes(self) -> tuple[int, ...]:
        return tuple(sum(col) for col in zip(*(o.unit_hbm_bytes for o in self.outputs))) \
            or (0,) * self.units_used


def analyze(params: dict, in_avals: Sequence[Any] | None = None, *, parallel_units: int = 1,
            index_operands: Sequence[Any] | None = None) -> KernelStructure:
    """The structure of the ``pallas_call`` whose equation params are ``params``.

    ``in_avals``: the equation's operand avals (dynamic grid bounds, scalar
    prefetch operands, inputs), checked against the block specs.
    ``parallel_units``: the units the parallel grid axes are split over.
    ``index_operands``: the scalar-prefetch operands' values, if known.
    """
    if parallel_units < 1:
        raise ValueError(f"parallel_units must be >= 1, got {parallel_units}")
    gm = params["grid_mapping"]
    if gm.num_dynamic_grid_bounds:
        raise ValueError(f"a Pallas grid with dynamic bounds ({gm.grid}) has no static structure")
    _check_avals(gm, in_avals)
    grid = tuple(int(d) for d in gm.grid)
    semantics = dimension_semantics(params, gm)
    steps = math.prod(grid)
    par_axes = [a for a, s in enumerate(semantics) if s == PARALLEL]
    parallel_steps = math.prod(grid[a] for a in par_axes)
    coords = np.indices(grid, dtype=np.int32).reshape(len(grid), steps)
    units_used = max(1, min(parallel_units, parallel_steps))
    unit = _unit_of_step(coords, grid, par_axes, units_used)
    order = np.argsort(unit, kind="stable")  # each unit's steps, in grid order
    notes: list[str] = []

    block_indices, dependent = _block_indices(gm, coords, index_operands, notes)
    operands = tuple(
        _traffic(bm, i < gm.num_inputs, block_indices[i], dependent[i], unit, order, units_used)
        for i, bm in enumerate(gm.block_mappings))
    scratch_bytes = sum(_aval_bytes(a) for a in gm.scratch_avals)
    block_set_bytes = sum(o.buffers * o.block_bytes for o in operands) + scratch_bytes

    body = _Body(grid, tuple(gm.vmapped_dims), coords, notes)
    work, _ = body.walk(params["jaxpr"], {})
    unit_sums = {k: _unit_sums(v, unit, units_used) for k, v in work.items()}
    unit_work = tuple(_summarize(unit_sums, lambda v, u=u: int(v[u]) if np.ndim(v) else int(v))
                      for u in range(units_used))
    return KernelStructure(
        grid=grid, dimension_semantics=semantics, steps=steps, parallel_steps=parallel_steps,
        sequential_steps=steps // parallel_steps if parallel_steps else 0,
        parallel_units=parallel_units, units_used=units_used,
        unit_steps=tuple(int(n) for n in np.bincount(unit, minlength=units_used)),
        operands=operands, scratch_bytes=scratch_bytes, block_set_bytes=block_set_bytes,
        work_per_step=_summarize(work, lambda v: int(np.max(v, initial=0))),
        work_total=_summarize(work, lambda v: int(np.sum(np.broadcast_to(v, (steps,))))),
        unit_work=unit_work, notes=tuple(dict.fromkeys(notes)), dots=tuple(body.dots.values()))


# ------------------------------------------------------------ grid

def _check_avals(gm, in_avals) -> None:
    if in_avals is None:
        return
    in_avals = list(in_avals)
    expected = gm.num_dynamic_grid_bounds + gm.num_index_operands + gm.num_inputs
    if len(in_avals) != expected:
        raise ValueError(f"pallas_call takes {expected} operands (grid bounds, scalar prefetch, "
                         f"inputs), got {len(in_avals)} avals")
    for aval, bm in zip(in_avals[-gm.num_inputs:] if gm.num_inputs else [], gm.block_mappings):
        if tuple(aval.shape) != tuple(bm.array_aval.shape):
            raise ValueError(f"operand {bm.origin} has shape {tuple(aval.shape)}, its BlockSpec "
                             f"was made for {tuple(bm.array_aval.shape)}")


def _unit_of_step(coords, grid, par_axes, units) -> np.ndarray:
    """The parallel unit running each grid point: contiguous chunks of the
    row-major flattened parallel iterations, the first ``n % units`` one larger."""
    if not par_axes or units == 1:
        return np.zeros(coords.shape[1], dtype=np.int64)
    shape = tuple(grid[a] for a in par_axes)
    flat = np.ravel_multi_index(tuple(coords[a] for a in par_axes), shape)
    q, r = divmod(math.prod(shape), units)
    ends = np.cumsum([q + 1] * r + [q] * (units - r))
    return np.searchsorted(ends, flat, side="right").astype(np.int64)


def _unit_sums(value, unit, units) -> np.ndarray:
    """A per-step count summed over each unit's steps."""
    sums = np.zeros(units, dtype=np.int64)
    np.add.at(sums, unit, np.broadcast_to(np.asarray(value, np.int64), unit.shape))
    return sums


# ------------------------------------------------------------ block traffic

def _is_ref(aval) -> bool:
    return hasattr(aval, "inner_aval")


def _block_indices(gm, coords, index_operands, notes):
    """Per block mapping: its index-map outputs at every grid point, an int
    array (outputs, steps), and whether they read prefetch values not given
    (then evaluated on zeros and not used)."""
    n_grid, n_idx = len(gm.grid), gm.num_index_operands
    maps, dependent = [], []
    for bm in gm.block_mappings:
        closed = bm.index_map_jaxpr
        reads_data = n_idx > 0 and _depends_on(closed.jaxpr, set(closed.jaxpr.invars[n_grid:]))
        dependent.append(reads_data and index_operands is None)
        if any(_is_ref(a) for a in closed.in_avals):
            closed = discharge_state(closed)
        maps.append((jcore.jaxpr_as_fun(closed), len(bm.index_map_jaxpr.out_avals)))
    if dependent and any(dependent):
        notes.append("an index map reads scalar-prefetch values that were not given: its block "
                     "is counted as transferred at every grid step")

    if index_operands is None:
        idx_args = [jnp.zeros(_inner(a).shape, _inner(a).dtype)
                    for a in gm.index_map_avals[n_grid:]]
    else:
        idx_args = [jnp.asarray(v) for v in index_operands]
        if len(idx_args) != n_idx:
            raise ValueError(f"the kernel has {n_idx} scalar-prefetch operands, "
                             f"{len(idx_args)} values were given")

    def all_maps(step, *args):
        del step  # batches the call even for a grid of no axes
        ids, idx = args[:n_grid], args[n_grid:]
        return [tuple(fn(*ids, *idx)[:n_out]) for fn, n_out in maps]

    steps = coords.shape[1]
    with jax.ensure_compile_time_eval():
        evaluate = jax.jit(jax.vmap(all_maps, in_axes=(0,) * (1 + n_grid) + (None,) * n_idx))
        outs = evaluate(np.arange(steps, dtype=np.int32), *coords, *idx_args)
    indices = [np.stack([np.asarray(o, dtype=np.int64) for o in out]) if out
               else np.zeros((0, steps), np.int64) for out in outs]
    return indices, dependent


def _inner(aval):
    return getattr(aval, "inner_aval", aval)


def _depends_on(jaxpr, tainted: set) -> bool:
    tainted = set(tainted)
    for eqn in jaxpr.eqns:
        if any(isinstance(v, jcore.Var) and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    return any(isinstance(v, jcore.Var) and v in tainted for v in jaxpr.outvars)


def _traffic(bm, is_input, indices, dependent, unit, order, units) -> BlockTraffic:
    array = bm.array_aval
    itemsize = np.dtype(array.dtype).itemsize
    sizes = [_block_dim_size(d) for d in bm.block_shape]
    block_bytes = math.prod(sizes) * itemsize
    space = str(getattr(bm.block_aval, "memory_space", "")).lower()
    role = "input" if is_input else "output"
    shape_out = tuple(None if type(d).__name__ == "Squeezed" else s
                      for d, s in zip(bm.block_shape, sizes))
    base = dict(origin=str(bm.origin), role=role, array_shape=tuple(array.shape),
                dtype=str(np.dtype(array.dtype)), block_shape=shape_out, block_bytes=block_bytes)
    if space in _UNPIPELINED_SPACES:
        zeros = (0,) * units
        return BlockTraffic(**base, buffers=0, transfers=0, hbm_bytes=0, unit_transfers=zeros,
                            unit_hbm_bytes=zeros)
    buffers = getattr(bm.pipeline_mode, "buffer_count", None) or DEFAULT_BUFFERS
    steps = unit.shape[0]
    seq_unit = unit[order]
    changed = np.ones(steps, dtype=bool)
    if not dependent:
        seq = indices[:, order]
        changed[1:] = (seq_unit[1:] != seq_unit[:-1]) | np.any(seq[:, 1:] != seq[:, :-1], axis=0)
        moved = _in_bounds_bytes(bm.block_shape, sizes, array.shape, itemsize, seq)
    else:
        moved = np.full(steps, block_bytes, dtype=np.int64)
    moved = np.where(changed, moved, 0)
    unit_transfers = np.bincount(seq_unit[changed], minlength=units)
    unit_bytes = np.zeros(units, dtype=np.int64)
    np.add.at(unit_bytes, seq_unit, moved)
    return BlockTraffic(**base, buffers=buffers, transfers=int(changed.sum()),
                        hbm_bytes=int(moved.sum()),
                        unit_transfers=tuple(int(n) for n in unit_transfers),
                        unit_hbm_bytes=tuple(int(n) for n in unit_bytes),
                        data_dependent=dependent)


def _block_dim_size(dim) -> int:
    return 1 if type(dim).__name__ == "Squeezed" else int(dim.block_size)


def _in_bounds_bytes(block_shape, sizes, array_shape, itemsize, indices) -> np.ndarray:
    """Bytes of each step's block that lie inside the array."""
    steps = indices.shape[1]
    kinds = [type(d).__name__ for d in block_shape]
    if indices.shape[0] != len(block_shape) or not set(kinds) <= {"Blocked", "Element", "Squeezed"}:
        return np.full(steps, math.prod(sizes) * itemsize, dtype=np.int64)  # full block
    elements = np.ones(steps, dtype=np.int64)
    for d, (kind, size, extent) in enumerate(zip(kinds, sizes, array_shape)):
        if kind == "Blocked":
            start = indices[d] * size
        elif kind == "Element":
            start = indices[d] - block_shape[d].padding[0]
        else:
            start = indices[d]
        inside = np.minimum(start + size, extent) - np.maximum(start, 0)
        elements *= np.maximum(inside, 0)
    return elements * itemsize


def _aval_bytes(aval) -> int:
    inner = _inner(aval)
    dtype = getattr(inner, "dtype", None)
    if dtype is None or jnp.issubdtype(dtype, jax.dtypes.extended):
        return 0  # semaphores and other non-data scratch
    return math.prod(inner.shape) * np.dtype(dtype).itemsize


# ------------------------------------------------------------ body work
#
# Work is a dict: ("matrix", dtype) / "vector" / "transcendental" / "relayout"
# -> an int, or an int64 array over the grid steps when it depends on the step.

def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


def _scale(a: dict, factor) -> dict:
    return {k: v * factor for k, v in a.items()}


def _maximum(works: list[dict]) -> dict:
    out: dict = {}
    for w in works:
        for k, v in w.items():
            out[k] = np.maximum(out[k], v) if k in out else v
    return out


def _choose(index: np.ndarray, works: list[dict]) -> dict:
    """Per step, the work of the branch ``index`` selects (clamped, as lax.switch does)."""
    index = np.clip(index.astype(np.int64), 0, len(works) - 1)
    steps = np.arange(index.shape[0])
    keys = dict.fromkeys(k for w in works for k in w)
    return {k: np.stack([np.broadcast_to(np.asarray(w.get(k, 0), np.int64), index.shape)
                         for w in works])[index, steps] for k in keys}


def _summarize(work: dict, reduce) -> BodyWork:
    matrix = tuple(sorted((k[1], reduce(v)) for k, v in work.items() if isinstance(k, tuple)))
    return BodyWork(matrix_flops_by_dtype=tuple((d, f) for d, f in matrix if f),
                    vector_ops=reduce(work.get("vector", 0)),
                    transcendentals=reduce(work.get("transcendental", 0)),
                    relayout_elements=reduce(work.get("relayout", 0)))


def _size(v) -> int:
    return math.prod(getattr(v.aval, "shape", ()))


def _rank0(v) -> bool:
    return getattr(v.aval, "shape", None) == ()


class _Body:
    """Walks a kernel body, counting work per grid step. ``known`` maps the
    scalar variables that are functions of the grid position to their value
    at every step (an array over the steps)."""

    def __init__(self, grid, vmapped_dims, coords, notes):
        self.user_axes = [a for a in range(len(grid)) if a not in vmapped_dims]
        self.grid, self.coords, self.notes = grid, coords, notes
        self.steps = coords.shape[1]
        self.dots: dict = {}  # id of a dot_general equation -> its (rows, cols, contraction, dtype)

    def walk(self, jaxpr, known: dict) -> tuple[dict, list]:
        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        known = dict(known)
        work: dict = {}
        for eqn in jaxpr.eqns:
            work = _add(work, self.eqn(eqn, known))
        return work, [self.value(v, known) for v in jaxpr.outvars]

    def value(self, v, known):
        if isinstance(v, jcore.Literal):
            return v.val
        return known.get(v)

    def eqn(self, eqn, known) -> dict:
        name = eqn.primitive.name
        if name == "program_id":
            known[eqn.outvars[0]] = self.coords[self.user_axes[eqn.params["axis"]]]
            return {}
        if name == "num_programs":
            known[eqn.outvars[0]] = self.grid[self.user_axes[eqn.params["axis"]]]
            return {}
        if name == "scan":
            return self.scan(eqn, known)
        if name == "while":
            return self.while_loop(eqn, known)
        if name == "cond":
            return self.cond(eqn, known)
        category = KIND_CATEGORY.get(name)
        if category in ("elementwise", "transcendental"):
            self.fold_scalar(eqn, known)
        if all(_rank0(v) for v in (*eqn.invars, *eqn.outvars)) and category != "contraction":
            return {}  # scalar index arithmetic: the scalar unit
        out_size = sum(_size(v) for v in eqn.outvars)
        if category == "elementwise":
            return {"vector": out_size}
        if category == "transcendental" or name in _PALLAS_TRANSCENDENTAL:
            return {"transcendental": out_size}
        if category == "reduction":
            return {"vector": max(_size(eqn.invars[0]) - _size(eqn.outvars[0]), 0)}
        if category == "cumulative":
            return {"vector": out_size}
        if category == "contraction":
            return self.dot(eqn)
        if category == "scatter":
            return {"vector": _size(eqn.invars[2])} if name != "scatter" else {"relayout": out_size}
        if category in ("data_movement", "gather") or name in _PALLAS_RELAYOUT:
            return {"relayout": out_size}
        if category in ("view", "constant") or name in _FREE:
            return {}
        if name == "addupdate":
            return {"vector": _size(eqn.invars[1])}
        if name == "dma_start":
            self.notes.append("the kernel starts DMAs itself (dma_start): their bytes are not "
                              "counted")
            return {}
        subs = list(jcore.jaxprs_in_params(eqn.params))
        if subs:  # pjit, custom_jvp_call, run_scoped, ...: the body, once
            work = {}
            for sub in subs:
                operands = eqn.invars if len(sub.invars) == len(eqn.invars) else ()
                sub_work, outs = self.walk(sub, self.sub_known(sub, operands, known))
                work = _add(work, sub_work)
                if len(subs) == 1 and len(outs) == len(eqn.outvars):
                    known.update({v: o for v, o in zip(eqn.outvars, outs) if o is not None})
            return work
        self.notes.append(f"'{name}' has no work rule: counted as one vector operation per "
                          "output element")
        return {"vector": out_size}

    def fold_scalar(self, eqn, known) -> None:
        """Evaluate a scalar elementwise op of known scalars at every step."""
        if len(eqn.outvars) != 1 or not all(_rank0(v) for v in (*eqn.invars, *eqn.outvars)):
            return
        values = [self.value(v, known) for v in eqn.invars]
        if any(v is None for v in values):
            return
        args = [np.broadcast_to(np.asarray(val, dtype=v.aval.dtype), (self.steps,))
                for val, v in zip(values, eqn.invars)]
        with jax.ensure_compile_time_eval():
            known[eqn.outvars[0]] = np.asarray(eqn.primitive.bind(*args, **eqn.params))

    def dot(self, eqn) -> dict:
        lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
        (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
        contract = math.prod(lhs.shape[d] for d in lhs_contract)
        dtype = str(np.dtype(lhs.dtype))
        self.dots[id(eqn)] = (math.prod(n for d, n in enumerate(lhs.shape) if d not in (*lhs_contract, *lhs_batch)),
                              math.prod(n for d, n in enumerate(rhs.shape) if d not in (*rhs_contract, *rhs_batch)),
                              contract, dtype)
        return {("matrix", dtype): 2 * _size(eqn.outvars[0]) * contract}

    def sub_known(self, sub, operands, known) -> dict:
        """The known values of ``sub``'s leading invars, bound to ``operands``."""
        out = {}
        for iv, ov in zip(getattr(sub, "jaxpr", sub).invars, operands):
            val = self.value(ov, known)
            if val is not None:
                out[iv] = val
        return out

    def scan(self, eqn, known) -> dict:
        body = eqn.params["jaxpr"]
        consts = eqn.invars[:eqn.params["num_consts"]]
        work, _ = self.walk(body, self.sub_known(body, consts, known))
        return _scale(work, int(eqn.params["length"]))

    def while_loop(self, eqn, known) -> dict:
        p = eqn.params
        cond, body = p["cond_jaxpr"], p["body_jaxpr"]
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts = eqn.invars[:nc], eqn.invars[nc:nc + nb]
        init = eqn.invars[nc + nb:]
        trips = self.fori_trips(cond.jaxpr, body.jaxpr, nc, nb, init, known)
        if trips is None:
            self.notes.append("a while loop whose trip count is not a function of the grid "
                              "position (lax.while_loop, or fori_loop bounds read from memory): "
                              "counted as one trip")
            trips = 1
        body_work, _ = self.walk(body, self.sub_known(body, body_consts, known))
        cond_work, _ = self.walk(cond, self.sub_known(cond, cond_consts, known))
        return _add(_scale(body_work, trips), _scale(cond_work, trips + 1))

    def fori_trips(self, cond, body, nc, nb, init, known):
        """The trip count of a ``fori_loop``-shaped while (``i < upper``, ``i += 1``),
        per step, when its bounds are known; else None."""
        if len(cond.eqns) != 1 or cond.eqns[0].primitive.name != "lt":
            return None
        lt = cond.eqns[0]
        if cond.outvars[0] is not lt.outvars[0]:
            return None
        carry = {v: i for i, v in enumerate(cond.invars[nc:])}
        i_var, upper_var = lt.invars
        if not isinstance(i_var, jcore.Var) or i_var not in carry:
            return None
        i_pos = carry[i_var]
        body_carry = body.invars[nb:]
        producer = next((e for e in body.eqns if body.outvars[i_pos] in e.outvars), None)
        if (producer is None or producer.primitive.name != "add"
                or body_carry[i_pos] not in producer.invars
                or not any(isinstance(v, jcore.Literal) and v.val == 1 for v in producer.invars)):
            return None
        if isinstance(upper_var, jcore.Literal):
            upper = upper_var.val
        elif upper_var in carry and body.outvars[carry[upper_var]] is body_carry[carry[upper_var]]:
            upper = self.value(init[carry[upper_var]], known)
        else:
            return None
        lower = self.value(init[i_pos], known)
        if lower is None or upper is None:
            return None
        trips = np.maximum(np.asarray(upper, np.int64) - np.asarray(lower, np.int64), 0)
        return int(trips) if trips.ndim == 0 else trips

    def cond(self, eqn, known) -> dict:
        branches = eqn.params["branches"]
        works = [self.walk(b, self.sub_known(b, eqn.invars[1:], known))[0] for b in branches]
        index = self.value(eqn.invars[0], known)
        if index is None:
            return _maximum(works)  # predicate unknown here: the larger branch
        index = np.broadcast_to(np.asarray(index), (self.steps,))
        return _choose(index, works)
