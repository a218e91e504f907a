"""Pipeline parallelism (mtia_jax/pipeline.py): the schedule simulation
against the closed-form GPipe step time, the stage split of the transformer
against its unsplit forward pass, the sends' fabric, and the acceptance
estimate: Llama-3-405B prefill of 8 x 4096 tokens on two racks of 72 mtia450."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import mtia_jax
from lowering import network
from models import transformer as tf
from mtia_jax.pipeline import simulate

S = jax.ShapeDtypeStruct


# ------------------------------------------------------------ the schedule

@pytest.mark.parametrize("stages, microbatches, t, c", [
    (2, 8, 1.0, 0.0), (4, 4, 1.0, 0.25), (18, 8, 10e-3, 0.1e-3), (3, 1, 2.0, 0.5)])
def test_uniform_schedule_takes_the_gpipe_closed_form(stages, microbatches, t, c):
    compute, sends = simulate([t] * stages, [c] * (stages - 1), microbatches)
    end = max(slot.end_s for slot in compute)
    # the last microbatch leaves stage 0 at M t, then crosses S - 1 sends and stages
    assert end == pytest.approx(microbatches * t + (stages - 1) * (t + c))
    assert len(compute) == stages * microbatches and len(sends) == (stages - 1) * microbatches
    # a stage never runs two microbatches at once, and runs them in order
    for s in range(stages):
        mine = sorted((x for x in compute if x.stage == s), key=lambda x: x.microbatch)
        assert all(a.end_s <= b.start_s + 1e-15 for a, b in zip(mine, mine[1:]))


def test_a_send_slower_than_a_stage_sets_the_pace():
    # sends of 3 s after stages of 1 s: each stage's link is busy back to back
    compute, sends = simulate([1.0, 1.0], [3.0], 4)
    assert max(x.end_s for x in compute) == pytest.approx(1.0 + 4 * 3.0 + 1.0)
    link = sorted(sends, key=lambda x: x.microbatch)
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(link, link[1:]))


def test_the_slowest_stage_sets_the_steady_state():
    compute, _ = simulate([1.0, 2.0, 1.0], [0.0, 0.0], 5)
    # the 2 s stage starts at 1 s and then runs its 5 microbatches back to back
    assert max(x.end_s for x in compute) == pytest.approx(1.0 + 5 * 2.0 + 1.0)


# ------------------------------------------------------------ stages of the transformer

def test_prefill_stages_applied_in_order_equal_the_unsplit_forward_pass():
    cfg = tf.Config.preset("tiny")
    params = tf.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab)
    lengths = jnp.array([16, 11])
    logits, ks, vs = jax.jit(functools.partial(tf.forward, cfg))(params, tokens, lengths)
    x, got_k, got_v = tokens, [], []
    for s in range(cfg.layers):
        fn = mtia_jax.jit(functools.partial(tf.prefill_stage, cfg, first=s == 0, last=s == cfg.layers - 1))
        x, k, v = fn(tf.stage_params(cfg, params, s, cfg.layers), x, lengths)
        got_k.append(k)
        got_v.append(v)
    np.testing.assert_allclose(x, tf.last_token_logits(logits, lengths), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.concatenate(got_k), ks, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(np.concatenate(got_v), vs, rtol=2e-5, atol=2e-5)


def test_stage_params_hold_each_layer_once_and_the_ends_on_the_end_stages():
    cfg = tf.Config.preset("llama3-405b")
    full = tf.param_shapes(cfg)
    parts = [tf.stage_params(cfg, full, s, 18) for s in range(18)]
    assert sum(p["layers"]["wq"].shape[0] for p in parts) == cfg.layers
    assert [sorted(p) for p in (parts[0], parts[1], parts[-1])] == [
        ["embed", "layers"], ["layers"], ["final_norm", "layers", "lm_head"]]
    with pytest.raises(ValueError, match="do not split into 4 pipeline stages"):
        tf.stage_params(cfg, full, 0, 4)


# ------------------------------------------------------------ estimates

def _tiny_stages(cfg, mesh_model: int, count: int, microbatch: int, seq: int):
    return tf.pipeline_stages(cfg, count, microbatch, seq,
                              mtia_jax.make_mesh((mesh_model,), ("model",), chip="mtia450"))


def test_sends_between_racks_use_the_scale_out_network_and_the_rest_scale_up():
    cfg = tf.Config.preset("tiny")
    mesh = mtia_jax.make_mesh((2, 1, 4), ("rack", "stage", "model"), chip="mtia450", scale_out_axes=("rack",))
    chip = mtia_jax.chips.get("mtia450")
    report = mtia_jax.estimate_pipeline(_tiny_stages(cfg, 4, 2, 1, 16), mesh=mesh, axis=("rack", "stage"),
                                        microbatches=3, chip="mtia450")
    (send,) = report.sends
    nbytes = 1 * 16 * cfg.d_model * 4  # one microbatch's hidden states, f32, replicated over "model"
    out = network.scale_out(chip)
    assert send.fabric == "scale-out"
    assert send.time_s == pytest.approx(out.hop_s + out.message_s + nbytes / out.bandwidth)
    assert report.scale_out_bytes == pytest.approx(3 * nbytes)
    # two stages: the first microbatch crosses both and the send, then the
    # slowest of stage 0, stage 1 and the link paces the other two
    t0, t1 = report.stage_time_s
    assert report.time_s == pytest.approx(t0 + send.time_s + t1 + 2 * max(t0, t1, send.time_s))
    assert report.bubble_s == pytest.approx(report.time_s - 3 * max(t0, t1))
    # the same pipeline inside one rack sends over scale-up, faster
    mesh_in = mtia_jax.make_mesh((2, 4), ("stage", "model"), chip="mtia450")
    inside = mtia_jax.estimate_pipeline(_tiny_stages(cfg, 4, 2, 1, 16), mesh=mesh_in, axis="stage",
                                        microbatches=3, chip="mtia450")
    assert inside.sends[0].fabric == "scale-up" and inside.scale_out_s == 0.0
    assert inside.sends[0].time_s < send.time_s


def test_schedules_coincide_for_a_forward_pipeline():
    cfg = tf.Config.preset("tiny")
    mesh = mtia_jax.make_mesh((2, 4), ("stage", "model"), chip="mtia450")
    stages = _tiny_stages(cfg, 4, 2, 1, 16)
    gpipe, one_f_one_b = (mtia_jax.estimate_pipeline(stages, mesh=mesh, axis="stage", microbatches=4,
                                                     schedule=s, chip="mtia450") for s in ("gpipe", "1f1b"))
    assert gpipe.time_s == one_f_one_b.time_s


@pytest.mark.parametrize("kwargs, match", [
    (dict(axis="pipe"), "not a mesh axis"),
    (dict(axis="stage", microbatches=0), "positive integer"),
    (dict(axis="stage", schedule="interleaved"), "unknown schedule"),
    (dict(axis="model"), "2 stages for the mesh axes"),
])
def test_bad_pipelines_are_clear_errors(kwargs, match):
    cfg = tf.Config.preset("tiny")
    mesh = mtia_jax.make_mesh((2, 4), ("stage", "model"), chip="mtia450")
    with pytest.raises(ValueError, match=match):
        mtia_jax.estimate_pipeline(_tiny_stages(cfg, 4, 2, 1, 16), mesh=mesh,
                                   **{"microbatches": 2, **kwargs})


def test_stage_shardings_may_not_name_the_pipeline_axis():
    mesh = mtia_jax.make_mesh((2, 4), ("stage", "model"), chip="mtia450")
    stage = mtia_jax.PipelineStage(lambda x: x * 2, S((8, 8), jnp.float32), in_shardings=(P("stage"),))
    with pytest.raises(ValueError, match="name a pipeline axis"):
        mtia_jax.estimate_pipeline([stage, stage], mesh=mesh, axis="stage", microbatches=2)


def test_llama3_405b_prefill_on_two_racks_of_72(shapes_only):
    """8 sequences of 4096 tokens, 18 stages of 7 layers (9 per rack, over
    ("pod", "stage")), each stage tensor parallel over 8 chips: the bubble and
    the scale-out time are in the report."""
    cfg = tf.Config.preset("llama3-405b")
    mesh = mtia_jax.make_mesh((2, 9, 8), ("pod", "stage", "model"), chip="mtia450", scale_out_axes=("pod",))
    stages = _tiny_stages(cfg, 8, 18, 1, 4096)
    report = mtia_jax.estimate_pipeline(stages, mesh=mesh, axis=("pod", "stage"), microbatches=8, chip="mtia450")
    assert report.fits
    # one send crosses racks (stage 8 -> 9): 4096 x 16384 bf16 per device at scale-out bandwidth
    fabrics = [ph.fabric for ph in report.sends]
    assert fabrics.count("scale-out") == 1 and fabrics.index("scale-out") == 8
    chip = mtia_jax.chips.get("mtia450")
    assert report.scale_out_bytes == pytest.approx(8 * 4096 * cfg.d_model * 2)
    assert report.scale_out_s >= 8 * 4096 * cfg.d_model * 2 / chip.scaleout_bandwidth
    # uniform stages and sends far shorter than a stage: the bubble is close to (S-1)/(M+S-1)
    assert report.bubble_fraction == pytest.approx(17 / 25, abs=0.02)
    # each stage is at least its FLOPs at peak: 7 layers of 2 x 4096 x params, over 8 chips
    layer_params = sum(np.prod(w.shape[1:]) for name, w in stages[1].args[0]["layers"].items()
                       if w.ndim == 3)
    assert min(report.stage_time_s) >= 2 * 4096 * 7 * layer_params / 8 / chip.matmul_peak(jnp.bfloat16)
    text = report.table()
    assert "bubble" in text and "scale-out" in text and "modeled" in text
