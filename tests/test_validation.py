"""The validation harness (benchmarks/validate.py) and the calibrated constants:
the published rows are complete, the fit recovers known constants, the cost
model applies the efficiencies as documented, and the catalogue holds what the
fit produces on the training rows."""

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import programs  # noqa: E402
import validate  # noqa: E402
import validation_data as data  # noqa: E402

import mtia_jax  # noqa: E402
from mtia_jax import chips  # noqa: E402
from runtime.collectives import collective_cost  # noqa: E402
from runtime.cost_model import program_cost  # noqa: E402
from kernels import kernels_with

TINY = programs.LLAMA_CONFIGS["tiny"]
OTHER = {"matmul_efficiency": 0.5, "hbm_efficiency": 0.7, "collective_efficiency": 0.4,
         "kernel_launch_s": 5e-6}


# ------------------------------------------------------------ the published rows

def test_every_row_has_a_source_a_split_and_its_conditions():
    assert len(data.ROWS) >= 12
    assert len({r.id for r in data.ROWS}) == len(data.ROWS)
    for r in data.ROWS:
        source = data.SOURCES[r.source]
        assert source.url.startswith("https://") and source.title and source.framework
        assert r.where and r.precision and r.chip in ("h100", "h200")
        assert r.measured > 0 and r.batch >= 1 and 1 <= r.tp <= r.gpus
        if r.metric == "samples_s_system":
            assert r.model.startswith("dlrm")
        else:
            assert r.input_len >= 1 and data.MODELS[r.model]["layers"] >= 1
            assert (r.output_len is None) == (r.metric == "first_token_s")
        # the split rule declared in validation_data: odd ids train, even ids held out
        assert r.split == ("train" if int(r.id[1:]) % 2 else "held-out")


def test_rows_span_decode_and_prefill_tensor_parallel_and_recommendation():
    llm = [r for r in data.ROWS if r.output_len]
    assert any(r.output_len >= 16 * r.input_len for r in llm)      # decode-dominated
    assert any(r.input_len >= 16 * r.output_len for r in llm)      # prefill-dominated
    assert any(r.metric == "first_token_s" for r in data.ROWS)
    assert any(r.tp > 1 for r in data.ROWS)
    assert {r.model for r in llm} >= {"llama2-7b", "llama2-13b", "llama2-70b"}
    assert any(r.model.startswith("dlrm") for r in data.ROWS)
    assert {r.chip for r in data.rows("train")} == {r.chip for r in data.rows("held-out")}


def test_the_llama2_shapes_have_the_published_parameter_counts():
    def count(name):
        params = programs.llama_shapes(data.MODELS[name], 1, 1)[0]
        return sum(math.prod(s.shape) for s in jax.tree.leaves(params))
    # Touvron et al. 2023: 7B, 13B, 70B (6.74e9, 13.0e9, 69.0e9 with the untied head)
    assert count("llama2-7b") == pytest.approx(6.74e9, rel=0.01)
    assert count("llama2-13b") == pytest.approx(13.0e9, rel=0.01)
    assert count("llama2-70b") == pytest.approx(69.0e9, rel=0.01)


def test_metrics_follow_the_source_definitions():
    # out_tps = output_seqlen x batch_size / total_latency / tp (Falcon180B-H200 source)
    row = next(r for r in data.ROWS if r.metric == "out_tok_s_gpu" and r.tp > 1)
    plan = validate.plan(row)
    assert plan.metric(lambda p: 2.0) == pytest.approx(
        row.output_len * row.batch / (2.0 * sum(c for c, _ in plan.terms)) / row.tp)
    decode = [c for c, p in plan.terms if p.kind == "decode"]
    assert sum(decode) == pytest.approx(row.output_len - 1)   # the first token comes from prefill
    dlrm_row = next(r for r in data.ROWS if r.metric == "samples_s_system")
    assert validate.plan(dlrm_row).metric(lambda p: 0.5) == pytest.approx(
        dlrm_row.gpus * dlrm_row.batch / 0.5 / 270)


def test_simpson_integrates_a_quadratic_step_time_exactly():
    row = next(r for r in data.ROWS if r.metric == "out_tok_s_gpu")
    terms = validate._decode_terms(row)
    step = lambda c: 1e-3 + 2e-6 * c + 3e-10 * c * c
    exact = sum(step(row.input_len + i) for i in range(1, row.output_len))
    assert sum(w * step(p.length) for w, p in terms) == pytest.approx(exact, rel=1e-4)


# ------------------------------------------------------------ the cost model

def test_cost_model_applies_the_efficiencies_as_documented():
    chip = chips.get("h100").replace(**OTHER)
    m = k = n = 4096
    shapes = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.bfloat16)]
    compiled = mtia_jax.jit(jnp.matmul, chip=chip).lower(*shapes).compile()
    kernel, = compiled.cost.kernels
    tile = compiled.module.ops[0].attrs["tile"]
    flops = 2 * m * n * k
    assert kernel.compute_s == pytest.approx(flops / (989.4e12 * tile.efficiency * 0.5), rel=1e-12)
    assert kernel.hbm_s == pytest.approx(kernel.hbm_bytes / (3.35e12 * 0.7), rel=1e-12)
    assert kernel.time_s == pytest.approx(max(kernel.compute_s, kernel.hbm_s) + 5e-6, rel=1e-12)
    # the roofline stays at the peaks
    nbytes = 2 * (m * k + k * n + m * n)
    assert compiled.cost.roofline_time_s == pytest.approx(max(flops / 989.4e12, nbytes / 3.35e12))


def test_collectives_run_at_the_achievable_link_bandwidth():
    # x (B, K) @ w (K, N) with K split over 2 devices: one all_reduce of the (B, N) partial sums
    mesh = mtia_jax.make_mesh((2,), ("model",), chip="h100")
    b, kk, nn = 256, 1024, 8192
    args = [jax.ShapeDtypeStruct((b, kk), jnp.float32), jax.ShapeDtypeStruct((kk, nn), jnp.float32)]
    rep = mtia_jax.estimate(jnp.matmul, *args, chip="h100", mesh=mesh,
                            in_shardings=(P(None, "model"), P("model", None)))
    op = next(validate.op_at(rep.module, k.path) for k in rep.cost.kernels if k.stream == "network")
    assert op.kind == "all_reduce"
    chip = chips.get("h100").replace(collective_efficiency=0.4)
    nbytes = b * nn * 4
    bw, hop, message = 450e9 * 0.4, chip.scaleup_link_latency_s, chip.scaleup_message_s
    # p = 2 on NVSwitch: one exchange of the whole buffer (one-shot: one hop, one message)
    # beats reduce-scatter + all-gather (two of each); plus the reduction of the received
    # buffer on the vector units (no near-memory reduction on H100)
    expected = hop + message + nbytes / bw + (b * nn) / chip.vector_peak(jnp.float32)
    cost = collective_cost(op, chip)
    assert cost.algorithm == "one_shot"
    assert cost.time_s == pytest.approx(expected, rel=1e-12)


@functools.lru_cache(maxsize=None)
def _tiny_reports():
    """A tensor-parallel prefill and decode of the tiny Llama on 2 H100s."""
    mesh = mtia_jax.make_mesh((1, 2), ("data", "model"), chip="h100")
    heads = dict(heads=TINY["heads"], kv_heads=TINY["kv_heads"])
    params, ck, cv, tokens, position = programs.llama_shapes(TINY, 4, 32, kv_dtype=jnp.float8_e4m3fn)
    policy = validate.PRECISIONS["fp8"][0]
    sh = programs.llama_shardings(TINY, 2)
    decode = mtia_jax.estimate(functools.partial(programs.llama_decode_step, **heads), params, ck, cv,
                               tokens, position, chip="h100", mesh=mesh, in_shardings=sh,
                               precision=policy, donate_argnums=(1, 2))
    prefill = mtia_jax.estimate(functools.partial(programs.llama_step, position=0, **heads), params, ck,
                                cv, jax.ShapeDtypeStruct((4, 32), jnp.int32), chip="h100", mesh=mesh,
                                in_shardings=sh[:4], precision=policy, donate_argnums=(1, 2))
    return decode, prefill


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("launch", ["graph", "eager"])
def test_closed_form_equals_the_cost_model_at_other_constants(which, launch):
    rep = _tiny_reports()[which]
    cost = validate.PhaseCost.of(rep, launch)
    assert cost.collectives, "the tensor-parallel program has collectives"
    for constants in (OTHER, validate.catalogue_constants()):
        modeled = program_cost(rep.module, rep.chip.replace(**constants), mode=launch).time_s
        assert cost.time_s(constants) == pytest.approx(modeled, rel=1e-9)


def test_attention_per_query_head_has_the_same_numbers_and_reads_the_cache_per_head():
    cfg = dict(TINY)
    heads = dict(heads=cfg["heads"], kv_heads=cfg["kv_heads"])
    group = cfg["heads"] // cfg["kv_heads"]
    assert group > 1
    shapes = programs.llama_shapes(cfg, 2, 16)
    key = iter(jax.random.split(jax.random.key(0), 64))
    params = jax.tree.map(lambda s: jax.random.normal(next(key), s.shape, jnp.float32) * 0.1,
                          shapes[0])
    cache = jnp.zeros(shapes[1].shape, jnp.float32)
    tokens, position = jnp.array([1, 2], jnp.int32), jnp.int32(3)
    args = (params, cache, cache, tokens, position)
    grouped = jax.jit(functools.partial(programs.llama_decode_step, **heads))(*args)
    per_head = jax.jit(functools.partial(programs.llama_decode_step, grouped_attention=False,
                                         **heads))(*args)
    np.testing.assert_allclose(per_head[0], grouped[0], rtol=1e-5, atol=1e-5)
    structs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    attention_bytes = lambda **kw: sum(k.hbm_bytes for k in kernels_with(mtia_jax.estimate(
        functools.partial(programs.llama_decode_step, **heads, **kw), *structs, chip="h100",
        donate_argnums=(1, 2)).cost.kernels, "flash_attention"))
    kv = 2 * cfg["layers"] * 2 * 16 * cfg["kv_heads"] * (cfg["d_model"] // cfg["heads"]) * 4
    assert attention_bytes() >= kv
    assert attention_bytes(grouped_attention=False) >= group * kv


def test_fp8_kv_cache_is_read_at_one_byte_per_element():
    decode = _tiny_reports()[0]
    attn = kernels_with(decode.cost.kernels, "flash_attention")
    assert attn
    dh = TINY["d_model"] // TINY["heads"]
    # per device: K and V of (L x B x S x KV/2 x Dh) FP8 elements, plus q and the output
    kv_bytes = 2 * TINY["layers"] * 4 * 32 * (TINY["kv_heads"] // 2) * dh
    assert kv_bytes <= sum(k.hbm_bytes for k in attn) < 1.5 * kv_bytes


# ------------------------------------------------------------ the fit

def _synthetic_cost(matrix, vector, hbm, counts, eager=True):
    """Kernels launched one after another (each after the one before it)."""
    n = len(matrix)
    return validate.PhaseCost(chips.get("h100"), np.array(matrix, float), np.array(vector, float),
                              np.array(hbm, float), np.zeros(n), np.array(counts, float),
                              tuple(((i - 1 if i else None, 1.0),) for i in range(n)), (), eager)


def test_fit_recovers_known_constants_from_synthetic_rows():
    phases = [
        _synthetic_cost([1.0, 0.2], [0.01, 0.0], [0.1, 0.05], [5, 5]),          # compute-bound
        _synthetic_cost([0.01, 0.0], [0.0, 0.001], [1.0, 0.3], [5, 5]),         # memory-bound
        _synthetic_cost([1e-5] * 3, [0.0] * 3, [1e-5] * 3, [7e3, 7e3, 6e3]),    # launch-bound
        _synthetic_cost([0.3, 1e-4], [0.0, 0.0], [0.2, 1e-4], [50, 1e4], eager=False),
    ]
    truth = {**validate.FIXED, "matmul_efficiency": 0.55, "kernel_launch_s": 4.2e-6}
    goals = [(1e3 / p.time_s(truth), lambda c, p=p: 1e3 / p.time_s(c)) for p in phases]
    fitted = validate.fit(goals)
    for name, value in truth.items():
        assert fitted[name] == pytest.approx(value, rel=2e-3), name


def test_graph_launches_pay_only_what_the_previous_kernel_leaves_exposed():
    # 10 executions of (a 1 us kernel, then a 0.2 us kernel), launch 0.5 us: in graph
    # mode the short kernel's launch hides behind the long one before it (exposed 0);
    # the first kernel, with nothing before it, pays its launch whole; eager pays all
    cost = _synthetic_cost([1e-5, 2e-6], [0.0, 0.0], [0.0, 0.0], [10, 10], eager=False)
    constants = {**validate.FIXED, "matmul_efficiency": 1.0, "kernel_launch_s": 0.5e-6}
    assert cost.time_s(constants) == pytest.approx(1e-5 + 2e-6 + 10 * 0.5e-6)
    eager = _synthetic_cost([1e-5, 2e-6], [0.0, 0.0], [0.0, 0.0], [10, 10], eager=True)
    assert eager.time_s(constants) == pytest.approx(1e-5 + 2e-6 + 20 * 0.5e-6)


def test_statistics_and_bound_flags_by_hand():
    st = validate.statistics(np.array([0.1, -0.2, 0.4, -0.05]))
    assert st["median"] == pytest.approx(0.15) and st["max"] == pytest.approx(0.4)
    assert st["bias"] == pytest.approx(0.0625) and st["within"] == pytest.approx(0.75)
    assert st["geomean"] == pytest.approx((0.1 * 0.2 * 0.4 * 0.05) ** 0.25)
    assert validate.at_bound({"matmul_efficiency": 1.0, "kernel_launch_s": 3e-6}) == ["matmul_efficiency"]


def test_held_out_errors_stay_within_the_documented_figures():
    errors = validate.row_errors()
    held_out = validate.statistics(np.array([errors[r.id] for r in data.rows("held-out")]))
    for name, documented in validate.DOCUMENTED_HELD_OUT.items():
        assert held_out[name] <= documented, (
            f"held-out {name} |error| {held_out[name]:.1%} exceeds the documented "
            f"{documented:.1%} (docs/validation.md)")


def test_catalogue_holds_the_fit_of_the_training_rows():
    train = data.rows("train")
    assert chips.HOPPER_FIT_ROWS == tuple(r.id for r in train)
    fitted = validate.fit(validate.targets(train, validate.phase_costs(train)))
    # the fit is rounded to SIG_DIGITS significant digits; a cost-model change that moves
    # it needs a re-fit: run benchmarks/validate.py and copy its values into HOPPER_FIT
    assert chips.HOPPER_FIT == pytest.approx(fitted, rel=10 ** (1 - validate.SIG_DIGITS) / 2), \
        f"mtia_jax.chips.HOPPER_FIT is stale: the fit on the training rows gives {fitted}"
    for chip in validate.FIT_CHIPS:
        spec = chips.get(chip)
        for name in validate.CALIBRATED:
            assert getattr(spec, name) == chips.HOPPER_FIT[name]
            assert spec.sources[name].startswith("derived: fitted on the training rows r01")


def test_mtia_entries_take_only_the_hbm_fraction_from_the_fit():
    for spec in chips.specs():
        if spec.vendor != "Meta":
            continue
        assert spec.hbm_efficiency == chips.HOPPER_FIT["hbm_efficiency"]
        assert spec.sources["hbm_efficiency"].startswith("derived: transferred from the H100/H200")
        assert spec.matmul_efficiency == spec.collective_efficiency == 1.0
        assert spec.sources["matmul_efficiency"].startswith("assumption")


# ------------------------------------------------------------ the new ChipSpec fields

def test_efficiency_fields_are_fractions_with_sources_and_overridable():
    for spec in chips.specs():
        for name in ("matmul_efficiency", "hbm_efficiency", "collective_efficiency"):
            assert 0 < getattr(spec, name) <= 1
            assert spec.sources[name].startswith(("derived", "assumption"))
    h100 = chips.get("h100")
    with pytest.raises(ValueError, match="matmul_efficiency"):
        h100.replace(matmul_efficiency=1.5)
    with pytest.raises(ValueError, match="hbm_efficiency"):
        h100.replace(hbm_efficiency=0.0)
    faster = h100.replace(hbm_efficiency=0.9)
    assert faster.sources["hbm_efficiency"] == "user override"
    assert h100.hbm_efficiency == chips.HOPPER_FIT["hbm_efficiency"]
    fields = [row[0] for row in h100.describe_rows()]
    assert {"matmul_efficiency", "hbm_efficiency", "collective_efficiency"} <= set(fields)
