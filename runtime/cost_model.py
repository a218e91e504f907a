"""The performance model: a modeled time for every kernel of a program.

Cost model v0. Every op that is a kernel on the device gets

    time = max(compute, hbm) + launch
    compute = FLOPs / peak FLOP/s of the engine that runs it, for its dtype
    hbm     = bytes moved between HBM and the chip / HBM bandwidth

and the kernels run one after another. The engine is the matrix engine (Dot
Product Engine) for contractions and the vector units for everything else.
Every constant comes from the chip catalogue (``mtia_jax.chips``), which
cites its source. The rules are a table keyed by op kind.

Counting conventions follow XLA's ``HloCostAnalysis`` so that figures can be
compared with ``jax.jit(f).lower(...).compile().cost_analysis()``:
``flops`` counts 2 per multiply-add of a contraction and 1 per element of an
arithmetic elementwise op or reduction; transcendental functions are counted
under ``transcendentals`` instead; ``bytes accessed`` is the sum over kernels
of the bytes of their operands and results.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from lowering.ir import Module, Op
from lowering.op_kinds import KIND_CATEGORY, NO_KERNEL
from runtime.op_work import work_of
from mtia_jax.chips import ChipSpec

def category(op: Op) -> str:
    try:
        return KIND_CATEGORY[op.kind]
    except KeyError:
        raise KeyError(f"no cost rule for op kind '{op.kind}'"
                       f"{' at ' + str(op.source) if op.source else ''}") from None


def is_kernel(op: Op) -> bool:
    return category(op) not in NO_KERNEL


def _is_immediate(op_value) -> bool:
    # scalars travel as kernel arguments, not through HBM
    return op_value.type.size == 1


# ---------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class KernelCost:
    """The modeled cost of one kernel."""

    index: int
    kind: str
    source: str
    flops: float
    transcendentals: float
    bytes_accessed: float
    hbm_bytes: float
    compute_s: float
    hbm_s: float
    launch_s: float
    start_s: float
    stream: str = "compute"  # "compute", "dma", "network" or "host"

    @property
    def time_s(self) -> float:
        return max(self.compute_s, self.hbm_s) + self.launch_s

    @property
    def bound(self) -> str:
        """What limits this kernel: compute, memory, or its launch overhead."""
        if max(self.compute_s, self.hbm_s) < self.launch_s:
            return "launch"
        return "compute" if self.compute_s >= self.hbm_s else "memory"


@dataclasses.dataclass(frozen=True)
class ProgramCost:
    """The modeled cost of a whole program on one chip."""

    chip: str
    kernels: tuple[KernelCost, ...]
    roofline_time_s: float
    min_hbm_bytes: float

    @property
    def time_s(self) -> float:
        return sum(k.time_s for k in self.kernels)

    def total(self, field: str) -> float:
        return float(sum(getattr(k, field) for k in self.kernels))


def kernel_cost(op: Op, index: int, start_s: float, chip: ChipSpec) -> KernelCost:
    work = work_of(op)
    accessed = sum(v.type.nbytes for v in (*op.operands, *op.results))
    hbm = sum(v.type.nbytes for v in (*op.operands, *op.results) if not _is_immediate(v))
    if work.engine == "host":
        return _host_round_trip(op, index, start_s, chip, work, float(accessed), float(hbm))
    if work.engine == "matrix":
        peak = chip.matmul_peak(work.dtype)
    else:
        peak = chip.vector_peak(work.dtype) if work.dtype is not None else np.inf
    # the special-function unit is modeled at the vector rate, one op per element
    compute = (work.flops + work.transcendentals) / peak
    return KernelCost(
        index=index, kind=op.kind, source=str(op.source) if op.source else "",
        flops=work.flops, transcendentals=work.transcendentals,
        bytes_accessed=float(accessed), hbm_bytes=float(hbm),
        compute_s=compute, hbm_s=hbm / chip.hbm_bandwidth,
        launch_s=chip.kernel_launch_s, start_s=start_s,
    )


def _host_round_trip(op: Op, index: int, start_s: float, chip: ChipSpec, work,
                     accessed: float, hbm: float) -> KernelCost:
    """An op with no MTIA kernel: operands go to the host over the host link,
    the host computes, results come back. Modeled: both transfers at the host
    link's bandwidth plus one latency each way; host compute time is not
    modeled (it depends on the host CPU, not the chip)."""
    transfer = accessed / chip.host_link_bandwidth + 2 * chip.host_link_latency_s
    return KernelCost(
        index=index, kind=op.kind, source=str(op.source) if op.source else "",
        flops=work.flops, transcendentals=work.transcendentals,
        bytes_accessed=accessed, hbm_bytes=hbm, compute_s=0.0, hbm_s=transfer,
        launch_s=chip.kernel_launch_s, start_s=start_s, stream="host",
    )


def program_cost(module: Module, chip: ChipSpec) -> ProgramCost:
    """Model every kernel of ``module`` on ``chip``, run back to back."""
    kernels = []
    clock = 0.0
    for index, op in enumerate(module.ops):
        if not is_kernel(op):
            continue
        k = kernel_cost(op, index, clock, chip)
        kernels.append(k)
        clock += k.time_s
    # Roofline: the physical lower bound. All arithmetic at peak, and only the
    # program's own inputs and outputs cross HBM, each exactly once.
    compute_floor = sum(k.compute_s for k in kernels)
    io_values = {*module.params, *module.outputs}
    min_bytes = float(sum(v.type.nbytes for v in io_values))
    roofline = max(compute_floor, min_bytes / chip.hbm_bandwidth)
    return ProgramCost(chip=chip.name, kernels=tuple(kernels),
                       roofline_time_s=roofline, min_hbm_bytes=min_bytes)
