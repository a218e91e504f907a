"""Per-group precision rules, ``mtia_jax.precision_search.sensitivity`` and ``search``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from models import transformer as tf
from mtia_jax import mx
from mtia_jax.precision import PrecisionPolicy
from mtia_jax.precision_search import search, sensitivity
from kernels import ops_of_kind
from mtia_jax.primitives.mx_matmul import mx_matmul

MX4, MX6, MX8 = (mx.get_format(f).name for f in ("mx4", "mx6", "mx8"))


def _normal(rng, shape, scale=1.0):
    return rng.standard_normal(shape).astype(np.float32) * scale


def _same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(f"u{got.dtype.itemsize}"), want.view(f"u{want.dtype.itemsize}"))


# ------------------------------------------------------------ rules: numerics and bytes

def two_layer(params, x):
    return jax.nn.gelu(x @ params["w1"]) @ params["w2"]


def _two_layer_args():
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(_normal(rng, (64, 96), 0.1)), "w2": jnp.asarray(_normal(rng, (96, 64), 0.1))}
    return params, jnp.asarray(_normal(rng, (8, 64)))


def test_rules_quantize_only_the_matching_weight_numerics_and_bytes():
    params, x = _two_layer_args()
    policy = PrecisionPolicy(rules=(("w1", "mx4"), ("w2", None)))
    compiled = mtia_jax.jit(two_layer, precision=policy).lower(params, x).compile()
    got = compiled(params, x)
    # numerics: w1 in MX4 (blocks along its input axis), w2 as it is
    by_hand = jax.jit(lambda p, x: jax.nn.gelu(mx_matmul(x, p["w1"], b_format="mx4")) @ p["w2"])
    _same_bits(got, by_hand(params, x))
    fake = {**params, "w1": mx.fake_quantize(params["w1"], "mx4", axis=0)}
    np.testing.assert_allclose(got, jax.jit(two_layer)(fake, x), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, jax.jit(two_layer)(params, x), atol=1e-4)
    (mm,) = ops_of_kind(compiled.module, "mx_matmul")
    assert (mm.params.get("a_format"), mm.params["b_format"]) == (None, MX4)
    assert len(ops_of_kind(compiled.module, "dot_general")) == 1  # w2's product is left alone
    # bytes: w1 read packed at MX4, w2 at float32, nothing else changes
    plain = mtia_jax.jit(two_layer).lower(params, x).compile()
    saved = plain.cost_analysis()["hbm_bytes"] - compiled.cost_analysis()["hbm_bytes"]
    assert saved == params["w1"].nbytes - mx.MXType("mx4").nbytes((64, 96), axis=0)
    w2_kernel = [k for k in compiled.cost.kernels if k.kind == "dot_general"]
    assert w2_kernel[0].hbm_bytes >= params["w2"].nbytes


def test_rules_first_match_wins_and_fall_back_to_weights():
    params, x = _two_layer_args()
    # w2 matches the first rule (None: float), w1 the catch-all; nothing else: weights
    policy = PrecisionPolicy(weights="mx8", rules={"w2": None, "w*": "mx4"})
    compiled = mtia_jax.jit(two_layer, precision=policy).lower(params, x).compile()
    assert [op.params["b_format"] for op in ops_of_kind(compiled.module, "mx_matmul")] == [MX4]
    # the argument's name prefixes the path too; a bare array is named by its parameter
    f = lambda x, w1, w2: two_layer({"w1": w1, "w2": w2}, x)
    for rules in ((("params/w1", "mx6"),), (("w1", "mx6"),)):
        fn = two_layer if rules[0][0].startswith("params") else f
        args = (params, x) if fn is two_layer else (x, params["w1"], params["w2"])
        compiled = mtia_jax.jit(fn, precision=PrecisionPolicy(weights="mx8", rules=rules)).lower(*args).compile()
        assert [op.params["b_format"] for op in ops_of_kind(compiled.module, "mx_matmul")] == [MX6, MX8]
    # a catch-all rule is the global format, bit for bit
    everything = mtia_jax.jit(two_layer, precision=PrecisionPolicy(rules=(("*", "mx4"),)))
    _same_bits(everything(params, x), mtia_jax.jit(two_layer, precision=PrecisionPolicy(weights="mx4"))(params, x))


def test_policy_with_rules_is_hashable_and_prints_them():
    a = PrecisionPolicy(weights="mx4", rules=[("layers/w_down", "mx8"), ("lm_head", None)])
    b = PrecisionPolicy(weights="mxfp4_e2m1", rules=(("layers/w_down", "mxfp8_e4m3"), ("lm_head", None)))
    assert a == b and hash(a) == hash(b) and a.rules == (("layers/w_down", MX8), ("lm_head", None))
    assert "rules=[layers/w_down: mxfp8_e4m3, lm_head: unchanged]" in str(a)
    assert a.weight_format(("params/layers/w_down", "layers/w_down")) == MX8
    assert a.weight_format("lm_head") is None and a.weight_format("layers/wq") == MX4


@pytest.mark.parametrize("rules, error, words", [
    ((("layers/wq", "mx5"),), ValueError, "rules[0] ('layers/wq'): unknown MX format 'mx5'"),
    ((("layers/wq", "mxfp8"),), ValueError, "ambiguous"),
    ((("", "mx4"),), ValueError, "is empty"),
    ((("/layers/wq", "mx4"),), ValueError, "empty path component"),
    ((("layers//wq", "mx4"),), ValueError, "empty path component"),
    ((("layers/w[qk", "mx4"),), ValueError, "unbalanced '['"),
    ((("ok", "mx4"), (3, "mx4")), TypeError, "rules[1]: the pattern must be a string"),
    ((("lm_head", 4),), TypeError, "the format must be an MX format name or None"),
    ((("lm_head",),), TypeError, "is not a (pattern, format) pair"),
    ("lm_head", TypeError, "rules must be a tuple of (pattern, format) pairs"),
])
def test_bad_rules_are_refused_clearly(rules, error, words):
    with pytest.raises(error) as info:
        PrecisionPolicy(weights="mx4", rules=rules)
    assert words in str(info.value)


# ------------------------------------------------------------ the tiny Llama: stacked groups

def _tiny_llama():
    cfg = tf.Config.preset("tiny")
    params = tf.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 9), 0, cfg.vocab)

    def loss(params, tokens):
        logits = tf.forward(cfg, params, tokens[:, :-1])[0]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    return loss, params, tokens


def test_sensitivity_of_the_tiny_llama_groups_one_per_stacked_parameter():
    loss, params, tokens = _tiny_llama()
    found = sensitivity(loss, params, tokens, ("mx4",))
    groups = {f"layers/{n}" for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")} | {"lm_head"}
    assert set(found.groups) == groups  # the embedding (a gather) and the norms are not matmul weights
    assert set(found.deltas) == {(g, MX4) for g in groups}
    assert all(np.isfinite(d) and d != 0.0 for d in found.deltas.values())
    assert found.base_loss == pytest.approx(float(jax.jit(loss)(params, tokens)), rel=1e-5)
    # one stacked group is every layer's weight, in the compiler's numerics: the swiglu
    # kernel with w_gate in MX4 and w_up as it is, bit for bit the program run on a
    # w_gate fake-quantized along its input axis
    fake = jax.tree.map(lambda x: x, params)
    fake["layers"]["w_gate"] = mx.fake_quantize(params["layers"]["w_gate"], "mx4", axis=-2)
    assert found.losses[("layers/w_gate", MX4)] == float(mtia_jax.jit(loss)(fake, tokens))
    text = found.table()
    assert "layers/w_gate" in text and "mx4" in text


def test_a_stacked_rule_gives_the_swiglu_kernel_one_format_per_weight():
    loss, params, tokens = _tiny_llama()
    policy = PrecisionPolicy(weights="mx8", rules=(("layers/w_gate", "mx4"), ("lm_head", None)))
    module, _ = mtia_jax.jit(loss, precision=policy).lower(params, tokens).optimize()
    (swiglu,) = ops_of_kind(module, "swiglu")
    assert swiglu.params["w_format"] == (MX4, MX8)
    formats = sorted(op.params["b_format"] for op in ops_of_kind(module, "mx_matmul"))
    assert formats == [MX8] * 5  # wq, wk, wv, wo, w_down; lm_head stays float
    report = mtia_jax.estimate(loss, params, tokens, precision=policy)
    assert "rules=[layers/w_gate: mxfp4_e2m1, lm_head: unchanged]" in report.table()


# ------------------------------------------------------------ sensitivity and search on an MLP

def mlp(params, x):
    h = jax.nn.relu(x @ params["w1"])
    h = jax.nn.relu(h @ params["w2"])
    return h @ params["w3"]


def mse(params, data):
    return jnp.mean((mlp(params, data["x"]) - data["y"]) ** 2)


S = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
# the latency is modeled at large bfloat16 shapes, where the weights' bytes decide it
BIG = ({"w1": S(8192, 16384), "w2": S(16384, 16384), "w3": S(16384, 4096)}, {"x": S(8, 8192), "y": S(8, 4096)})


@pytest.fixture(scope="module")
def regression():
    """A 3-layer MLP and the data it fits exactly. ``w2`` is fragile: hidden
    units that never fire hold outlier weights, one in every MX block of
    each column, whose shared scale flushes the block's other weights to
    zero in MX4 and MX6 (MX8 keeps them)."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = _normal(rng, (64, 128), 1 / 8), _normal(rng, (128, 128), 128 ** -0.5), \
        _normal(rng, (128, 16), 128 ** -0.5)
    dead = [32 * b + 5 for b in range(4)]
    w1[:, dead] = 0.0
    w2[dead, :] = 100.0
    params = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2), "w3": jnp.asarray(w3)}
    x = jnp.asarray(_normal(rng, (256, 64)))
    data = {"x": x, "y": jax.jit(mlp)(params, x)}
    return params, data, sensitivity(mse, params, data, ("mx4", "mx8"))


def test_sensitivity_ranks_the_fragile_layer_first(regression):
    params, data, found = regression
    assert found.groups == ("w1", "w2", "w3") and found.formats == (MX4, MX8)
    assert found.ranking("mx4")[0] == "w2"
    assert found.delta("w2", "mx4") > 20 * max(found.delta("w1", "mx4"), found.delta("w3", "mx4"))
    assert found.delta("w2", "mx8") < found.delta("w1", "mx4")  # fine in MX8
    assert all(d > 0 for d in found.deltas.values())
    # user groups: patterns, one group each
    both = sensitivity(mse, params, data, "mx4", groups=("w[13]",))
    assert both.groups == ("w[13]",) and both.delta("w[13]", "mx4") > found.delta("w1", "mx4")


def _search(regression, budget):
    params, data, found = regression
    return search(mse, params, data, budget=budget, chip="mtia450", formats=("mx4", "mx8"),
                  cost_args=BIG, sensitivities=found)


def test_search_with_a_generous_budget_quantizes_everything_to_mx4(regression):
    result = _search(regression, 1e9)
    assert result.formats == {"w1": MX4, "w2": MX4, "w3": MX4}
    assert result.policy == PrecisionPolicy(rules=(("w1", MX4), ("w2", MX4), ("w3", MX4)))
    assert result.time_after_s < 0.5 * result.time_before_s
    assert "w2: mx8 -> mx4" in result.table()


def test_search_with_no_budget_quantizes_nothing(regression):
    result = _search(regression, 0.0)
    assert result.policy == PrecisionPolicy() and result.loss == result.base_loss
    assert result.time_after_s == result.time_before_s
    assert result.steps and not any(s.accepted for s in result.steps)


def test_search_within_a_budget_keeps_the_fragile_layer_wide(regression):
    params, data, found = regression
    budget = 3 * (found.delta("w1", "mx4") + found.delta("w3", "mx4") + found.delta("w2", "mx8"))
    assert budget < found.delta("w2", "mx4")
    result = _search(regression, budget)
    assert result.formats == {"w1": MX4, "w2": MX8, "w3": MX4}
    assert 0 < result.loss - result.base_loss <= budget
    assert result.loss == [s.loss for s in result.steps if s.accepted][-1]
    assert result.time_after_s < result.time_before_s
    refused = [s for s in result.steps if not s.accepted]
    assert refused and all(s.group == "w2" for s in refused)


def test_search_with_validation_data_keeps_the_budget_there_too(regression):
    params, data, found = regression
    budget = 3 * (found.delta("w1", "mx4") + found.delta("w3", "mx4") + found.delta("w2", "mx8"))
    # the same network on inputs 3x larger: every weight error costs 9x the squared error
    wide = {"x": 3 * data["x"], "y": jax.jit(mlp)(params, 3 * data["x"])}
    result = search(mse, params, data, budget=budget, chip="mtia450", formats=("mx4", "mx8"),
                    cost_args=BIG, sensitivities=found, validation_data=wide)
    assert result.validation_base_loss == pytest.approx(0.0, abs=1e-6)
    assert result.validation_loss - result.validation_base_loss <= budget
    assert result.loss - result.base_loss <= budget
    plain = _search(regression, budget).formats
    assert result.formats != plain  # the validation refused a step the calibration data allowed
    assert any("validation loss increase" in s.reason for s in result.steps if not s.accepted)
    assert "validation loss" in result.table()


def test_sensitivity_and_search_errors(regression):
    params, data, found = regression
    with pytest.raises(ValueError, match="group 'w9' matches no parameter of params; its paths are: w1, w2, w3"):
        sensitivity(mse, params, data, "mx4", groups=("w9",))
    with pytest.raises(ValueError, match="unknown MX format 'mx3'"):
        sensitivity(mse, params, data, ("mx4", "mx3"))
    with pytest.raises(ValueError, match="must return a scalar loss"):
        sensitivity(lambda p, d: mlp(p, d["x"]), params, data, "mx4", groups=("w1",))
    with pytest.raises(ValueError, match="budget must be a finite number >= 0"):
        search(mse, params, data, budget=-1.0, chip="mtia450")
    with pytest.raises(ValueError, match="measured with other groups"):
        search(mse, params, data, budget=1.0, chip="mtia450", sensitivities=found,
               base=PrecisionPolicy(activations="mx8"))


def test_a_rule_matching_no_argument_of_its_program_is_a_clear_error():
    f = lambda params, x: x @ params["w1"] @ params["w2"]
    params, x = {"w1": jnp.ones((32, 32)), "w2": jnp.ones((32, 32))}, jnp.ones((2, 32))
    typo = PrecisionPolicy(weights="mx8", rules=(("w_1", "mx4"),))
    with pytest.raises(ValueError, match=r"rule \('w_1', 'mxfp4_e2m1'\) matches no argument.*\['w1', 'w2', 'x'\]"):
        mtia_jax.jit(f, precision=typo)(params, x)
    # a policy of an enclosing block serves unrelated programs: its rules need not match each
    with mtia_jax.precision_policy(typo):
        assert mtia_jax.jit(f)(params, x).shape == (2, 32)
