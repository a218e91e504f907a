"""The collective network model (``lowering.network``, ``runtime.collectives``).

Every expectation here is alpha-beta arithmetic done in this file from the
fabric's or the chip's constants: one step in which a device sends m
messages of b bytes in all costs ``alpha + ceil(m / L) o + b / B``, and each
algorithm is a number of such steps (the table in ``lowering.network``'s
module docstring). The model's own helpers are only the thing under test.

Covered: each algorithm's time, bytes sent and bytes reduced; the choice of
algorithm per kind, size and fabric (switched or ring); the acceptance
figures (a 16 KB all-reduce over 72 chips, an all-gather overlapping a
memory-bound kernel, Llama-3-70B tensor-parallel decode from 8 to 64 chips);
meshes across scale-up domains (hierarchical plans, scale-out phases and
their share of the kernel's time and bytes); and the HBM traffic of a
collective with near-memory reduction and without.
"""

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mtia_jax
from lowering import network
from lowering.ir import Op, TensorType, Value
from mtia_jax import chips
from mtia_jax import mesh as mesh_lib
from runtime.collectives import collective_cost

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import programs  # noqa: E402

# -- hand arithmetic ---------------------------------------------------------

# a fabric with round numbers: B = 100 GB/s, alpha = 1 us, o = 0.1 us, L = 4 links
B, ALPHA, O, LINKS = 1e11, 1e-6, 1e-7, 4
ROUND_SWITCHED = network.Fabric("scale-up", B, ALPHA, O, LINKS, True)
ROUND_RING = network.Fabric("scale-up", B, ALPHA, O, LINKS, False)

# mtia450's scale-up fabric from its catalogue entry (checked against the spec below):
# 1.2 TB/s per device over 12 links, 1 us a hop, 0.1 us to issue a message, switched;
# scale-out 100 GB/s per device, 5 us a message, one link
M450 = dict(B=1.2e12, alpha=1e-6, o=1e-7, L=12)
M450_OUT = dict(B=1e11, alpha=5e-6, o=1e-7, L=1)

SWITCHED_ONLY_NAMES = {"one_shot", "two_shot", "direct"}  # written out, not network.SWITCHED_ONLY


def step(m, b, *, B=B, alpha=ALPHA, o=O, L=LINKS):
    """One step: a device sends m messages of b bytes in all."""
    return alpha + math.ceil(m / L) * o + b / B


def ceil_log2(p):
    return (p - 1).bit_length()  # ceil(log2 p) for p >= 1, without floating point


def floor_pow2(p):
    return 1 << (p.bit_length() - 1)  # the largest power of two <= p


def hand_times(kind, p, n, *, switched, B=B, alpha=ALPHA, o=O, L=LINKS):
    """{algorithm: seconds} by the formula table, for every algorithm the fabric runs."""
    s = functools.partial(step, B=B, alpha=alpha, o=o, L=L)
    share = (p - 1) / p * n
    if kind == "all_reduce":
        q = floor_pow2(p)  # Rabenseifner runs on q devices
        hd = 2 * ceil_log2(q) * s(1, 0) + 2 * (q - 1) / q * n / B
        if q != p:  # the p - q others fold in and out
            hd += 2 * s(1, n)
        times = {"ring": 2 * (p - 1) * s(1, n / p), "halving_doubling": hd,
                 "one_shot": s(p - 1, (p - 1) * n), "two_shot": 2 * s(p - 1, share)}
    elif kind in ("all_gather", "reduce_scatter"):
        times = {"ring": (p - 1) * s(1, n / p), "recursive_doubling": ceil_log2(p) * s(1, 0) + share / B,
                 "direct": s(p - 1, share)}
    elif kind == "all_to_all":
        times = {"pairwise": (p - 1) * s(1, n / p), "direct": s(p - 1, share)}
    else:
        times = {"point_to_point": s(1, n)}
    return {k: t for k, t in times.items() if switched or k not in SWITCHED_ONLY_NAMES}


def hand_sent_reduced(kind, algorithm, p, n):
    """(bytes a device sends, bytes it reduces into its own), by hand."""
    share = (p - 1) / p * n
    reducing = kind in ("all_reduce", "reduce_scatter")
    if kind == "all_reduce":
        return {"ring": (2 * share, share),
                "halving_doubling": (2 * (floor_pow2(p) - 1) / floor_pow2(p) * n + (n if p & (p - 1) else 0),
                                     (floor_pow2(p) - 1) / floor_pow2(p) * n + (n if p & (p - 1) else 0)),
                "one_shot": ((p - 1) * n, (p - 1) * n),
                "two_shot": (2 * share, share)}[algorithm]
    if kind == "permute":
        return n, 0.0
    return share, share if reducing else 0.0


def collective_op(kind, shape, dtype=np.float32, **attrs):
    """A per-device collective op as the partition pass makes one."""
    operand = Value(TensorType(tuple(shape), np.dtype(dtype)))
    out_shape = tuple(shape)
    group = attrs.get("group", 1)
    if kind == "all_gather":
        out_shape = (shape[0] * group,) + tuple(shape[1:])
    elif kind == "reduce_scatter":
        out_shape = (shape[0] // group,) + tuple(shape[1:])
    result = Value(TensorType(out_shape, np.dtype(dtype)))
    base = {"all_reduce": {"axes": ("model",), "reduce": "sum"},
            "all_gather": {"axis": "model", "dim": 0},
            "reduce_scatter": {"axis": "model", "dim": 0},
            "all_to_all": {"axis": "model", "split": 0, "concat": 0},
            "permute": {"axis": "model", "perm": ((0, 1), (1, 0))}}[kind]
    return Op(kind, [operand], [result], {**base, **attrs})


def network_kernels(report):
    return [k for k in report.cost.kernels if k.stream == "network"]


# -- 1. every algorithm against its formula ----------------------------------

ALL_ALGORITHMS = [("all_reduce", "ring"), ("all_reduce", "halving_doubling"), ("all_reduce", "one_shot"),
                  ("all_reduce", "two_shot"),
                  ("all_gather", "ring"), ("all_gather", "recursive_doubling"), ("all_gather", "direct"),
                  ("reduce_scatter", "ring"), ("reduce_scatter", "recursive_doubling"),
                  ("reduce_scatter", "direct"),
                  ("all_to_all", "pairwise"), ("all_to_all", "direct"),
                  ("permute", "point_to_point")]


@pytest.mark.parametrize("kind, algorithm", ALL_ALGORITHMS)
@pytest.mark.parametrize("p", [2, 3, 6, 8, 13, 72])
@pytest.mark.parametrize("n", [4096.0, 3e6])
def test_each_algorithm_takes_its_formula_on_a_round_fabric(kind, algorithm, p, n):
    ph = network.phase(kind, p, n, ROUND_SWITCHED, algorithm=algorithm)
    assert (ph.kind, ph.algorithm, ph.fabric, ph.group, ph.nbytes) == (kind, algorithm, "scale-up", p, n)
    assert ph.time_s == pytest.approx(hand_times(kind, p, n, switched=True)[algorithm], rel=1e-12)
    sent, reduced = hand_sent_reduced(kind, algorithm, p, n)
    assert ph.sent_bytes == pytest.approx(sent, rel=1e-12)
    assert ph.reduced_bytes == pytest.approx(reduced, rel=1e-12)


def test_the_hand_formulas_in_numbers():
    """The helper above against numbers worked out on paper (B = 1e11, alpha
    = 1 us, o = 0.1 us, L = 4; N = 1 MB so N / B = 10 us)."""
    n = 1e6
    # p = 6 is not a power of two: halving-doubling on 4 devices, 2 log2 4 = 4 latency
    # steps and 2 (3/4) N/B, plus the fold in and out of the 2 others, 2 (alpha + o + N/B)
    assert hand_times("all_reduce", 6, n, switched=True)["halving_doubling"] == pytest.approx(
        4 * 1.1e-6 + 2 * 3 / 4 * 10e-6 + 2 * (1.1e-6 + 10e-6), rel=1e-12)
    # p = 8: 6 latency steps and 2 (7/8) N/B, nothing more
    assert hand_times("all_reduce", 8, n, switched=True)["halving_doubling"] == pytest.approx(
        6 * 1.1e-6 + 1.75 * 10e-6, rel=1e-12)
    # ring over 6: 10 steps of N/6
    assert hand_times("all_reduce", 6, n, switched=True)["ring"] == pytest.approx(
        10 * (1.1e-6 + 10e-6 / 6), rel=1e-12)
    # one-shot over 6: 5 messages on 4 links (2 issue rounds), 5 N
    assert hand_times("all_reduce", 6, n, switched=True)["one_shot"] == pytest.approx(
        1e-6 + 2e-7 + 50e-6, rel=1e-12)
    # two-shot over 13: twice 12 messages on 4 links (3 rounds) and (12/13) N
    assert hand_times("all_reduce", 13, n, switched=True)["two_shot"] == pytest.approx(
        2 * (1e-6 + 3e-7 + 12 / 13 * 10e-6), rel=1e-12)
    # recursive doubling over 13: ceil(log2 13) = 4 steps
    assert hand_times("all_gather", 13, n, switched=True)["recursive_doubling"] == pytest.approx(
        4 * 1.1e-6 + 12 / 13 * 10e-6, rel=1e-12)
    # a permute: one message of N
    assert hand_times("permute", 2, n, switched=True)["point_to_point"] == pytest.approx(1.1e-6 + 10e-6)


@pytest.mark.parametrize("p", [3, 5, 6, 7, 12, 72])
def test_halving_doubling_on_a_group_not_a_power_of_two_folds_in_and_out(p):
    n = 2e6
    power = floor_pow2(p)
    got = network.phase("all_reduce", p, n, ROUND_RING, algorithm="halving_doubling").time_s
    # the schedule on the largest power of two q <= p: 2 log2 q latency steps and
    # 2 (q-1)/q N/B, then the fold of the others in and out
    without_fold = 2 * ceil_log2(power) * (ALPHA + O) + 2 * (power - 1) / power * n / B
    assert got == pytest.approx(without_fold + 2 * (ALPHA + O + n / B), rel=1e-12)
    # a power of two pays no fold
    got_power = network.phase("all_reduce", power, n, ROUND_RING, algorithm="halving_doubling").time_s
    assert got_power == pytest.approx(2 * ceil_log2(power) * (ALPHA + O) + 2 * (power - 1) / power * n / B,
                                      rel=1e-12)


def test_the_fabrics_take_the_chip_constants_and_the_collective_efficiency():
    chip = chips.get("mtia450").replace(collective_efficiency=0.5)
    up, out = network.scale_up(chip), network.scale_out(chip)
    assert (up.bandwidth, up.hop_s, up.message_s, up.links, up.switched) == pytest.approx(
        (1.2e12 * 0.5, 1e-6, 1e-7, 12, True))
    assert (out.bandwidth, out.hop_s, out.message_s, out.links, out.switched) == pytest.approx(
        (1e11 * 0.5, 5e-6, 1e-7, 1, True))
    assert not network.scale_up(chip.replace(scaleup_topology="ring")).switched
    # the constants this file writes out for mtia450 are the catalogue's
    spec = chips.get("mtia450")
    assert (spec.scaleup_link_bandwidth * spec.collective_efficiency, spec.scaleup_link_latency_s,
            spec.scaleup_message_s, spec.scaleup_links) == pytest.approx(
        (M450["B"], M450["alpha"], M450["o"], M450["L"]))
    assert (spec.scaleout_bandwidth * spec.collective_efficiency, spec.scaleout_latency_s) == pytest.approx(
        (M450_OUT["B"], M450_OUT["alpha"]))
    assert spec.scaleup_topology == "switched" and spec.scaleup_domain == 72
    # a lower efficiency slows the bandwidth term only: two-shot over 8, N = 1 MB
    # (2.2 us + 1.75 N/B against one-shot's 1.1 us + 7 N/B)
    op = collective_op("all_reduce", (2**18,), group=8)
    n = 2**20
    cost = collective_cost(op, chip)
    assert cost.algorithm == "two_shot"
    assert cost.time_s == pytest.approx(2 * (1e-6 + 1e-7 + 7 / 8 * n / 0.6e12), rel=1e-12)


# -- 2. the choice -----------------------------------------------------------

def test_a_small_all_reduce_on_switched_mtia450_is_one_shot_and_a_large_one_two_shot():
    chip = chips.get("mtia450")
    p = 72
    # 4 KB: one-shot's one hop and 6 issue rounds beat two-shot's two of each
    small = 4096
    times = hand_times("all_reduce", p, small, switched=True, **M450)
    assert min(times, key=times.get) == "one_shot"
    ph, = network.plan(collective_op("all_reduce", (small // 4,), group=p), chip)
    assert ph.algorithm == "one_shot"
    assert ph.time_s == pytest.approx(1e-6 + 6e-7 + 71 * small / 1.2e12, rel=1e-12)
    # 64 MB: bandwidth-optimal, 2 (p-1)/p N/B on the wire (two-shot: reduce-scatter
    # and all-gather, each one hop to all others at once)
    large = 64 * 2**20
    times = hand_times("all_reduce", p, large, switched=True, **M450)
    assert min(times, key=times.get) == "two_shot"
    ph, = network.plan(collective_op("all_reduce", (large // 4,), group=p), chip)
    assert ph.algorithm == "two_shot"
    assert ph.time_s == pytest.approx(times["two_shot"], rel=1e-12)
    bandwidth_term = 2 * 71 / 72 * large / 1.2e12
    assert ph.time_s - bandwidth_term == pytest.approx(2 * (1e-6 + 6e-7), rel=1e-9)
    # the crossover by hand: one_shot < two_shot while 1.6 us + 71 N/B < 3.2 us + 2 (71/72) N/B
    crossover = 1.6e-6 * 1.2e12 / (71 - 2 * 71 / 72)
    below, above = int(crossover * 0.9) // 4 * 4, int(crossover * 1.1) // 4 * 4
    assert network.plan(collective_op("all_reduce", (below // 4,), group=p), chip)[0].algorithm == "one_shot"
    assert network.plan(collective_op("all_reduce", (above // 4,), group=p), chip)[0].algorithm == "two_shot"


SIZES = [2**k for k in range(4, 29, 3)]  # 16 B .. 256 MB


@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
@pytest.mark.parametrize("p", [2, 6, 8, 72])
def test_the_chosen_algorithm_is_the_fastest_by_hand_on_switched_mtia450(kind, p):
    chip = chips.get("mtia450")
    for n in SIZES:
        ph = network.phase(kind, p, n, network.scale_up(chip))
        times = hand_times(kind, p, n, switched=True, **M450)
        assert ph.time_s == pytest.approx(min(times.values()), rel=1e-12), (kind, p, n)
        assert times[ph.algorithm] == pytest.approx(min(times.values()), rel=1e-12), (kind, p, n)


@pytest.mark.parametrize("kind", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute"])
@pytest.mark.parametrize("p", [2, 6, 8, 72])
def test_a_ring_fabric_never_chooses_a_switched_only_algorithm(kind, p):
    chip = chips.get("mtia450").replace(scaleup_topology="ring")
    chosen = set()
    for n in SIZES:
        shape = (max(n // 4, p),)
        op = collective_op(kind, shape, group=p)
        n_op = network.buffer_bytes(op)
        phases = network.plan(op, chip)
        assert len(phases) == 1
        ph = phases[0]
        times = hand_times(kind, p, n_op, switched=False, **M450)
        assert ph.algorithm not in SWITCHED_ONLY_NAMES
        assert ph.time_s == pytest.approx(min(times.values()), rel=1e-12), (kind, p, n)
        cost = collective_cost(op, chip)
        assert cost.algorithm == ph.algorithm
        chosen.add(ph.algorithm)
    if kind == "all_reduce" and p == 6:
        # 10 (alpha + o) for ring against 8.8 us for halving-doubling: the latter while
        # small, ring past 2.2 us = 2 N/B (N > 1.32 MB), where the fold costs more
        assert chosen == {"halving_doubling", "ring"}


@pytest.mark.parametrize("kind, algorithm", [("all_reduce", "one_shot"), ("all_reduce", "two_shot"),
                                             ("all_gather", "direct"), ("reduce_scatter", "direct"),
                                             ("all_to_all", "direct")])
def test_forcing_a_switched_only_algorithm_on_a_ring_is_a_clear_error(kind, algorithm):
    ring = network.scale_up(chips.get("mtia450").replace(scaleup_topology="ring"))
    others = sorted(set(hand_times(kind, 8, 1.0, switched=False)))
    with pytest.raises(ValueError, match=rf"{kind}: algorithm '{algorithm}' does not run on a ring "
                                         rf"scale-up fabric; choose one of \[") as err:
        network.phase(kind, 8, 1e6, ring, algorithm=algorithm)
    for name in others:
        assert repr(name) in str(err.value)
    # the same algorithm runs on the switched fabric
    assert network.phase(kind, 8, 1e6, ROUND_SWITCHED, algorithm=algorithm).algorithm == algorithm


@pytest.mark.parametrize("p", [8, 13, 72])
def test_all_to_all_on_a_switched_fabric_is_one_exchange(p):
    chip = chips.get("mtia450")
    n = p * 1024 * 4  # 4 KB for each device
    op = collective_op("all_to_all", (p * 1024,), group=p)
    ph, = network.plan(op, chip)
    assert ph.algorithm == "direct"
    # one alpha, ceil((p-1)/L) issue rounds, (p-1)/p N on the wire
    expected = 1e-6 + math.ceil((p - 1) / 12) * 1e-7 + (p - 1) / p * n / 1.2e12
    assert ph.time_s == pytest.approx(expected, rel=1e-12)
    assert ph.time_s < (p - 1) * 1e-6  # not (p-1) alphas
    # on a ring it is p - 1 pairwise steps, each paying alpha
    ring_ph, = network.plan(op, chip.replace(scaleup_topology="ring"))
    assert ring_ph.algorithm == "pairwise"
    assert ring_ph.time_s == pytest.approx((p - 1) * (1e-6 + 1e-7 + n / p / 1.2e12), rel=1e-12)
    # payload_bytes, when given, is the buffer
    carried = collective_op("all_to_all", (p * 1024,), group=p, payload_bytes=n / 2)
    assert network.plan(carried, chip)[0].time_s == pytest.approx(
        1e-6 + math.ceil((p - 1) / 12) * 1e-7 + (p - 1) / p * (n / 2) / 1.2e12, rel=1e-12)


# -- 3. acceptance figures ---------------------------------------------------

@pytest.mark.parametrize("dtype, elements", [(jnp.float32, 4096), (jnp.bfloat16, 8192)])
def test_a_16_kb_all_reduce_over_72_mtia450_takes_at_most_20_us(dtype, elements):
    mesh = mtia_jax.make_mesh((72,), ("model",), chip="mtia450")
    x = jax.ShapeDtypeStruct((72, elements), dtype)
    report = mtia_jax.estimate(lambda x: x.sum(0), x, chip="mtia450", mesh=mesh,
                               in_shardings=(P("model"),), out_shardings=P())
    kernel, = network_kernels(report)
    assert kernel.kind == "all_reduce" and kernel.algorithm == "one_shot"
    n = 16 * 1024
    # one-shot: 71 messages on 12 links (6 issue rounds) and 71 N bytes
    one_shot = 1e-6 + 6 * 1e-7 + 71 * n / 1.2e12
    times = hand_times("all_reduce", 72, n, switched=True, **M450)
    assert one_shot == pytest.approx(min(times.values()), rel=1e-12)
    assert kernel.transfer_s == pytest.approx(one_shot, rel=1e-12)
    assert kernel.collective_bytes == pytest.approx(71 * n)
    assert kernel.time_s <= 20e-6
    assert report.collective_time_s <= 20e-6
    assert report.time_s <= 20e-6
    # the op alone, as the cost model prices it
    cost = collective_cost(collective_op("all_reduce", (elements,), dtype, group=72), chips.get("mtia450"))
    assert cost.time_s == pytest.approx(one_shot, rel=1e-12) and cost.time_s <= 20e-6


def test_an_all_gather_overlaps_a_memory_bound_kernel():
    mesh = mtia_jax.make_mesh((8,), ("model",), chip="mtia450")
    A = jax.ShapeDtypeStruct((8 * 2**20 * 2,), jnp.float32)
    X = jax.ShapeDtypeStruct((2**28,), jnp.float32)
    kw = dict(chip="mtia450", mesh=mesh)

    def both(a, x):
        return a * 1, x + 1

    both_r = mtia_jax.estimate(both, A, X, in_shardings=(P("model"), P()), out_shardings=(P(), P()), **kw)
    gather_r = mtia_jax.estimate(lambda a: a * 1, A, in_shardings=(P("model"),), out_shardings=P(), **kw)
    add_r = mtia_jax.estimate(lambda x: x + 1, X, in_shardings=(P(),), out_shardings=P(), **kw)
    assert both_r.time_s <= 1.3 * max(gather_r.time_s, add_r.time_s)
    kernel, = network_kernels(both_r)
    assert kernel.kind == "all_gather"
    # the gather (64 MB result, 8 MB each) by hand: direct, one hop, 7 messages, 7/8 N
    n = 8 * 2**20 * 2 * 4
    assert kernel.algorithm == "direct"
    assert kernel.transfer_s == pytest.approx(1e-6 + 1e-7 + 7 / 8 * n / 1.2e12, rel=1e-12)


def _llama_decode(model):
    """benchmarks/scaling.py's step(config, data=1, model)."""
    config = programs.LLAMA_CONFIGS["llama3-70b"]
    mesh = programs.llama_mesh(config, 1, model, chip="mtia450")
    fn = functools.partial(programs.llama_decode_step, heads=config["heads"], kv_heads=config["kv_heads"])
    return mtia_jax.estimate(fn, *programs.llama_shapes(config, 8, KV_LENGTH), chip="mtia450", mesh=mesh,
                             in_shardings=programs.llama_shardings(config, model), donate_argnums=(1, 2))


KV_LENGTH = 4096


def test_llama3_70b_decode_on_64_chips_is_no_slower_than_1_1x_its_time_on_8():
    """Above 8 chips the 8 KV heads are shared by groups of devices
    (programs.llama_mesh): each layer still needs Megatron's two all-reduces."""
    eight, sixty_four = _llama_decode(8), _llama_decode(64)
    assert sixty_four.time_s <= 1.1 * eight.time_s
    # every collective of both is priced on the switched scale-up fabric
    for report in (eight, sixty_four):
        kernels = network_kernels(report)
        assert kernels
        assert all(k.scale_out_s == 0 and k.scale_out_bytes == 0 for k in kernels)
        assert all(k.algorithm in ("one_shot", "two_shot", "direct", "ring", "halving_doubling",
                                   "recursive_doubling", "pairwise", "point_to_point") for k in kernels)


# -- 4. across scale-up domains ----------------------------------------------

def pods():
    return mtia_jax.make_mesh((2, 72), ("pod", "model"), chip="mtia450", scale_out_axes=("pod",))


def test_a_mesh_of_two_racks_is_accepted_when_the_pod_axis_is_marked():
    mesh = pods()
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"pod": 2, "model": 72}
    assert mesh_lib.scale_out_axes(mesh) == ("pod",)


def test_a_mesh_larger_than_a_domain_without_marking_names_the_domain_size():
    with pytest.raises(ValueError, match=r"146 devices in one scale-up domain, more than mtia450's 72"):
        mtia_jax.make_mesh((2, 73), ("pod", "model"), chip="mtia450")
    # marking the pod axis does not make 73 fit in a domain of 72
    with pytest.raises(ValueError, match=r"73 devices in one scale-up domain, more than mtia450's 72"):
        mtia_jax.make_mesh((2, 73), ("pod", "model"), chip="mtia450", scale_out_axes=("pod",))


def _hand_phase(kind, p, n, fabric):
    times = hand_times(kind, p, n, switched=True, **fabric)
    return min(times.values())


@pytest.mark.parametrize("elements", [4096, 2**22])
def test_an_all_reduce_over_both_axes_is_planned_hierarchically(elements):
    mesh = pods()
    x = jax.ShapeDtypeStruct((144, elements), jnp.float32)
    report = mtia_jax.estimate(lambda x: x.sum(0), x, chip="mtia450", mesh=mesh,
                               in_shardings=(P(("pod", "model")),), out_shardings=P())
    kernel, = network_kernels(report)
    n = elements * 4
    # reduce-scatter inside the rack, all-reduce of N/72 across the 2 racks, all-gather inside
    rs = _hand_phase("reduce_scatter", 72, n, M450)
    ar = _hand_phase("all_reduce", 2, n / 72, M450_OUT)
    ag = _hand_phase("all_gather", 72, n, M450)
    assert kernel.transfer_s == pytest.approx(rs + ar + ag, rel=1e-12)
    assert kernel.scale_out_s == pytest.approx(ar, rel=1e-12)
    # across 2 racks one-shot sends the N/72 shard to the other rack once
    assert ar == pytest.approx(5e-6 + 1e-7 + n / 72 / 1e11, rel=1e-12)
    assert kernel.scale_out_bytes == pytest.approx(n / 72)
    assert kernel.collective_bytes == pytest.approx(71 / 72 * n + n / 72 + 71 / 72 * n)
    assert kernel.algorithm.startswith("hierarchical[reduce_scatter:")
    assert "all_reduce:one_shot(2, scale-out)" in kernel.algorithm
    # the op's plan
    op = next(op for op in report.module.ops if op.kind == "all_reduce")
    assert (op.attrs["group"], op.attrs["scale_out_group"]) == (144, 2)
    phases = network.plan(op, chips.get("mtia450"))
    assert [(ph.kind, ph.fabric, ph.group, ph.nbytes) for ph in phases] == [
        ("reduce_scatter", "scale-up", 72, n), ("all_reduce", "scale-out", 2, n / 72),
        ("all_gather", "scale-up", 72, n)]


def test_an_all_gather_and_a_reduce_scatter_over_both_axes_are_hierarchical():
    mesh = pods()
    n = 144 * 64 * 4  # the gathered result / the reduce-scattered operand
    gather = mtia_jax.estimate(lambda x: x * 2, jax.ShapeDtypeStruct((144 * 64,), jnp.float32),
                               chip="mtia450", mesh=mesh, in_shardings=(P(("pod", "model")),),
                               out_shardings=P())
    kernel, = network_kernels(gather)
    # across racks first on the N/72 the rack will hold, then inside on N
    out = _hand_phase("all_gather", 2, n / 72, M450_OUT)
    assert kernel.transfer_s == pytest.approx(out + _hand_phase("all_gather", 72, n, M450), rel=1e-12)
    assert kernel.scale_out_s == pytest.approx(out, rel=1e-12)
    assert kernel.scale_out_bytes == pytest.approx(n / 144)
    scatter = mtia_jax.estimate(lambda y: y.sum(0), jax.ShapeDtypeStruct((144, 144 * 64), jnp.float32),
                                chip="mtia450", mesh=mesh, in_shardings=(P(("pod", "model")),),
                                out_shardings=P(("pod", "model")))
    kernel, = network_kernels(scatter)
    assert kernel.kind == "reduce_scatter"
    # inside on N, then across racks on the N/72 shard
    out = _hand_phase("reduce_scatter", 2, n / 72, M450_OUT)
    assert kernel.transfer_s == pytest.approx(_hand_phase("reduce_scatter", 72, n, M450) + out, rel=1e-12)
    assert kernel.scale_out_s == pytest.approx(out, rel=1e-12)


def test_scale_out_time_and_bytes_are_nonzero_exactly_for_collectives_crossing_racks():
    mesh = pods()
    s = jax.ShapeDtypeStruct((144, 1024), jnp.float32)
    report = mtia_jax.estimate(lambda x, y, z: (x.sum(0), y.sum(0), z.sum(0)), s, s, s, chip="mtia450",
                               mesh=mesh, in_shardings=(P(("pod", "model")), P("model"), P("pod")),
                               out_shardings=(P(), P(), P()))
    kernels = network_kernels(report)
    assert len(kernels) == 3
    n = 1024 * 4
    by_axes = {}
    for k in kernels:
        op = report.module.ops[int(k.path)]
        assert op.kind == "all_reduce"
        by_axes[op.attrs["axes"]] = k
        crossing = "pod" in op.attrs["axes"]
        assert (k.scale_out_s > 0) == crossing and (k.scale_out_bytes > 0) == crossing
        assert ("scale-out" in k.algorithm) == crossing
    # over "pod" alone: one phase on the scale-out network, one-shot to the other rack
    pod = by_axes[("pod",)]
    assert pod.algorithm == "one_shot@scale-out"
    assert pod.transfer_s == pytest.approx(5e-6 + 1e-7 + n / 1e11, rel=1e-12)
    assert pod.scale_out_s == pytest.approx(pod.transfer_s, rel=1e-12)
    assert pod.scale_out_bytes == pytest.approx(n)
    # over "model" alone: inside the rack
    model = by_axes[("model",)]
    assert model.algorithm == "one_shot"
    assert model.transfer_s == pytest.approx(1e-6 + 6e-7 + 71 * n / 1.2e12, rel=1e-12)
    assert (model.scale_out_s, model.scale_out_bytes) == (0.0, 0.0)
    assert by_axes[("pod", "model")].algorithm.startswith("hierarchical[")


def test_describe_names_the_fabric():
    chip = chips.get("mtia450")
    pod = collective_op("all_reduce", (1024,), group=2, scale_out_group=2)
    assert network.describe(network.plan(pod, chip)) == "one_shot@scale-out"
    assert network.describe(network.plan(collective_op("all_reduce", (1024,), group=8), chip)) == "one_shot"
    assert network.describe(network.plan(collective_op("all_reduce", (1024,), group=1), chip)) == "local"
    both = network.describe(network.plan(collective_op("all_reduce", (1024,), group=144, scale_out_group=2),
                                         chip))
    assert both == ("hierarchical[reduce_scatter:direct(72) + all_reduce:one_shot(2, scale-out) "
                    "+ all_gather:direct(72)]")


def test_as_text_of_a_compiled_program_shows_the_chosen_algorithm():
    mesh = pods()
    x = jax.ShapeDtypeStruct((144, 4096), jnp.float32)
    compiled = mtia_jax.jit(lambda x: x.sum(0), chip="mtia450",
                            in_shardings=(NamedSharding(mesh, P(("pod", "model"))),),
                            out_shardings=NamedSharding(mesh, P())).lower(x).compile()
    text = compiled.as_text()
    assert ("algorithm=hierarchical[reduce_scatter:direct(72) + all_reduce:one_shot(2, scale-out) "
            "+ all_gather:direct(72)]") in text
    assert "group=144, scale_out_group=2" in text
    # the estimate's report has the same module
    report = mtia_jax.estimate(lambda x: x.sum(0), x, chip="mtia450", mesh=mesh,
                               in_shardings=(P(("pod", "model")),), out_shardings=P())
    assert "scale_out_group=2, algorithm=hierarchical[" in report.module.as_text()
    # inside one rack
    one_rack = mtia_jax.make_mesh((72,), ("model",), chip="mtia450")
    compiled = mtia_jax.jit(lambda x: x.sum(0), chip="mtia450",
                            in_shardings=(NamedSharding(one_rack, P("model")),),
                            out_shardings=NamedSharding(one_rack, P())).lower(
        jax.ShapeDtypeStruct((72, 4096), jnp.float32)).compile()
    assert "group=72, algorithm=one_shot}" in compiled.as_text()


def test_a_shard_map_over_a_marked_mesh_crosses_racks_with_or_without_mesh_argument():
    """A psum over "pod" inside a shard_map over the two-rack mesh crosses the
    scale-out network whether or not ``mesh=`` is also passed to
    ``estimate``: the shard_map carries the mesh."""
    mesh = pods()

    def f(x):
        return jax.shard_map(lambda x: jax.lax.psum(x, "pod"), mesh=mesh, in_specs=P("pod", "model"),
                             out_specs=P(None, "model"), check_vma=False)(x)

    x = jax.ShapeDtypeStruct((2, 72 * 4096), jnp.float32)
    n = 4096 * 4
    for kwargs in ({"mesh": mesh}, {}):
        kernel, = network_kernels(mtia_jax.estimate(f, x, chip="mtia450", **kwargs))
        assert kernel.algorithm == "one_shot@scale-out", kwargs
        assert kernel.transfer_s == pytest.approx(5e-6 + 1e-7 + n / 1e11, rel=1e-12), kwargs
        assert kernel.scale_out_bytes == pytest.approx(n), kwargs


# mtia450, and a what-if whose scale-out network is fast enough that the exchange
# inside the rack is the slower half of a large all-to-all
FAST_SCALE_OUT = dict(scaleout_bandwidth=1e14)


def _all_to_all_across_racks(fast, elements):
    chip = chips.get("mtia450").replace(**(FAST_SCALE_OUT if fast else {}))
    op = collective_op("all_to_all", (elements,), group=144, scale_out_group=2)
    n = elements * 4
    out_b = 1e14 if fast else 1e11
    # the 72 shares for the other rack (N/2) leave on its one scale-out link: 72 messages;
    # the 71 for the rack's own devices (71/72 of N/2) on the scale-up fabric
    remote = 5e-6 + 72 * 1e-7 + (n / 2) / out_b
    local = 1e-6 + 6 * 1e-7 + 71 / 72 * (n / 2) / 1.2e12
    return chip, op, n, remote, local


@pytest.mark.parametrize("fast, elements", [(False, 144 * 256), (True, 2**25)])
def test_all_to_all_across_racks_is_one_exchange_on_both_fabrics(fast, elements):
    chip, op, n, remote, local = _all_to_all_across_racks(fast, elements)
    assert (remote < local) == fast
    across, inside = network.plan(op, chip)
    assert (across.fabric, inside.fabric, inside.concurrent) == ("scale-out", "scale-up", True)
    assert across.time_s == pytest.approx(remote, rel=1e-12)
    assert inside.time_s == pytest.approx(local, rel=1e-12)
    assert network.elapsed((across, inside)) == pytest.approx(max(remote, local), rel=1e-12)
    assert across.sent_bytes + inside.sent_bytes == pytest.approx(n / 2 + 71 / 72 * n / 2)
    cost = collective_cost(op, chip)
    assert cost.time_s == pytest.approx(max(remote, local), rel=1e-12)
    assert cost.sent_bytes == pytest.approx(n / 2 + 71 / 72 * n / 2)


@pytest.mark.parametrize("fast, elements", [(False, 144 * 256), (True, 2**25)])
def test_all_to_all_across_racks_counts_the_remote_shares_as_scale_out(fast, elements):
    """Of the bytes a hierarchical all-to-all sends, the N/2 for the other
    rack cross the scale-out network, and the 71/72 of N/2 for the rack's own
    devices do not (``CollectiveCost.scale_out_bytes``: "of which across
    scale-up domains"); the collective crosses racks whichever half is
    slower, so its scale-out time is the remote half's, never zero."""
    chip, op, n, remote, local = _all_to_all_across_racks(fast, elements)
    cost = collective_cost(op, chip)
    assert cost.scale_out_bytes == pytest.approx(n / 2)
    assert cost.scale_out_s == pytest.approx(remote, rel=1e-12)


# -- 5. HBM traffic ----------------------------------------------------------

def _without_near_memory(name="mtia450"):
    spec = chips.get(name)
    return spec.replace(units=spec.units - {"near_memory_reduce"})


@pytest.mark.parametrize("dtype, itemsize, vector_class", [(np.float32, 4, "fp32"), (jnp.bfloat16, 2, "bf16")])
def test_all_reduce_hbm_bytes_with_and_without_near_memory_reduction(dtype, itemsize, vector_class):
    mtia = chips.get("mtia450")
    assert "near_memory_reduce" in mtia.units
    plain = _without_near_memory()
    p, elements = 8, 4096
    n = elements * itemsize
    op = collective_op("all_reduce", (elements,), dtype, group=p)
    # small: one-shot on mtia450, 7 N sent and 7 N reduced per device
    one_shot = 1e-6 + 1e-7 + 7 * n / 1.2e12
    sent, reduced = 7 * n, 7 * n
    near = collective_cost(op, mtia)
    assert near.algorithm == "one_shot" and near.sent_bytes == pytest.approx(sent)
    # read what it sends, write what it receives; the engine reads the local operand
    # once per reduced byte and writes the sum where the received bytes would land
    assert near.hbm_bytes == pytest.approx(2 * sent + reduced)
    assert near.time_s == pytest.approx(one_shot, rel=1e-12)
    far = collective_cost(op, plain)
    # received bytes written, read back with the operand, the sum written: three more passes
    assert far.hbm_bytes == pytest.approx(2 * sent + 3 * reduced)
    # and the vector units add one element per reduced element
    vector = plain.vector_flops[vector_class]
    assert far.time_s == pytest.approx(one_shot + reduced / itemsize / vector, rel=1e-12)


def test_h100_reduces_on_its_vector_units():
    h100 = chips.get("h100")
    assert "near_memory_reduce" not in h100.units
    p, elements = 8, 4096
    n = elements * 4
    op = collective_op("all_reduce", (elements,), np.float32, group=p)
    # NVSwitch, 450 GB/s, 1 us, 0.5 us per message, 18 links: one-shot (1.5 us + 7 N/B)
    # beats two-shot (3 us + 2 (7/8) N/B) at 16 KB
    times = hand_times("all_reduce", p, n, switched=True, B=450e9, alpha=1e-6, o=5e-7, L=18)
    assert min(times, key=times.get) == "one_shot"
    cost = collective_cost(op, h100)
    assert cost.algorithm == "one_shot"
    assert cost.hbm_bytes == pytest.approx(2 * 7 * n + 3 * 7 * n)
    assert cost.time_s == pytest.approx(times["one_shot"] + 7 * elements / 66.9e12, rel=1e-9)


@pytest.mark.parametrize("kind", ["all_gather", "reduce_scatter", "all_to_all"])
def test_hbm_bytes_of_the_other_collectives(kind):
    p, elements = 8, 8192
    n = elements * 4  # the gathered result; the scattered or exchanged operand
    shape = (elements // p,) if kind == "all_gather" else (elements,)
    op = collective_op(kind, shape, group=p)
    assert network.buffer_bytes(op) == n
    mtia, plain = chips.get("mtia450"), _without_near_memory()
    share = 7 / 8 * n  # direct on the switched fabric: (p-1)/p N sent
    for chip, passes in ((mtia, 1), (plain, 3)):
        cost = collective_cost(op, chip)
        assert cost.algorithm == "direct"
        assert cost.sent_bytes == pytest.approx(share)
        if kind == "reduce_scatter":
            assert cost.hbm_bytes == pytest.approx(2 * share + passes * share)
        else:
            # nothing reduced; the device's own N/p copied into the result
            assert cost.hbm_bytes == pytest.approx(2 * share + 2 * n / p)


def test_the_hbm_bytes_of_a_hierarchical_all_reduce_and_the_network_kernel_hbm_time():
    mesh = pods()
    x = jax.ShapeDtypeStruct((144, 4096), jnp.float32)
    report = mtia_jax.estimate(lambda x: x.sum(0), x, chip="mtia450", mesh=mesh,
                               in_shardings=(P(("pod", "model")),), out_shardings=P())
    kernel, = network_kernels(report)
    n = 4096 * 4
    # sent: 71/72 N (reduce-scatter) + N/72 (one-shot to the other rack) + 71/72 N (all-gather)
    sent = 2 * 71 / 72 * n + n / 72
    # reduced near memory: 71/72 N in the rack and N/72 from the other rack
    reduced = 71 / 72 * n + n / 72
    own = n / 72  # the all-gather copies the device's own shard into the result
    assert kernel.hbm_bytes == pytest.approx(2 * sent + reduced + 2 * own)
    assert kernel.hbm_s == pytest.approx(kernel.hbm_bytes / 18.4e12, rel=1e-12)


def test_data_parallel_replicas_across_racks_send_nothing_between_them():
    """Llama-3-70B decode with its batch split over two racks ("pod", marked
    scale-out) and 8-way tensor parallel in each: every collective stays
    inside a rack, and each rack's step is one rack's step on its half."""
    config = programs.LLAMA_CONFIGS["llama3-70b"]
    fn = functools.partial(programs.llama_decode_step, heads=config["heads"], kv_heads=config["kv_heads"])
    shardings = programs.llama_shardings(config, 8)
    two = mtia_jax.make_mesh((2, 8), ("data", "model"), chip="mtia450", scale_out_axes=("data",))
    both = mtia_jax.estimate(fn, *programs.llama_shapes(config, 16, 1024), chip="mtia450", mesh=two,
                             in_shardings=shardings, donate_argnums=(1, 2))
    one = mtia_jax.estimate(fn, *programs.llama_shapes(config, 8, 1024), chip="mtia450",
                            mesh=programs.llama_mesh(config, 1, 8, chip="mtia450"),
                            in_shardings=shardings, donate_argnums=(1, 2))
    assert both.scale_out_s == 0 and both.scale_out_bytes == 0
    assert network_kernels(both) and all(k.algorithm == "one_shot" for k in network_kernels(both))
    assert both.time_s == pytest.approx(one.time_s, rel=1e-9)
