"""What each op asks of the hardware, independent of any chip.

``work_of(op)`` looks the op up first by kind (``KIND_RULES``), then by the
category of its kind (``CATEGORY_RULES``, categories from
``lowering.op_kinds``). Counting follows XLA's ``HloCostAnalysis`` where it
has a convention:

- elementwise: 1 FLOP per output element; transcendental functions (exp, log,
  pow, tanh, sin, erf, ...) count 1 under ``transcendentals`` instead. Special
  functions (lgamma, digamma, igamma, bessel, ...) count as one special-function
  evaluation per element (XLA expands them into polynomials, so its counts
  for those are larger).
- reduction: (input elements - output elements) x the reducer's FLOPs (one
  combine per folded element; a generic ``reduce`` counts its reducer jaxpr).
- contraction: 2 FLOPs per multiply-add.
- convolution: 2 FLOPs per multiply-add that touches a real (not padding, not
  a dilation hole) input element, exactly as XLA's ``GetConvolutionFlops``.
- window (``reduce_window*``): output elements x (window size - 1) x the
  reducer's FLOPs; ``select_and_scatter_add``: source elements x window size
  (window - 1 selects and one add); ``select_and_gather_add``: output x
  (window - 1).
- gather: no FLOPs (bytes only). scatter: update elements x the combiner's
  FLOPs (0 for a plain ``scatter`` that overwrites, 1 for scatter-add/mul/...).

Where XLA has no convention we document our own:

- sort: n x ceil(log2 n) comparisons per sorted row (XLA's ``HandleSort``
  charges N x ceil(log2 N) over *all* N elements as if one row; a row-wise
  sort does fewer comparisons). top_k: n x ceil(log2 k) per row (a size-k heap).
- cumulative: 1 FLOP per element (a work-efficient scan); cumlogsumexp
  also 2 transcendentals per element (exp and log1p of logaddexp).
- random: Threefry-2x32 integer ops, see ``THREEFRY_OPS_PER_BLOCK``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import numpy as np

from lowering.ir import Op, is_extended
from lowering.kernels import is_view
from lowering.op_kinds import KIND_CATEGORY
from runtime.accelerated import RULES as ACCELERATED_RULES  # mtia-jax's own primitives
from runtime.work import OpWork, scattered_bytes


def operand_reads(op: Op, work: OpWork) -> tuple[float, ...]:
    """HBM bytes ``op`` reads from each of its operands (scalars: immediates)."""
    reads = work.reads if work.reads is not None else (v.type.nbytes for v in op.operands)
    return tuple(0.0 if v.type.size == 1 else float(r) for v, r in zip(op.operands, reads, strict=True))


def result_writes(op: Op, work: OpWork) -> float:
    """HBM bytes ``op`` writes."""
    if work.writes is not None:
        return float(work.writes)
    return float(sum(r.type.nbytes for r in op.results if r.type.size != 1))


def hbm_bytes(op: Op) -> float:
    """HBM bytes one execution of the (unfused) op ``op`` reads and writes."""
    work = work_of(op)
    return float(sum(operand_reads(op, work))) + result_writes(op, work)


def _compute_dtype(dtype) -> np.dtype:
    # PRNG keys are uint32 words to the vector units
    return np.dtype(np.uint32) if is_extended(dtype) else dtype


def _operand_dtype(op: Op) -> np.dtype:
    return _compute_dtype((op.operands[0] if op.operands else op.results[0]).type.dtype)


def _size(shape) -> int:
    return math.prod(shape)


# ------------------------------------------------------------ categories

def _elementwise_work(op: Op) -> OpWork:
    return OpWork(flops=op.results[0].type.size, dtype=_operand_dtype(op))


def _transcendental_work(op: Op) -> OpWork:
    return OpWork(transcendentals=op.results[0].type.size, dtype=_operand_dtype(op))


def _reduction_work(op: Op) -> OpWork:
    folded = op.operands[0].type.size - op.results[0].type.size
    return OpWork(flops=max(folded, 0), dtype=_operand_dtype(op))


def _contraction_work(op: Op) -> OpWork:
    lhs, rhs = op.operands
    (lhs_contract, _), (lhs_batch, _) = op.params["dimension_numbers"]
    contract = math.prod(lhs.type.shape[d] for d in lhs_contract)
    # output elements x contraction length multiply-adds, 2 FLOPs each
    return OpWork(flops=2.0 * op.results[0].type.size * contract,
                  engine="matrix", dtype=lhs.type.dtype)


def _valid_window_positions(out_size: int, in_size: int, kernel_size: int, stride: int,
                            pad_low: int, lhs_dilation: int, rhs_dilation: int) -> int:
    """(output position, kernel position) pairs of one spatial dimension that
    read a real input element, as XLA's ``GetConvolutionFlops`` counts them."""
    dilated_in = (in_size - 1) * lhs_dilation + 1 if in_size > 0 else 0
    o = np.arange(out_size)[:, None]
    k = np.arange(kernel_size)[None, :]
    index = o * stride - pad_low + k * rhs_dilation
    valid = (index >= 0) & (index < dilated_in) & (index % lhs_dilation == 0)
    return int(valid.sum())


def _convolution_work(op: Op) -> OpWork:
    lhs, rhs = op.operands
    out = op.results[0]
    p = op.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    spatial = len(lhs_spec) - 2
    strides = p["window_strides"]
    lhs_dilation = p.get("lhs_dilation") or (1,) * spatial
    rhs_dilation = p.get("rhs_dilation") or (1,) * spatial
    positions = 1
    for i in range(spatial):
        positions *= _valid_window_positions(
            out.type.shape[out_spec[i + 2]], lhs.type.shape[lhs_spec[i + 2]],
            rhs.type.shape[rhs_spec[i + 2]], strides[i], p["padding"][i][0],
            lhs_dilation[i], rhs_dilation[i])
    in_features_per_group = rhs.type.shape[rhs_spec[1]]
    out_features = out.type.shape[out_spec[1]]
    batch = lhs.type.shape[lhs_spec[0]] // p["batch_group_count"]
    multiply_adds = batch * out_features * in_features_per_group * positions
    return OpWork(flops=2.0 * multiply_adds, engine="matrix", dtype=lhs.type.dtype)


def _cumulative_work(op: Op) -> OpWork:
    return OpWork(flops=op.results[0].type.size, dtype=_operand_dtype(op))


def _sort_work(op: Op) -> OpWork:
    shape = op.operands[0].type.shape
    n = shape[op.params["dimension"]] if shape else 1
    rows = op.operands[0].type.size // max(n, 1)
    return OpWork(flops=rows * n * _log2_ceil(n), dtype=_operand_dtype(op))


def _log2_ceil(n: int) -> int:
    return max(int(n) - 1, 0).bit_length()


def _gather_work(op: Op) -> OpWork:
    # reads the gathered slices (rows of an embedding table, say), not the operand
    operand, indices = op.operands[0].type, op.operands[1].type
    window = tuple(op.params["slice_sizes"])
    windows = op.results[0].type.size // max(_size(window), 1)
    nbytes, accesses = scattered_bytes(operand, windows, window)
    return OpWork(dtype=_operand_dtype(op), reads=(nbytes, float(indices.nbytes)),
                  random_accesses=accesses)


def _scatter_window(op: Op) -> tuple[int, tuple[int, ...]]:
    """(number of update windows, window shape in the operand's dimensions)."""
    operand, updates = op.operands[0].type, op.operands[2].type
    dn = op.params["dimension_numbers"]
    inserted = {*dn.inserted_window_dims, *getattr(dn, "operand_batching_dims", ())}
    sizes = iter(updates.shape[d] for d in dn.update_window_dims)
    window = tuple(1 if d in inserted else next(sizes, 1) for d in range(len(operand.shape)))
    return updates.size // max(_size(window), 1), window


def in_place(op: Op) -> bool:
    """Whether an update op (dynamic_update_slice, scatter) writes into its
    operand's buffer: decided by ``lowering.passes.inplace`` (an operand
    still needed afterwards, or a caller's buffer that was not donated, is
    copied first)."""
    return bool(op.attrs.get("in_place", False))


def _scatter_work(op: Op) -> OpWork:
    operand, indices, updates = (v.type for v in op.operands[:3])
    jaxpr = op.params.get("update_jaxpr")
    if op.kind == "scatter":
        flops, transcendentals = _jaxpr_work(jaxpr) if jaxpr is not None else (0, 0)
    else:  # scatter-add, -sub, -mul, -min, -max: one combine per update element
        flops, transcendentals = 1, 0
    windows, window = _scatter_window(op)
    written, accesses = scattered_bytes(operand, windows, window)
    # a combining scatter reads the rows it updates; a plain one overwrites them
    old = written if op.kind != "scatter" else 0.0
    copy = 0.0 if in_place(op) else float(operand.nbytes)
    return OpWork(flops=updates.size * flops, transcendentals=updates.size * transcendentals,
                  dtype=_operand_dtype(op),
                  reads=(copy + old, float(indices.nbytes), float(updates.nbytes)),
                  writes=copy + written, random_accesses=accesses * (2 if old else 1))


def _slice_work(op: Op) -> OpWork:
    # a window that is not one contiguous run (views are the others): read
    # the window, write it
    window = float(op.results[0].type.nbytes)
    return OpWork(reads=(window, *(0.0 for _ in op.operands[1:])))


def _window_size(op: Op) -> int:
    return _size(op.params["window_dimensions"])


def _reduce_window_work(op: Op) -> OpWork:
    combines = op.results[0].type.size * max(_window_size(op) - 1, 0)
    return OpWork(flops=combines, dtype=_operand_dtype(op))


def _random_work(op: Op) -> OpWork:
    # unknown random op: one hash block per output word pair
    words = sum(v.type.nbytes for v in op.results) / 4
    return OpWork(flops=THREEFRY_OPS_PER_BLOCK * math.ceil(words / 2), dtype=np.dtype(np.uint32))


def _no_work(op: Op) -> OpWork:
    return OpWork()


def _host_work(op: Op) -> OpWork:
    """No MTIA kernel: the counts of the original op where we have a rule
    (host compute time itself is not modeled), on the host engine."""
    name = op.attrs.get("op")
    counts = OpWork()
    if name in KIND_CATEGORY and KIND_CATEGORY[name] != "host":
        counts = work_of(dataclasses.replace(op, kind=name))
    return OpWork(flops=counts.flops, transcendentals=counts.transcendentals, engine="host")


def _network_work(op: Op) -> OpWork:
    # priced by runtime.collectives on the chip's scale-up network
    return OpWork(engine="network")


CATEGORY_RULES: dict[str, Callable[[Op], OpWork]] = {
    "collective": _network_work,
    "elementwise": _elementwise_work,
    "transcendental": _transcendental_work,
    "reduction": _reduction_work,
    "cumulative": _cumulative_work,
    "sort": _sort_work,
    "gather": _gather_work,
    "scatter": _scatter_work,
    "window": _reduce_window_work,
    "convolution": _convolution_work,
    "contraction": _contraction_work,
    "random": _random_work,
    "data_movement": _no_work,
    "view": _no_work,
    "constant": _no_work,
    "host": _host_work,
}


# ------------------------------------------------------------ kinds

def _jaxpr_work(jaxpr) -> tuple[float, float]:
    """(FLOPs, transcendentals) of one application of a small reducer or
    combiner jaxpr (XLA's ``ProcessSubcomputation``)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    flops = transcendentals = 0
    for eqn in jaxpr.eqns:
        category = KIND_CATEGORY.get(eqn.primitive.name)
        if category == "elementwise":
            flops += 1
        elif category == "transcendental":
            transcendentals += 1
    return flops, transcendentals


def _generic_reduce_work(op: Op) -> OpWork:
    # operands: the inputs, then as many init values
    folded = op.operands[0].type.size - op.results[0].type.size
    flops, transcendentals = _jaxpr_work(op.params["jaxpr"])
    return OpWork(flops=max(folded, 0) * flops, transcendentals=max(folded, 0) * transcendentals,
                  dtype=_operand_dtype(op))


def _generic_reduce_window_work(op: Op) -> OpWork:
    combines = op.results[0].type.size * max(_window_size(op) - 1, 0)
    flops, transcendentals = _jaxpr_work(op.params["jaxpr"])
    return OpWork(flops=combines * flops, transcendentals=combines * transcendentals,
                  dtype=_operand_dtype(op))


def _select_and_scatter_add_work(op: Op) -> OpWork:
    # operands: (source, operand); per source element, window - 1 selects and one add
    return OpWork(flops=op.operands[0].type.size * _window_size(op), dtype=_operand_dtype(op))


def _cumlogsumexp_work(op: Op) -> OpWork:
    n = op.results[0].type.size
    return OpWork(flops=n, transcendentals=2 * n, dtype=_operand_dtype(op))


def _top_k_work(op: Op) -> OpWork:
    shape = op.operands[0].type.shape
    axis = op.params.get("axis", op.params.get("reduction_dimension", -1)) % len(shape)
    n = shape[axis]
    rows = op.operands[0].type.size // max(n, 1)
    return OpWork(flops=rows * n * max(_log2_ceil(op.params["k"]), 1), dtype=_operand_dtype(op))


# Threefry-2x32 (20 rounds) per 2-word block: each round is an add, a rotate
# (shift left, shift right, or) and an xor = 5 integer ops -> 100; the key is
# injected before the first round (2 adds) and after every 4th (5 x 3 adds)
# -> 117 integer ops per block of two uint32 words. (XLA's count for the
# CPU lowering is not comparable: it is a rolled loop whose body XLA counts once.)
THREEFRY_OPS_PER_BLOCK = 117


def _threefry_work(op: Op) -> OpWork:
    blocks = op.results[0].type.size  # (x1, x2) -> (y1, y2): one block per element pair
    return OpWork(flops=THREEFRY_OPS_PER_BLOCK * blocks, dtype=np.dtype(np.uint32))


def _random_bits_work(op: Op) -> OpWork:
    out = op.results[0].type
    if jax.config.jax_threefry_partitionable:
        # one block per output element, then one op to combine its two words
        flops = (THREEFRY_OPS_PER_BLOCK + 1) * out.size
    else:
        words = math.ceil(out.size * op.params["bit_width"] / 32)
        flops = THREEFRY_OPS_PER_BLOCK * math.ceil(words / 2)
    return OpWork(flops=flops, dtype=np.dtype(np.uint32))


def _per_key_block_work(op: Op) -> OpWork:
    # split: one block per new key; fold_in: one block per key
    return OpWork(flops=THREEFRY_OPS_PER_BLOCK * op.results[0].type.size, dtype=np.dtype(np.uint32))


def _random_seed_work(op: Op) -> OpWork:
    # seed -> (hi word, lo word): a shift and a mask per key word
    words = op.results[0].type.nbytes / 4
    return OpWork(flops=words, dtype=np.dtype(np.uint32))


def _rng_bit_generator_work(op: Op) -> OpWork:
    # modeled as Threefry-2x32 over the output words (XLA's default algorithm
    # is backend-specific)
    words = op.results[1].type.nbytes / 4
    return OpWork(flops=THREEFRY_OPS_PER_BLOCK * math.ceil(words / 2), dtype=np.dtype(np.uint32))


# Marsaglia-Tsang gamma sampling: < 1.1 proposals per sample on average; a
# proposal draws a normal and a uniform (2 hash blocks, 234 ops) plus ~20
# arithmetic ops; log, log and sqrt are special-function evaluations.
GAMMA_OPS_PER_SAMPLE = 2 * THREEFRY_OPS_PER_BLOCK + 20
GAMMA_TRANSCENDENTALS_PER_SAMPLE = 3


def _random_gamma_work(op: Op) -> OpWork:
    n = op.results[0].type.size
    return OpWork(flops=GAMMA_OPS_PER_SAMPLE * n,
                  transcendentals=GAMMA_TRANSCENDENTALS_PER_SAMPLE * n,
                  dtype=_compute_dtype(op.results[0].type.dtype))


def _dynamic_update_slice_work(op: Op) -> OpWork:
    # in place (as XLA does when it may): only the update is read and
    # written, the rest of the operand (a KV cache, say) stays where it is;
    # otherwise the operand is copied around the update
    operand, update = op.operands[0].type, op.operands[1].type
    rest = 0.0 if in_place(op) else float(operand.nbytes - update.nbytes)
    return OpWork(reads=(rest, float(update.nbytes), *(0.0 for _ in op.operands[2:])),
                  writes=rest + update.nbytes)


# op kind -> rule, for kinds whose work differs from their category's rule
KIND_RULES: dict[str, Callable[[Op], OpWork]] = {
    "dynamic_update_slice": _dynamic_update_slice_work,
    "slice": _slice_work,
    "dynamic_slice": _slice_work,
    "reduce": _generic_reduce_work,
    "reduce_window": _generic_reduce_window_work,
    "select_and_scatter_add": _select_and_scatter_add_work,
    "cumlogsumexp": _cumlogsumexp_work,
    "top_k": _top_k_work,
    "approx_top_k": _top_k_work,
    "threefry2x32": _threefry_work,
    "random_bits": _random_bits_work,
    "random_split": _per_key_block_work,
    "random_fold_in": _per_key_block_work,
    "random_seed": _random_seed_work,
    "rng_bit_generator": _rng_bit_generator_work,
    "random_gamma": _random_gamma_work,
}


def _fused_reads(op: Op) -> tuple[float, ...]:
    """Bytes a fused kernel reads of each of its operands: what its inner ops
    touch of it (a slice its window; views pass the question on to their
    readers), at most the operand once."""
    body = op.regions["body"]
    readers: dict = {}
    for inner in body.ops:
        for v in inner.operands:
            readers.setdefault(v, []).append(inner)
    escaping = set(body.outputs)

    def touched(v) -> float:
        if v in escaping:
            return float(v.type.nbytes)
        total = 0.0
        for inner in readers.get(v, ()):
            if is_view(inner):
                total += sum(touched(r) for r in inner.results)
            else:
                reads = operand_reads(inner, work_of(inner))
                total += sum(r for u, r in zip(inner.operands, reads) if u is v)
        return min(total, float(v.type.nbytes))

    return tuple(0.0 if v.type.size == 1 else touched(p) for v, p in zip(op.operands, body.params))


def _fused_writes(op: Op) -> float:
    """Bytes a fused kernel writes: each result whole, but for an update in
    place (only its rows)."""
    producers = op.regions["body"].producers()
    total = 0.0
    for out in op.regions["body"].outputs:
        if out.type.size == 1:
            continue
        inner = producers.get(out)
        work = work_of(inner) if inner is not None and len(inner.results) == 1 else None
        total += work.writes if work is not None and work.writes is not None else out.type.nbytes
    return total


def kernel_reads_writes(op: Op) -> tuple[tuple[float, ...], float]:
    """(bytes read from each operand, bytes written) of one execution of the kernel ``op``."""
    if op.kind == "fused_kernel":
        return _fused_reads(op), _fused_writes(op)
    work = work_of(op)
    return operand_reads(op, work), result_writes(op, work)


def work_of(op: Op) -> OpWork:
    rule = KIND_RULES.get(op.kind) or ACCELERATED_RULES.get(op.kind)
    if rule is None:
        rule = CATEGORY_RULES[KIND_CATEGORY[op.kind]]
    return rule(op)
