"""The performance model: a modeled time for every kernel of a program.

Every op that is a kernel on the device (``lowering.kernels``: not a view,
a constant or scalar arithmetic) gets

    time    = max(compute, hbm, link) + exposed launch
    compute = FLOPs / achievable FLOP/s of the engine that runs it, for its dtype
    hbm     = bytes it touches (``runtime.op_work``) / achievable HBM bandwidth
    link    = a collective's time on the network, a host fallback's on the host link

and a list scheduler (``runtime.schedule``) places the kernels on the
device's streams (compute, DMA, network, host), which overlap and share the
HBM. A kernel inside a region op (a scan body, a while loop, a cond branch)
is charged once per execution of its region: ``length`` times per scan; for
a while loop the trip count measured at run time (``runtime.executor``),
else the one the program fixes (``lowering.passes.trip_counts``), else the
one the user gives (``loop_trips``), else one trip per execution, listed in
``ProgramCost.assumed_loops``; the costliest branch of a cond. How launches
are paid is ``LAUNCH_MODELS`` (graph: overlapped with the kernel before;
eager: each in full). The engine is the matrix engine (Dot Product Engine)
for contractions and the vector units for everything else. Every constant
comes from the chip catalogue (``mtia_jax.chips``), which cites its source.
The rules are tables keyed by op kind. docs/model.md gives the equations
and the assumptions.

The achievable rates are the chip's peaks times its efficiencies: on the
matrix engine, peak x the tile's PE utilisation (``lowering.passes.tiling``)
x ``ChipSpec.matmul_efficiency``; on HBM, bandwidth x
``ChipSpec.hbm_efficiency``, with one DRAM access overhead per scattered run
(``hbm_random_access_efficiency``); the vector units run at their peak. The
roofline (``runtime.roofline``) uses the peaks.

Counting conventions follow XLA's ``HloCostAnalysis`` so that figures can be
compared with ``jax.jit(f).lower(...).compile().cost_analysis()``:
``flops`` counts 2 per multiply-add of a contraction and 1 per element of an
arithmetic elementwise op or reduction; transcendental functions are counted
under ``transcendentals`` instead; ``bytes accessed`` is the sum over kernels
of the bytes of their operands and results.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from lowering.ir import Module, Op, Value
from lowering.op_kinds import KIND_CATEGORY, NO_KERNEL
from lowering.regions import REGION_KINDS
from lowering.kernels import is_scalar, is_view
from mtia_jax.chips import ChipSpec
from runtime import pallas_cost
from runtime.collectives import collective_cost
from runtime.op_work import kernel_reads_writes, work_of
from runtime.work import ACCESS_GRANULE_BYTES
from runtime.roofline import floor_bytes
from runtime.schedule import schedule


def category(op: Op) -> str:
    """The kind of kernel ``op`` is: a ``lowering.op_kinds`` category, "fused"
    for a fused kernel, "region" for control flow (scan, while, cond), or
    no kernel: "view" or "scalar" (``lowering.kernels``)."""
    if op.kind in REGION_KINDS:
        return "region"
    if is_view(op):
        return "view"
    if is_scalar(op):
        return "scalar"
    if op.kind == "fused_kernel":
        return "fused"
    try:
        return KIND_CATEGORY[op.kind]
    except KeyError:
        raise KeyError(f"no cost rule for op kind '{op.kind}'"
                       f"{' at ' + str(op.source) if op.source else ''}") from None


def is_kernel(op: Op) -> bool:
    return category(op) not in NO_KERNEL | {"region", "scalar"}


def _is_immediate(value) -> bool:
    # scalars travel as kernel arguments, not through HBM
    return value.type.size == 1


# ---------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class KernelCost:
    """The modeled cost of one kernel, over all its executions in one call.

    ``path`` locates the op: ``"12"`` is op 12 of the program, ``"3/body/5"``
    op 5 of the body of region op 3. Counts and times are totals over
    ``count`` executions.
    """

    path: str
    kind: str
    source: str
    count: float
    flops: float
    transcendentals: float
    bytes_accessed: float
    hbm_bytes: float
    compute_s: float
    hbm_s: float            # HBM busy time (every stream's kernels read and write HBM)
    launch_s: float
    ideal_matrix_s: float   # matrix-engine time at full PE utilisation (roofline's share)
    ideal_vector_s: float   # vector/SFU time
    matrix_s: float = 0.0   # matrix-engine busy time at the achievable rate
    vector_s: float = 0.0   # vector/SFU busy time (compute_s is the larger of the two)
    start_s: float = 0.0
    stream: str = "compute"  # "compute", "dma", "network" or "host"
    collective_bytes: float = 0.0  # bytes each device sends over the network (every fabric)
    transfer_s: float = 0.0  # time on the network or the host link (their streams' kernels)
    algorithm: str = ""      # a collective's algorithm (``lowering.network.describe``)
    scale_out_s: float = 0.0  # of ``transfer_s``, the time across scale-up domains
    scale_out_bytes: float = 0.0  # of ``collective_bytes``, the bytes across scale-up domains

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.hbm_s, self.transfer_s) + self.launch_s

    @property
    def bound(self) -> str:
        """What limits this kernel: compute, memory, its launch overhead, or
        the network / host link it waits on."""
        if self.stream in ("network", "host"):
            return self.stream
        if max(self.compute_s, self.hbm_s) < self.launch_s:
            return "launch"
        return "compute" if self.compute_s >= self.hbm_s else "memory"

    def times(self, n: float) -> "KernelCost":
        """The same kernel executed ``n`` times as often."""
        return dataclasses.replace(
            self, count=self.count * n, flops=self.flops * n,
            transcendentals=self.transcendentals * n, bytes_accessed=self.bytes_accessed * n,
            hbm_bytes=self.hbm_bytes * n, compute_s=self.compute_s * n, hbm_s=self.hbm_s * n,
            launch_s=self.launch_s * n, collective_bytes=self.collective_bytes * n,
            scale_out_s=self.scale_out_s * n, scale_out_bytes=self.scale_out_bytes * n,
            ideal_matrix_s=self.ideal_matrix_s * n,
            ideal_vector_s=self.ideal_vector_s * n, matrix_s=self.matrix_s * n,
            vector_s=self.vector_s * n, transfer_s=self.transfer_s * n)


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """The modeled cost of a whole program on one chip."""

    chip: str
    kernels: tuple[KernelCost, ...]
    roofline_time_s: float
    min_hbm_bytes: float
    time_s: float  # makespan of the modeled timeline (streams overlap)
    # while loops charged one trip per execution: their trip count depends on
    # data, has not been measured and was not given ("source line [op path]")
    assumed_loops: tuple[str, ...] = ()
    # per kernel, the kernels launched just before it: ((index, share of its
    # executions), ...), index None for the program's start; what its launch
    # overlaps in graph mode
    launched_after: tuple = ()

    def total(self, field: str) -> float:
        return float(sum(getattr(k, field) for k in self.kernels))


def _engine_times(works, chip: ChipSpec, efficiency: float) -> dict[str, float]:
    """Seconds of compute per engine; ``efficiency`` is the fraction of the
    matrix engine's peak the kernel achieves. The special-function unit is
    modeled at the vector rate, one op per element, unless the op runs in a
    dedicated unit the chip has."""
    per_engine = {"matrix": 0.0, "vector": 0.0}
    for work in works:
        vector_peak = chip.vector_peak(work.dtype) if work.dtype is not None else np.inf
        special = 0.0 if work.unit in chip.units else work.transcendentals / vector_peak
        if work.engine == "matrix":
            per_engine["matrix"] += work.flops / (chip.matmul_peak(work.dtype) * efficiency)
            per_engine["vector"] += special
        else:
            per_engine["vector"] += work.flops / vector_peak + special
    return per_engine


def kernel_cost(op: Op, path: str, chip: ChipSpec) -> KernelCost:
    """One execution of ``op`` on ``chip``."""
    fused = op.kind == "fused_kernel"
    works = [work_of(inner) for inner in op.regions["body"].ops] if fused else [work_of(op)]
    reads, writes = kernel_reads_writes(op)
    hbm = float(sum(reads)) + writes
    immediates = float(sum(v.type.nbytes for v in (*op.operands, *op.results) if _is_immediate(v)))
    accessed = hbm + immediates
    hbm += sum(w.bytes_saved_by_unit for w in works if w.unit not in chip.units)
    tile = op.attrs.get("tile")  # chosen by lowering.passes.tiling
    efficiency = tile.efficiency if tile is not None else 1.0
    if tile is not None:
        hbm += tile.extra_hbm_bytes
    kind = f"fused_kernel[{op.attrs['ops']}]" if fused else op.kind
    host = any(w.engine == "host" for w in works)
    off_chip = host or any(w.engine == "network" for w in works)
    # The matrix engine and the vector units work concurrently on the tiles of
    # one kernel, so compute time is the busier engine's time.
    busy = {} if off_chip else _engine_times(works, chip, efficiency * chip.matmul_efficiency)
    ideal = {} if off_chip else _engine_times(works, chip, 1.0)
    common = dict(path=path, kind=kind, source=str(op.source) if op.source else "", count=1.0,
                  flops=float(sum(w.flops for w in works)),
                  transcendentals=float(sum(w.transcendentals for w in works)),
                  bytes_accessed=accessed, hbm_bytes=hbm, launch_s=chip.kernel_launch_s,
                  ideal_matrix_s=ideal.get("matrix", 0.0), ideal_vector_s=ideal.get("vector", 0.0),
                  matrix_s=busy.get("matrix", 0.0), vector_s=busy.get("vector", 0.0))
    if category(op) == "data_movement":
        common["stream"] = "dma"
    # a scattered access pays the DRAM overhead of a row activation: with
    # efficiency e for one-granule reads, (1/e - 1) granules' worth of time
    accesses = sum(w.random_accesses for w in works)
    overhead = accesses * ACCESS_GRANULE_BYTES * (1 / chip.hbm_random_access_efficiency - 1)
    hbm_time = (hbm + overhead) / (chip.hbm_bandwidth * chip.hbm_efficiency)
    if any(w.engine == "network" for w in works):
        # on the network stream; what it sends is read from HBM and what it
        # receives written (and reduced) there (runtime.collectives)
        c = collective_cost(op, chip)
        return KernelCost(**{**common, "stream": "network", "hbm_bytes": c.hbm_bytes},
                          compute_s=0.0, hbm_s=c.hbm_bytes / (chip.hbm_bandwidth * chip.hbm_efficiency),
                          transfer_s=c.time_s, collective_bytes=c.sent_bytes, algorithm=c.algorithm,
                          scale_out_s=c.scale_out_s, scale_out_bytes=c.scale_out_bytes)
    if op.kind == "pallas_call":  # a user's kernel: timed from its grid and blocks
        return KernelCost(**{**common, "kind": f"pallas_call[{op.attrs.get('name', '')}]",
                             **pallas_cost.times(op, chip)})
    if host:
        # No MTIA kernel: operands go to the host over the host link and the
        # results come back, one latency each way. Host compute time is not
        # modeled (it depends on the host CPU, not the chip).
        transfer = accessed / chip.host_link_bandwidth + 2 * chip.host_link_latency_s
        return KernelCost(**{**common, "stream": "host"}, compute_s=0.0, hbm_s=hbm_time,
                          transfer_s=transfer)
    return KernelCost(**common, compute_s=max(busy.values()), hbm_s=hbm_time)


# ------------------------------------------------------------ launches

def _duration(k: KernelCost) -> float:
    """One execution's time on the device, launch aside."""
    return max(k.compute_s, k.hbm_s, k.transfer_s) / k.count if k.count else 0.0


def _graph_launches(kernels, before, launch_s: float) -> list[KernelCost]:
    """Graph mode: the device's command processor launches the recorded
    kernels itself, preparing each launch while the kernel before it runs.
    A launch is paid only where the kernel before it is shorter:
    ``max(0, launch - duration of the previous kernel)`` per execution (the
    first kernel of a program pays it whole)."""
    durations = [_duration(k) for k in kernels]
    placed = []
    for k, previous in zip(kernels, before):
        exposed = sum(w * max(0.0, launch_s - (0.0 if i is None else durations[i])) for i, w in previous)
        placed.append(dataclasses.replace(k, launch_s=exposed * k.count))
    return placed


def _eager_launches(kernels, before, launch_s: float) -> list[KernelCost]:
    """Eager mode: the host launches each kernel after the one before it has
    returned, so every execution pays the whole launch."""
    return [dataclasses.replace(k, launch_s=launch_s * k.count) for k in kernels]


# how kernels are launched (``jit(..., mode=...)``) -> launch time of each kernel
LAUNCH_MODELS = {"graph": _graph_launches, "eager": _eager_launches}


# ------------------------------------------------------------ region ops

def _copy_of(op: Op, index: int) -> Op:
    """The copy a loop makes of operand ``index`` before its first trip."""
    value = op.operands[index]
    return Op("copy", [value], [Value(value.type)], {}, op.source)


class _Walk:
    """Collects the kernels of a module and its regions, with multiplicities."""

    def __init__(self, chip: ChipSpec, trip_counts: Mapping[str, float], loop_trips=None):
        self.chip = chip
        self.trip_counts = trip_counts
        self.loop_trips = loop_trips
        self.kernels: list[KernelCost] = []
        # the kernels launched just before each kernel: (index, share of its
        # executions); index None: nothing runs before it (the program's start)
        self.before: list[tuple[tuple[int | None, float], ...]] = []
        self.assumed_loops: list[str] = []

    def add(self, kernel: KernelCost) -> None:
        self.before.append(((len(self.kernels) - 1 if self.kernels else None, 1.0),))
        self.kernels.append(kernel)

    def module(self, module: Module, executions: float, prefix: str) -> None:
        for i, op in enumerate(module.ops):
            path = f"{prefix}{i}"
            if category(op) == "region":
                for index in op.attrs.get("copied_carries", ()):  # see lowering.passes.inplace
                    self.add(kernel_cost(_copy_of(op, index), f"{path}/copy{index}",
                                         self.chip).times(executions))
                for name, n in REGION_EXECUTIONS[op.kind](self, op, executions, path).items():
                    if n > 0:
                        self.region(op.regions[name], n, f"{path}/{name}/", n / max(executions, 1e-30))
            elif is_kernel(op) and executions > 0:
                self.add(kernel_cost(op, path, self.chip).times(executions))

    def region(self, region: Module, executions: float, prefix: str, runs: float) -> None:
        """Walk a region that runs ``runs`` times per execution of its op: on
        every run after the first, its first kernel follows its last."""
        first = len(self.kernels)
        self.module(region, executions, prefix)
        if runs > 1 and len(self.kernels) > first:
            again = 1.0 - 1.0 / runs
            self.before[first] = (*((i, w / runs) for i, w in self.before[first]),
                                  (len(self.kernels) - 1, again))

    def region_time(self, region: Module, executions: float, prefix: str) -> float:
        probe = _Walk(self.chip, self.trip_counts, self.loop_trips)
        probe.module(region, executions, prefix)
        return sum(k.time_s for k in probe.kernels)


def _scan_executions(walk: _Walk, op: Op, executions: float, path: str) -> dict[str, float]:
    return {"body": executions * op.params["length"]}


def _given_trips(loop_trips, op: Op, path: str) -> float | None:
    """Trips per execution the user gave for the loop at ``path``: one number
    for every data-dependent loop, or a dict keyed by the loop's path or its
    source line (``"file.py:12"``, or the line number alone)."""
    if loop_trips is None:
        return None
    if not isinstance(loop_trips, Mapping):
        return float(loop_trips)
    keys = [path]
    if op.source is not None:
        keys += [f"{op.source.file}:{op.source.line}", op.source.line,
                 f"{op.source.file.rsplit('/', 1)[-1]}:{op.source.line}"]
    return next((float(loop_trips[k]) for k in keys if k in loop_trips), None)


def _while_executions(walk: _Walk, op: Op, executions: float, path: str) -> dict[str, float]:
    """Trips of a while loop, in order of preference: measured at run time
    (totals over all executions), fixed by the program
    (``lowering.passes.trip_counts``), given by the user; else one per
    execution, and the loop is listed as unmeasured."""
    trips = walk.trip_counts.get(path)
    if trips is None and "trips" in op.attrs:
        trips = op.attrs["trips"] * executions
    if trips is None and (given := _given_trips(walk.loop_trips, op, path)) is not None:
        trips = given * executions
    if trips is None:
        walk.assumed_loops.append(f"{op.source} [op {path}]" if op.source else f"op {path}")
        trips = executions
    return {"cond": trips + executions, "body": trips}


def _cond_executions(walk: _Walk, op: Op, executions: float, path: str) -> dict[str, float]:
    costliest = max(op.regions, key=lambda name: walk.region_time(
        op.regions[name], executions, f"{path}/{name}/"))
    return {name: executions if name == costliest else 0.0 for name in op.regions}


# region-op kind -> how many times each of its regions runs
REGION_EXECUTIONS: dict[str, Callable[[_Walk, Op, float, str], dict[str, float]]] = {
    "scan": _scan_executions,
    "while": _while_executions,
    "cond": _cond_executions,
}


def program_cost(module: Module, chip: ChipSpec, trip_counts: Mapping[str, float] | None = None,
                 loop_trips=None, mode: str = "graph") -> ProgramCost:
    """Model every kernel of ``module`` on ``chip`` and schedule them on the
    device's streams (``runtime.schedule``).

    ``trip_counts`` maps while-op paths to measured total trip counts;
    ``loop_trips`` gives the trips per execution of loops neither measured
    nor fixed by the program (see ``_given_trips``); ``mode`` is how kernels
    are launched ("graph" or "eager", ``LAUNCH_MODELS``).
    """
    walk = _Walk(chip, trip_counts or {}, loop_trips)
    walk.module(module, 1.0, "")
    kernels = LAUNCH_MODELS[mode](walk.kernels, walk.before, chip.kernel_launch_s)
    kernels, makespan = schedule(module, kernels)
    # Roofline: the physical lower bound (runtime.roofline). All arithmetic at
    # peak on engines working in parallel; the inputs' touched bytes and the
    # outputs cross HBM once.
    compute_floor = max(sum(k.ideal_matrix_s for k in kernels), sum(k.ideal_vector_s for k in kernels))
    min_bytes = floor_bytes(module)
    roofline = max(compute_floor, min_bytes / chip.hbm_bandwidth)
    return ProgramCost(chip=chip.name, kernels=tuple(kernels), roofline_time_s=roofline,
                       min_hbm_bytes=min_bytes, time_s=makespan,
                       assumed_loops=tuple(walk.assumed_loops), launched_after=tuple(walk.before))
