"""DLRM and DLRM-DCNv2 (models/dlrm.py): the MLPerf preset against the published
shapes and parameter count, the model against an independent NumPy reference,
mtia_jax.jit against jax.jit, the nnx wrapper, the sharded model on 2x4 and
1-D meshes, estimate() of the MLPerf model from shapes, the synthetic data,
the AUC, input errors and the serving example."""

import functools
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mtia_jax
from models import dlrm
from models.dlrm import Config

TINY, TINY_DOT, MLPERF = (Config.preset(n) for n in ("tiny", "tiny-dot", "mlperf-dcnv2"))
BATCH = 16


@functools.lru_cache(maxsize=None)
def _params(cfg):
    return dlrm.init_params(cfg, jax.random.key(3))


@functools.lru_cache(maxsize=None)
def _batch(cfg, batch=BATCH, seed=1):
    return dlrm.synthetic_batch(cfg, batch, seed)


@functools.lru_cache(maxsize=None)
def _jax_forward(cfg):
    return jax.jit(functools.partial(dlrm.forward, cfg))


# ------------------------------------------------------------ the MLPerf preset

def test_mlperf_preset_has_the_published_shapes_and_parameter_count():
    # mlcommons/training recommendation_v2/torchrec_dlrm/README.MD
    assert MLPERF.table_sizes == (40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000,
                                  3067956, 405282, 10, 2209, 11938, 155, 4, 976, 14, 40000000,
                                  40000000, 40000000, 590152, 12973, 108, 36)
    assert max(MLPERF.table_sizes) == 40_000_000  # --max-ind-range=40000000
    assert MLPERF.multi_hot == (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27,
                                10, 3, 1, 1)
    assert (MLPERF.embed_dim, MLPERF.bottom_mlp, MLPERF.top_mlp) == (128, (512, 256, 128),
                                                                     (1024, 1024, 512, 256, 1))
    assert (MLPERF.interaction, MLPERF.cross_layers, MLPERF.cross_rank) == ("dcnv2", 3, 512)
    # derived by hand: 204,184,588 rows x 128; bottom 13*512+512 + 512*256+256 + 256*128+128;
    # cross 3 * (2 * 3456 * 512 + 3456) with 3456 = 27 * 128; top 3456*1024+1024 +
    # 1024*1024+1024 + 1024*512+512 + 512*256+256 + 256+1
    embedding = 204_184_588 * 128
    dense = 171_392 + 10_627_200 + 5_245_953
    assert dlrm.param_count(MLPERF) == embedding + dense == 26_151_671_809
    # the published fp32 checkpoint is 97.31 GB (mlcommons/inference dlrm_v2 README, `du`)
    assert dlrm.param_count(MLPERF) * 4 / 2**30 == pytest.approx(97.31, rel=5e-3)
    # stored parameters = the model's + the padding rows of the sharding layout
    stored = sum(math.prod(s.shape) for s in jax.tree.leaves(dlrm.param_shapes(MLPERF)))
    assert stored == dlrm.param_count(MLPERF) + dlrm.padding(MLPERF)["rows"] * 128


def test_table_plan_stores_every_table_once_and_keeps_padding_small():
    for cfg in (TINY, MLPERF):
        plan = dlrm.table_plan(cfg)
        tables = sorted(t for g in plan for t in g.tables)
        assert tables == list(range(cfg.num_tables))
        for g in plan:
            assert all(g.rows >= cfg.table_sizes[t] for t in g.tables)
            if g.placement == "row_wise":
                assert g.rows % cfg.row_align == 0
            else:
                assert len(g.tables) == cfg.stack_size
                assert all(cfg.table_sizes[t] < cfg.row_wise_min_rows for t in g.tables)
    # MLPerf: the 17 tables under 21,000 rows make two stacks of 8 (one of one-id bags, one
    # of bags of up to 6 ids); the one with the widest bags (11,938 rows, 9 ids) is left
    # over and stored alone, with the 9 larger tables
    stacks = [g for g in dlrm.table_plan(MLPERF) if g.placement == "table_wise"]
    singles = {g.tables[0] for g in dlrm.table_plan(MLPERF) if g.placement == "row_wise"}
    assert [g.width for g in stacks] == [1, 6]
    assert singles == {t for t, n in enumerate(MLPERF.table_sizes) if n >= 21000} | {14}
    pad = dlrm.padding(MLPERF)
    table_bytes = sum(MLPERF.table_sizes) * 128 * 4
    assert 0 < pad["bytes"] < 1e-3 * table_bytes   # under 0.1% of the tables' HBM


# ------------------------------------------------------------ numerics

def _numpy_forward(cfg, params, dense, sparse):
    """Independent float64 NumPy DLRM: pooled bags by loops, TorchRec's
    triu_indices for the dot interaction, the DCNv2 cross formula."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tables = {}
    for g in dlrm.table_plan(cfg):
        stored = p["tables"][g.name]
        for j, t in enumerate(g.tables):
            tables[t] = (stored if g.placement == "row_wise" else stored[j])[:cfg.table_sizes[t]]

    def mlp(w, x, relu_last):
        n = len(w) // 2
        for i in range(n):
            x = x @ w[f"w{i}"] + w[f"b{i}"]
            if i < n - 1 or relu_last:
                x = np.maximum(x, 0)
        return x

    x = mlp(p["bottom_mlp"], np.asarray(dense, np.float64), True)
    b = x.shape[0]
    pooled = np.zeros((b, cfg.num_tables, cfg.embed_dim))
    for t, ids in enumerate(sparse):
        for s in range(b):
            for i in np.asarray(ids)[s]:
                if i >= 0:
                    pooled[s, t] += tables[t][i]
    z = np.concatenate([x[:, None], pooled], axis=1)           # (B, F + 1, D)
    if cfg.interaction == "dot":
        iu, ju = np.triu_indices(cfg.num_tables + 1, k=1)
        dots = np.einsum("bid,bjd->bij", z, z)
        inter = np.concatenate([x, dots[:, iu, ju]], axis=1)
    else:
        x0 = xl = z.reshape(b, -1)
        for l in range(cfg.cross_layers):
            c = p["cross"]
            xl = x0 * (c[f"u{l}"].T @ (c[f"v{l}"].T @ xl.T)).T + x0 * c[f"b{l}"] + xl
        inter = xl
    return mlp(p["top_mlp"], inter, False)[:, 0]


@pytest.mark.parametrize("cfg", [TINY, TINY_DOT], ids=["dcnv2", "dot"])
def test_forward_matches_an_independent_numpy_model(cfg):
    dense, sparse, _ = _batch(cfg)
    assert any((np.asarray(s) == -1).any() for s in sparse)  # jagged bags are exercised
    got = _jax_forward(cfg)(_params(cfg), dense, sparse)
    want = _numpy_forward(cfg, _params(cfg), dense, sparse)
    assert got.shape == (BATCH,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [TINY, TINY_DOT], ids=["dcnv2", "dot"])
def test_mtia_jit_equals_jax_jit(cfg):
    dense, sparse, _ = _batch(cfg)
    fn = functools.partial(dlrm.forward, cfg)
    got = mtia_jax.jit(fn, chip="mtia400")(_params(cfg), dense, sparse)
    np.testing.assert_array_equal(got, _jax_forward(cfg)(_params(cfg), dense, sparse))


def test_nnx_module_equals_the_functional_model():
    model = dlrm.DLRM(TINY, rngs=nnx.Rngs(3))
    params = model.params()
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, _params(TINY))
    same, other = dlrm.DLRM(TINY, rngs=nnx.Rngs(3)).params(), dlrm.DLRM(TINY, rngs=nnx.Rngs(4)).params()
    jax.tree.map(np.testing.assert_array_equal, params, same)
    assert not np.array_equal(params["top_mlp"]["w0"], other["top_mlp"]["w0"])
    dense, sparse, _ = _batch(TINY)
    np.testing.assert_array_equal(nnx.jit(lambda m, d, s: m(d, s))(model, dense, sparse),
                                  _jax_forward(TINY)(params, dense, sparse))
    with pytest.raises(TypeError, match="cfg must be a models.dlrm.Config"):
        dlrm.DLRM({"tables": 3}, rngs=nnx.Rngs(0))


# ------------------------------------------------------------ sharding

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute")


def _sharded(cfg, mesh, batch=BATCH):
    pspecs, (dspec, sspecs) = dlrm.shardings(cfg, mesh, batch)
    fn = functools.partial(dlrm.forward, cfg, mesh=mesh)
    return mtia_jax.jit(fn, mesh=mesh, in_shardings=(pspecs, dspec, sspecs)), pspecs


@pytest.mark.parametrize("cfg", [TINY, TINY_DOT], ids=["dcnv2", "dot"])
def test_sharded_tiny_model_on_a_2x4_mesh_equals_unsharded(cfg):
    mesh = mtia_jax.make_mesh((2, 4), ("data", "model"))
    f, pspecs = _sharded(cfg, mesh)
    assert pspecs["tables"]["table_0"] == dlrm.P("model", None)       # row-wise
    assert pspecs["tables"]["stack_0"] == dlrm.P("model", None, None)  # table-wise
    assert pspecs["bottom_mlp"]["w0"] == dlrm.P()                      # data parallel
    dense, sparse, _ = _batch(cfg)
    np.testing.assert_allclose(f(_params(cfg), dense, sparse),
                               _jax_forward(cfg)(_params(cfg), dense, sparse), rtol=1e-6, atol=1e-6)
    ops = f.lower(_params(cfg), dense, sparse).compile().module.ops
    # the row-wise tables' partial sums are all-reduced over "model" (the batch
    # is split over "data") in one collective, as TorchRec does; no table is
    # gathered whole
    (all_reduce,) = [op for op in ops if op.kind == "all_reduce"]
    assert all_reduce.attrs["axes"] == ("model",)
    assert len(all_reduce.operands) == sum(g.placement == "row_wise" for g in dlrm.table_plan(cfg))
    table_shapes = {tuple(s.shape) for s in jax.tree.leaves(dlrm.param_shapes(cfg)["tables"])}
    assert not [op for op in ops if op.kind == "all_gather"
                and tuple(op.results[0].type.shape) in table_shapes]


def test_sharded_on_a_1d_mesh_reduce_scatters_row_wise_and_all_to_alls_table_wise():
    """DLRM's hybrid parallelism on one axis: tables model-parallel, MLPs data-parallel."""
    mesh = mtia_jax.make_mesh((4,), ("data",))
    f, pspecs = _sharded(TINY, mesh)
    assert pspecs["tables"]["stack_0"] == dlrm.P("data", None, None)
    dense, sparse, _ = _batch(TINY)
    np.testing.assert_allclose(f(_params(TINY), dense, sparse),
                               _jax_forward(TINY)(_params(TINY), dense, sparse), rtol=1e-6, atol=1e-6)
    collectives = [op for op in f.lower(_params(TINY), dense, sparse).compile().module.ops
                   if op.kind in COLLECTIVES]
    # one reduce-scatter for all row-wise tables (TorchRec's one per sharding group)
    row_wise = sum(g.placement == "row_wise" for g in dlrm.table_plan(TINY))
    assert [(op.kind, len(op.operands)) for op in collectives] == [
        ("reduce_scatter", row_wise), ("all_to_all", 1)], collectives


# ------------------------------------------------------------ estimate from shapes

def _per_device_param_bytes(cfg, devices: int) -> int:
    """By hand: row-wise tables' rows / devices, one table of each 8-stack per
    device, every dense parameter whole."""
    total = 0
    for name, group in dlrm._param_shapes_dict(cfg).items():
        for key, shape in group.items():
            total += math.prod(shape) // (devices if name == "tables" else 1)
    return total * cfg.param_dtype.itemsize


def test_estimate_of_mlperf_dcnv2_on_8_chips_runs_from_shapes_and_fits_truthfully(shapes_only):
    # shapes only: the program is never run and no 40M-row table is allocated
    mesh = mtia_jax.make_mesh((8,), ("data",), chip="mtia400")
    report = dlrm.estimate(MLPERF, 2048, chip="mtia400", mesh=mesh)
    assert report.devices == 8 and report.time_s > 0
    weights = _per_device_param_bytes(MLPERF, 8)
    assert weights == pytest.approx(104.6e9 / 8, rel=0.01)           # 13 GB of fp32 weights each
    assert weights <= report.peak_hbm_bytes <= weights + 2e9          # + activations of 2048 samples
    assert report.fits and report.peak_hbm_bytes <= mtia_jax.chips.get("mtia400").hbm_bytes
    # the 10 row-wise tables' bags are reduce-scattered in one collective, the
    # two stacks' bags exchanged in one all-to-all
    assert sorted(k.kind for k in report.cost.kernels if k.stream == "network") == [
        "all_to_all", "reduce_scatter"]
    # the whole model (104.6 GB in fp32) does not fit one H100's 80 GB
    one = dlrm.estimate(MLPERF, 256, chip="h100")
    assert one.peak_hbm_bytes >= dlrm.param_count(MLPERF) * 4 and not one.fits


# ------------------------------------------------------------ synthetic data and AUC

def test_synthetic_batch_is_criteo_like_and_its_labels_are_learnable():
    dense, sparse, labels = dlrm.synthetic_batch(TINY, 2048, 7)
    assert dense.shape == (2048, 13) and labels.shape == (2048,)
    assert np.all(np.asarray(dense) >= np.log(3.0) - 1e-6)  # log(counts + 3)
    for t, ids in enumerate(sparse):
        ids = np.asarray(ids)
        assert ids.shape == (2048, TINY.multi_hot[t]) and ids.dtype == np.int32
        valid = ids >= 0
        assert ids[valid].max() < TINY.table_sizes[t]
        lengths = valid.sum(1)
        assert lengths.min() >= 1 and lengths.max() == TINY.multi_hot[t]
        assert np.all(valid[:, :-1] >= valid[:, 1:])  # -1 only after a bag's ids
    # power law: the most frequent id of the largest table is far above uniform
    big = np.asarray(sparse[0])[np.asarray(sparse[0]) >= 0]
    assert np.bincount(big).max() > 20 * len(big) / TINY.table_sizes[0]
    # both classes, and the hidden click model ranks them well; the same key, the same batch
    assert 0.1 < float(labels.mean()) < 0.6
    assert dlrm.auc(labels, dlrm._hidden_logits(TINY, dense, sparse)) > 0.8
    again = dlrm.synthetic_batch(TINY, 2048, 7)
    jax.tree.map(np.testing.assert_array_equal, again, (dense, sparse, labels))


def _brute_force_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auc_equals_a_brute_force_pairwise_count(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 20, 300).astype(np.float32)  # many ties
    assert dlrm.auc(labels, scores) == pytest.approx(_brute_force_auc(labels, scores), abs=1e-12)
    assert dlrm.auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert dlrm.auc([0, 1], [0.5, 0.5]) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        dlrm.auc([1, 1], [0.1, 0.2])


# ------------------------------------------------------------ errors

@pytest.mark.parametrize("change, exc, match", [
    (lambda d, s: (d[:, :12], s), ValueError, r"dense must have shape \(B, 13\), got \(16, 12\)"),
    (lambda d, s: (d.astype(jnp.int32), s), TypeError, "dense must be a floating-point array"),
    (lambda d, s: (d, s[:7]), ValueError, "tuple of 8 id arrays.*got a tuple of 7"),
    (lambda d, s: (d, s[0]), ValueError, "tuple of 8 id arrays.*got a ArrayImpl"),
    (lambda d, s: (d, (s[0][:, :2],) + s[1:]), ValueError,
     r"sparse\[0\] must have shape \(B, multi_hot\[0\]\) = \(16, 3\), got \(16, 2\)"),
    (lambda d, s: (d, s[:3] + (s[3].astype(jnp.float32),) + s[4:]), TypeError,
     r"sparse\[3\] must be an integer id array, got dtype float32"),
])
def test_bad_inputs_raise_clear_errors(change, exc, match):
    dense, sparse, _ = _batch(TINY)
    with pytest.raises(exc, match=match):
        dlrm.forward(TINY, _params(TINY), *change(dense, sparse))


@pytest.mark.parametrize("changes, match", [
    (dict(multi_hot=(1, 2)), "multi_hot has 2 entries for 8 tables"),
    (dict(bottom_mlp=(32, 8)), "bottom MLP must end at embed_dim 16"),
    (dict(top_mlp=(64, 2)), "top MLP must end at 1"),
    (dict(interaction="cross"), "interaction must be one of"),
    (dict(table_sizes=[10] * 8), "table_sizes must be a non-empty tuple of positive ints"),
    (dict(stack_size=0), "stack_size must be a positive int"),
])
def test_bad_configs_raise_clear_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        Config.preset("huge")


# ------------------------------------------------------------ the serving example

def test_serve_dlrm_example_runs_with_tiny_arguments(capsys):
    sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
    import serve_dlrm
    assert serve_dlrm.main(["--chip", "mtia400", "--batch", "32", "--batches", "2",
                            "--queries", "2000"]) == 0
    out = capsys.readouterr().out
    assert "queries/s" in out and "modeled" in out and "p99" in out
