"""The synthetic click logs and the trained DLRM of ``models.ctr_data``: the
metrics against hand-computed cases and a pairwise AUC, the data generator
deterministic and Zipf-like, the teacher a DLRM, the committed checkpoint
reloading to the AUC / NE recorded beside it, below the teacher's ceiling,
and training deterministic given its seed."""

import math

import jax
import numpy as np
import pytest

from models import ctr_data


def pairwise_auc(labels, scores):
    """O(n^2): the share of (positive, negative) pairs ordered right, ties one half."""
    labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
    pos, neg = scores[labels == 1][:, None], scores[labels == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


# ------------------------------------------------------------ metrics

@pytest.mark.parametrize("labels, scores, expected", [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),  # one of four pairs misordered
    ([0, 1], [0.5, 0.5], 0.5),                     # a tie counts one half
    ([0, 1, 0, 1], [1, 1, 2, 3], 0.625),           # (0.5 + 0 + 1 + 1) / 4
    ([1, 1, 0], [3, 2, 1], 1.0),
    ([1, 1, 0], [1, 2, 3], 0.0),
    ([0, 1, 1, 0, 0], [7, 7, 7, 7, 7], 0.5),       # all tied
])
def test_auc_hand_cases(labels, scores, expected):
    assert ctr_data.auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert pairwise_auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_auc_matches_the_pairwise_count_with_many_ties():
    rng = np.random.default_rng(0)
    for n, levels in ((50, 3), (400, 20), (1000, 1000000)):
        labels = (rng.random(n) < 0.3).astype(int)
        scores = np.round(rng.normal(labels * 0.7, 1.0) * levels / 4) / levels  # ties when levels is small
        assert ctr_data.auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)
        # invariant under a monotone map of the scores
        assert ctr_data.auc(labels, np.exp(3 * scores)) == pytest.approx(ctr_data.auc(labels, scores), abs=1e-12)


def test_normalized_entropy_hand_cases():
    # predicting the base rate everywhere: NE exactly 1
    assert ctr_data.normalized_entropy([1, 0, 0, 0], [0.25] * 4) == pytest.approx(1.0, abs=1e-12)
    # base rate 1/2, entropy ln 2; log loss (-ln 0.8 - ln 0.6) / 2
    ne = ctr_data.normalized_entropy([1, 0], [0.8, 0.4])
    assert ne == pytest.approx((-math.log(0.8) - math.log(0.6)) / (2 * math.log(2)), rel=1e-12)
    # an explicit base rate (the background CTR of another set)
    p = 0.1
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert ctr_data.normalized_entropy([1, 0], [0.8, 0.4], base_rate=p) == pytest.approx(
        (-math.log(0.8) - math.log(0.6)) / 2 / h, rel=1e-12)
    # confident and right: near 0; probabilities of 0 and 1 clipped, not infinite
    assert ctr_data.normalized_entropy([1, 0, 0], [1.0, 0.0, 0.0]) < 1e-12
    assert math.isfinite(ctr_data.normalized_entropy([1, 0], [0.0, 1.0]))
    with pytest.raises(ValueError, match="base rate"):
        ctr_data.normalized_entropy([0, 0], [0.1, 0.2])


# ------------------------------------------------------------ data and teacher

def test_data_is_deterministic_and_the_splits_differ():
    a = ctr_data.make_data(7, 3000, "heldout")
    b = ctr_data.make_data(7, 3000, "heldout")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.dense, ctr_data.make_data(7, 3000, "train").dense)
    assert not np.array_equal(a.dense, ctr_data.make_data(8, 3000, "heldout").dense)
    cfg = ctr_data.CONFIG
    assert a.dense.shape == (3000, cfg.dense_features) and a.dense.dtype == np.float32
    for t, ids in enumerate(a.sparse):
        assert ids.shape == (3000, cfg.multi_hot[t]) and ids.dtype == np.int32
        assert ids.max() < cfg.table_sizes[t] and (ids[:, 0] >= 0).all()  # 1..multi_hot ids, -1 padded
        # padding only after the ids of a bag
        assert not ((ids[:, :-1] < 0) & (ids[:, 1:] >= 0)).any()
    assert set(np.unique(a.labels)) == {0, 1}


def test_ids_are_zipf_distributed():
    data = ctr_data.make_data(0, 20000, "train")
    cfg = ctr_data.CONFIG
    for t in (0, 1):  # 10,000 and 4,000 rows
        ids = data.sparse[t][data.sparse[t] >= 0]
        counts = np.sort(np.bincount(ids, minlength=cfg.table_sizes[t]))[::-1]
        # the top 1% of ids take far more than 1% of the lookups; the median id is rare
        assert counts[:cfg.table_sizes[t] // 100].sum() > 0.4 * counts.sum()
        assert counts[0] > 100 * max(counts[cfg.table_sizes[t] // 2], 1)
        # log-frequency against log-rank over the head: the law's exponent
        rank = np.arange(1, 101)
        slope = np.polyfit(np.log(rank), np.log(counts[:100]), 1)[0]
        assert -1.35 < slope < -0.9, slope
        assert slope == pytest.approx(-ctr_data.ZIPF_EXPONENTS[t], abs=0.2)


def test_the_teacher_is_a_dlrm_and_labels_follow_its_probabilities():
    data = ctr_data.make_data(3, 4000, "heldout")
    params = jax.tree.map(lambda w: np.asarray(w, np.float32), ctr_data.teacher_params())
    z = ctr_data.logits(params, ctr_data.TEACHER_CONFIG, data)  # dlrm.forward, float32
    np.testing.assert_allclose(z, data.teacher_logits, rtol=1e-4, atol=1e-4)
    # the click rate is the mean teacher probability, within sampling noise
    p = 1 / (1 + np.exp(-data.teacher_logits))
    assert abs(data.labels.mean() - p.mean()) < 4 * math.sqrt(p.mean() / len(p))
    assert 0.03 < p.mean() < 0.25


# ------------------------------------------------------------ the committed checkpoint

@pytest.fixture(scope="module")
def committed():
    cfg, params = ctr_data.load()
    meta = ctr_data.read_meta()
    heldout = ctr_data.make_data(meta["seed"], meta["heldout_samples"], "heldout")
    return cfg, params, meta, heldout


def test_checkpoint_reloads_to_its_recorded_heldout_auc(committed):
    cfg, params, meta, heldout = committed
    assert cfg == ctr_data.CONFIG
    assert ctr_data.config_from_json(meta["teacher_config"]) == ctr_data.TEACHER_CONFIG
    auc, ne = ctr_data.heldout_auc(params, cfg, heldout)
    assert auc == pytest.approx(meta["student_auc"], rel=1e-6)
    assert ne == pytest.approx(meta["student_ne"], rel=1e-6)
    teacher_auc, teacher_ne = ctr_data.teacher_metrics(heldout)
    assert teacher_auc == pytest.approx(meta["teacher_auc"], rel=1e-9)
    assert teacher_ne == pytest.approx(meta["teacher_ne"], rel=1e-9)
    # below the ceiling, above the floor, and well above chance
    assert 0.7 < auc < teacher_auc < 0.85
    assert teacher_ne < ne < 0.95
    assert meta["steps"] * meta["batch"] <= meta["train_samples"]  # one pass at most


def test_checkpoint_is_small_float32_with_path_keys():
    from models import checkpoint

    file = ctr_data.CHECKPOINT_DIR / ctr_data.WEIGHTS_FILE
    assert file.stat().st_size < 2 << 20
    infos, _ = checkpoint.read_safetensors_header(file)
    assert {str(i.dtype) for i in infos.values()} == {"float32"}
    assert "tables/table_0" in infos and "top_mlp/w2" in infos and "cross/u1" in infos


def test_heldout_auc_does_not_depend_on_the_batching_and_runs_under_mx(committed):
    cfg, params, _, heldout = committed
    part = heldout.take(slice(0, 3000))
    a = ctr_data.heldout_auc(params, cfg, part, batch=1024)  # a short, padded last batch
    b = ctr_data.heldout_auc(params, cfg, part, batch=3000)
    assert a == pytest.approx(b, rel=1e-6)
    import mtia_jax

    mx8 = ctr_data.heldout_auc(params, cfg.replace(dtype="bfloat16"), part,
                               precision=mtia_jax.PrecisionPolicy(weights="mx8", activations="mx8"))
    assert mx8[0] == pytest.approx(a[0], abs=0.01)
    assert mx8 != a  # the policy did round something


# ------------------------------------------------------------ training

def test_training_is_deterministic_given_the_seed():
    data = ctr_data.make_data(0, 3 * 256, "train")
    run = lambda seed: ctr_data.train(ctr_data.CONFIG, data, steps=3, seed=seed, batch=256)
    (p1, h1), (p2, h2), (p3, _) = run(5), run(5), run(6)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert h1 == h2 and h1[-1]["step"] == 3 and math.isfinite(h1[-1]["loss"])
    assert not np.array_equal(np.asarray(p1["top_mlp"]["w0"]), np.asarray(p3["top_mlp"]["w0"]))
