"""What a collective costs: its network time, the bytes it sends and the
HBM traffic it makes, from the algorithm ``lowering.network.plan`` chooses.

Per device, for each phase of the plan (``lowering.network``: the formulas
and the algorithms), the device reads what it sends from HBM and writes
what it receives (as much as it sends: every schedule here is symmetric).
Of the received bytes, those it reduces into its own are combined where
they land: on a chip with near-memory reduction (``near_memory_reduce`` in
``ChipSpec.units``, MTIA's message engines) the engine reads the local
operand and writes the sum next to memory, one extra HBM read per reduced
byte and no compute; elsewhere the received bytes are written, read back
with the local operand by the vector units and the sum written (three
extra passes), and the vector units add one element per reduced element
after the transfer.

The network time is the sum of the phases' times; it runs on the device's
``network`` stream, concurrently with compute and DMA, while its HBM bytes
share the HBM with every other stream (``runtime.schedule``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lowering.ir import Op, element_bits
from lowering.network import REDUCING, describe, elapsed, plan

KEEPS_OWN_SHARE = frozenset({"all_gather", "all_to_all"})


@dataclasses.dataclass(frozen=True)
class CollectiveCost:
    """One execution of a collective op on one device."""

    time_s: float           # network time, plus the reduction where the vector units do it
    algorithm: str          # ``lowering.network.describe`` of the plan
    sent_bytes: float       # over every fabric
    scale_out_bytes: float  # of which across scale-up domains
    scale_out_s: float      # time of the phases on the scale-out network
    hbm_bytes: float


def collective_cost(op: Op, chip) -> CollectiveCost:
    phases = plan(op, chip)
    if not phases:
        return CollectiveCost(0.0, "local", 0.0, 0.0, 0.0, 0.0)
    near_memory = "near_memory_reduce" in chip.units
    sent = sum(ph.sent_bytes for ph in phases)
    reduced = sum(ph.reduced_bytes for ph in phases if ph.kind in REDUCING)
    # a gather or an exchange also copies the device's own share into its result
    own = sum(ph.nbytes / ph.group for ph in phases if ph.kind in KEEPS_OWN_SHARE)
    hbm = 2 * sent + reduced * (1 if near_memory else 3) + 2 * own
    time = elapsed(phases)
    if reduced and not near_memory:
        dtype = op.operands[0].type.dtype
        vector = chip.vector_peak(np.dtype(dtype) if not hasattr(dtype, "format") else "fp32")
        time += reduced / (element_bits(dtype) / 8) / vector
    outside = [ph for ph in phases if ph.fabric == "scale-out"]
    return CollectiveCost(time, describe(phases), sent, sum(ph.sent_bytes for ph in outside),
                          sum(ph.time_s for ph in outside), hbm)
