"""Work rule of a Pallas kernel (``pallas_call``): the bytes its blocks move
and the FLOPs its body does, read from its structure with the fewest fetches
(the grid on one processing element); the time on a chip, with the grid
spread over the processing elements, is ``runtime.pallas_cost``'s."""

from __future__ import annotations

import numpy as np

from lowering.ir import Op
from runtime.pallas_cost import structure
from runtime.work import OpWork


def _pallas_work(op: Op) -> OpWork:
    s = structure(op)
    total = s.work_total
    by_dtype = total.matrix_flops_by_dtype
    engine = "matrix" if total.matrix_flops else "vector"
    dtype = np.dtype(max(by_dtype, key=lambda kv: kv[1])[0]) if by_dtype else np.dtype(np.float32)
    flops = total.matrix_flops if by_dtype else total.vector_ops + total.relayout_elements
    return OpWork(flops=float(flops), transcendentals=float(total.transcendentals), engine=engine,
                  dtype=dtype, reads=tuple(float(o.hbm_bytes) for o in s.inputs),
                  writes=float(sum(o.hbm_bytes for o in s.outputs)))


RULES = {"pallas_call": _pallas_work}
