"""Work rule for ``moe_ffn`` (``mtia_jax.primitives.moe_ffn``), the MoE FFN unit.

For ``T`` tokens of ``D`` features, ``E`` experts of hidden size ``F`` and
``k`` experts per token (every slot runs: dropless):

compute
    matrix engine: 2 * 3 * T k D F FLOPs (gate, up and down products of the
    T k routed slots), at the promoted operand dtype's rate;
    plus 2 T k F (SwiGLU epilogue: ``g * sigmoid(g)``, ``* up``) and 2 T k D
    (weighted combine: a multiply and an accumulate per slot element)
    elementwise FLOPs, counted in ``flops`` and timed with the matrix work
    (an ``OpWork`` has one engine; they are 1/(3D) and 1/(3F) of it);
    special functions: T k F sigmoids and T k softmax exponentials (absorbed
    by the unit on chips that have it, else at the vector rate). The top-k
    selection (T E log2 k comparisons) is left out: E is tiny next to D F.

HBM bytes
    ``x``, ``router_logits`` and the result once each (under a precision
    policy, ``x`` and the weights packed in their MX formats and the products
    at the wider format's rate, as for ``mx_matmul``), plus the weights of
    the experts that receive at least one token. Which experts those are
    depends on the data and the cost model is static, so it charges the
    expected number under *uniform routing* (each token's k distinct experts
    a uniformly random k-subset of the E, independently per token):

        P(expert e unused) = (1 - k/E)^T
        E_hit = E * (1 - (1 - k/E)^T)

    experts, each ``3 D F`` weights. (Real routers are skewed, which hits
    fewer distinct experts; uniform routing is the bandwidth-heavy case for
    a given T.)

without the unit (``unit="moe_ffn"`` not in ``chip.units``)
    the token dispatch and combine go through HBM (``bytes_saved_by_unit``):
    the dispatch writes the T k routed rows of D activations grouped by
    expert and the expert products read them back; the products write their
    T k output rows and the combine reads them back: 4 T k D elements of
    the activation dtype.

Expert parallelism (``moe_dispatch``, ``moe_experts``, ``moe_combine``: the
per-device kernels of a ``moe_ffn`` split over its experts, see
``mtia_jax.primitives.moe_ffn``). Their executed buffers hold a row for every
(expert, token) pair, zeros where a token does not go; the chip moves only
the routed rows. Modeling assumption: routing is balanced, so each device
dispatches and combines the T k slots of its own T tokens and its experts
receive T k rows of the G T tokens of their group (G devices). The dispatch
reads ``x`` and the logits and writes the T k routed rows; the experts read
their rows, write their float32 results and read the weights of the local
experts that receive a token (the uniform-routing expectation above, over
the G T tokens); the combine reads the T k float32 results and the logits
and writes the output. FLOPs as for ``moe_ffn``, over the routed rows.
"""

from __future__ import annotations

import numpy as np

from mtia_jax.primitives._base import weight_formats
from runtime.accelerated.mx_matmul import formats_class, packed_bytes
from runtime.work import OpWork

# SwiGLU epilogue per hidden element: g * sigmoid(g), then * up
EPILOGUE_FLOPS_PER_HIDDEN = 2
# combine per slot element: multiply by the routing weight, accumulate
COMBINE_FLOPS_PER_ELEMENT = 2
# dispatch (write + read) and combine (write + read) of T k D activations
DISPATCH_COMBINE_PASSES = 4


def expected_experts_hit(tokens: int, experts: int, top_k: int) -> float:
    """Expected number of distinct experts that receive a token when each of
    ``tokens`` tokens picks ``top_k`` distinct experts of ``experts``
    uniformly at random: ``E * (1 - (1 - k/E)^T)``."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens)


def _rate(op, x, *weights):
    """The compute class (or dtype) of the expert products: under a precision
    policy the wider of the MX operands (as ``mx_matmul``), else the promoted dtype."""
    x_fmt, w_fmt = op.params.get("x_format"), op.params.get("w_format")
    if x_fmt or w_fmt:
        return formats_class([(x_fmt, x.dtype), *((f, w.dtype) for f, w in
                                                  zip(weight_formats(w_fmt, len(weights)), weights))])
    return np.result_type(x.dtype, *(w.dtype for w in weights))


def _moe_ffn_work(op) -> OpWork:
    x, logits, w_gate, w_up, w_down = (v.type for v in op.operands)
    out = op.results[0].type
    t, d = x.shape
    e, _, f = w_gate.shape
    k = op.params["top_k"]
    slots = t * k
    hit = expected_experts_hit(t, e, k) / e  # the fraction of each weight read
    x_fmt, w_fmt = op.params.get("x_format"), op.params.get("w_format")
    return OpWork(
        flops=2 * 3 * slots * d * f + EPILOGUE_FLOPS_PER_HIDDEN * slots * f
        + COMBINE_FLOPS_PER_ELEMENT * slots * d,
        transcendentals=slots * f + slots,
        engine="matrix",
        dtype=_rate(op, x, w_gate, w_up, w_down),
        reads=(packed_bytes(x, x_fmt, -1), logits.nbytes,
               *(hit * packed_bytes(w, f, -2)
                 for w, f in zip((w_gate, w_up, w_down), weight_formats(w_fmt, 3)))),
        unit="moe_ffn",
        bytes_saved_by_unit=DISPATCH_COMBINE_PASSES * slots * d * out.dtype.itemsize,
    )


def _moe_dispatch_work(op) -> OpWork:
    x, logits = (v.type for v in op.operands)
    out = op.results[0].type
    t, d = x.shape
    routed = t * op.params["top_k"] * d * out.dtype.itemsize
    return OpWork(dtype=out.dtype, writes=routed)


def _moe_experts_work(op) -> OpWork:
    rows, w_gate, w_up, w_down = (v.type for v in op.operands)
    out = op.results[0].type
    local, received, d = rows.shape
    f = w_gate.shape[2]
    k, e = op.attrs["top_k"], op.attrs["experts"]
    slots = local * received * k / e  # the routed rows among those received, balanced
    hit = expected_experts_hit(received, e, k) / e  # the fraction of each local weight read
    x_fmt, w_fmt = op.params.get("x_format"), op.params.get("w_format")
    row_bytes = packed_bytes(rows, x_fmt, -1) / max(local * received, 1)
    return OpWork(
        flops=2 * 3 * slots * d * f + EPILOGUE_FLOPS_PER_HIDDEN * slots * f,
        transcendentals=slots * f,
        engine="matrix",
        dtype=_rate(op, rows, w_gate, w_up, w_down),
        reads=(slots * row_bytes, *(hit * packed_bytes(w, f, -2)
                                    for w, f in zip((w_gate, w_up, w_down), weight_formats(w_fmt, 3)))),
        writes=slots * d * out.dtype.itemsize,
        unit="moe_ffn",
    )


def _moe_combine_work(op) -> OpWork:
    returned, logits = (v.type for v in op.operands)
    out = op.results[0].type
    t, d = out.shape
    slots = t * op.params["top_k"]
    return OpWork(
        flops=COMBINE_FLOPS_PER_ELEMENT * slots * d,
        transcendentals=slots,
        dtype=returned.dtype,
        reads=(slots * d * returned.dtype.itemsize, logits.nbytes),
        unit="moe_ffn",
    )


RULES = {"moe_ffn": _moe_ffn_work, "moe_dispatch": _moe_dispatch_work,
         "moe_experts": _moe_experts_work, "moe_combine": _moe_combine_work}
