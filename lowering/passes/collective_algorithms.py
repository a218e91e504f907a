"""Choose the algorithm of every collective for the target chip's network.

Each collective op (in a function body or a region) gets
``attrs["algorithm"]``: the fastest algorithm ``lowering.network`` finds
for its kind, its per-device buffer, its group and the fabric(s) the group
spans (``hierarchical[...]`` across scale-up domains), as a collective
library's tuner picks one per call. ``as_text()`` shows the choice; the
cost model (``runtime.collectives``) prices the same plan.
"""

from __future__ import annotations

import dataclasses

from lowering.collectives import COLLECTIVE_KINDS
from lowering.ir import Module
from lowering.network import describe, plan


def run(module: Module, ctx) -> Module:
    ops = []
    for op in module.ops:
        if op.regions:
            op = dataclasses.replace(op, regions={k: run(r, ctx) for k, r in op.regions.items()})
        if op.kind in COLLECTIVE_KINDS:
            op = dataclasses.replace(op, attrs={**op.attrs, "algorithm": describe(plan(op, ctx.chip))})
        ops.append(op)
    return dataclasses.replace(module, ops=ops)
