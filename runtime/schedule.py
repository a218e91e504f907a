"""List scheduler: place a program's kernels on the device's streams.

Streams run concurrently: ``compute`` (matrix engine and vector units),
``dma`` (kernels that only move bytes: transposes, copies, concatenations,
gathers of whole slices), ``network`` (collectives) and ``host`` (host
fallbacks over the host link). Kernels are taken in program order (a
topological order); each starts when the values it reads are ready and its
stream is free. HBM bandwidth is shared by all streams (a collective reads
its send buffer and writes its receive buffer, a host transfer reads or
writes HBM on the chip's side): a kernel cannot finish before the HBM has
moved its bytes after everyone else's that were already in flight. The kernels of a region op (a loop body, a cond branch) run
one after another as a block. The result is the modeled timeline.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Sequence

from lowering.ir import Module, Value


def top_level_index(path: str) -> int:
    return int(path.split("/", 1)[0])


def schedule(module: Module, kernels: Sequence) -> tuple[list, float]:
    """(kernels with their start times, makespan) for ``module``'s kernels.

    ``kernels`` are ``KernelCost``s in program order, located by ``path``.
    """
    by_op: dict[int, list] = defaultdict(list)
    for k in kernels:
        by_op[top_level_index(k.path)].append(k)
    ready_at: dict[Value, float] = {}
    stream_free: dict[str, float] = defaultdict(float)
    hbm_free = 0.0
    placed = []
    end = 0.0
    for index, op in enumerate(module.ops):
        clock = max((ready_at.get(v, 0.0) for v in op.operands), default=0.0)
        for k in by_op.get(index, ()):
            start = max(clock, stream_free[k.stream])
            clock = start + k.time_s
            hbm_free = max(hbm_free, start) + k.hbm_s
            clock = max(clock, hbm_free)
            stream_free[k.stream] = clock
            placed.append(dataclasses.replace(k, start_s=start))
        ready_at.update((r, clock) for r in op.results)
        end = max(end, clock)
    return placed, end
