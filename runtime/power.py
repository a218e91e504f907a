"""Energy of a modeled program: a power model per chip.

A chip draws an idle power whenever it is on and a dynamic power that
scales with how busy its compute engines and its HBM are, reaching the
published TDP (``ChipSpec.tdp_watts``) when both run flat out:

    P(t) = idle + (TDP - idle) x (COMPUTE_SHARE x compute activity + HBM_SHARE x HBM activity)

with idle = ``IDLE_FRACTION`` x TDP. Activity is measured against the peaks,
so a kernel's compute energy is its work at peak rate (the busier engine's:
matrix FLOPs at the matrix peak or vector work at the vector peak,
``max(ideal_matrix_s, ideal_vector_s)``) and its HBM energy its bytes at
full bandwidth; a program of time T then takes

    E = idle x T + (TDP - idle) x (COMPUTE_SHARE x sum(work at peak) + HBM_SHARE x sum(bytes / bandwidth))

Both sums are at most T (kernels on the compute stream run one at a time
and never beat their peak; all streams share the HBM), so the average power
never exceeds the TDP.

joules per device. Busy-but-stalled engines (a kernel below its peak rate)
draw idle power only for the stall, which is how clock-gated datapaths
behave to first order. The network, the host link and the SRAM are not
counted separately (they are inside the module TDP and the shares below).

The three constants are assumptions (no per-component power is published
for MTIA or for the GPUs); ``benchmarks/energy.py`` prints how far each
moves the energy per token.
"""

from __future__ import annotations

import dataclasses

# assumption: an accelerator module idles at about 30 % of its TDP (HBM
# refresh, SerDes, leakage, fans excluded); not published for MTIA 300-500
IDLE_FRACTION = 0.30
# assumption: at full load, 60 % of the dynamic power goes to the compute
# engines and their on-chip memories and 40 % to the HBM stacks and their
# PHYs (HBM3/3e at full bandwidth draws roughly 20-30 W per stack)
COMPUTE_SHARE = 0.60
HBM_SHARE = 1.0 - COMPUTE_SHARE


@dataclasses.dataclass(frozen=True)
class Energy:
    """Modeled energy of one execution of a program on one device."""

    joules: float
    idle_joules: float
    compute_joules: float
    hbm_joules: float
    time_s: float

    @property
    def watts(self) -> float:
        """Average power over the program."""
        return self.joules / self.time_s if self.time_s > 0 else 0.0


def idle_watts(chip, idle_fraction: float = IDLE_FRACTION) -> float:
    """The power one device of ``chip`` draws while it runs nothing."""
    return idle_fraction * chip.tdp_watts


def energy(cost, chip, *, idle_fraction: float = IDLE_FRACTION,
           compute_share: float = COMPUTE_SHARE) -> Energy:
    """The energy of ``cost`` (a ``runtime.cost_model.ProgramCost``) on ``chip``;
    see the module doc."""
    if not 0 <= idle_fraction <= 1 or not 0 <= compute_share <= 1:
        raise ValueError(f"idle_fraction and compute_share are fractions in [0, 1], got "
                         f"{idle_fraction}, {compute_share}")
    idle = idle_watts(chip, idle_fraction)
    dynamic = chip.tdp_watts - idle
    at_peak = sum(max(k.ideal_matrix_s, k.ideal_vector_s) for k in cost.kernels)
    at_full_bandwidth = sum(k.hbm_bytes for k in cost.kernels) / chip.hbm_bandwidth
    compute = dynamic * compute_share * at_peak
    hbm = dynamic * (1 - compute_share) * at_full_bandwidth
    return Energy(idle * cost.time_s + compute + hbm, idle * cost.time_s, compute, hbm, cost.time_s)
