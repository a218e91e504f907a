"""Sharded embedding tables (lowering.passes.partition_embedding) and the
stacked-table form of embedding_bag that table-wise sharding uses.

Every sharded program equals ``jax.jit`` of the unsharded one, and its
per-device program holds exactly the collectives of a hand (TorchRec-style)
sharding, with the per-device bytes computed by hand from the alpha-beta
model's definitions (``runtime.collectives``): an all-reduce sends
2 (p-1)/p of its buffer, a reduce-scatter and an all-to-all (p-1)/p of
their input, an all-gather (p-1)/p of its output. A subprocess runs the
same programs with ``numerics="spmd"`` on 8 host devices and compares the
row-wise gather's collectives with XLA's own SPMD partitioner.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import mtia_jax
from lowering.collectives import COLLECTIVE_KINDS
from mtia_jax.primitives.embedding_bag import embedding_bag, embedding_bag_p

TOL = dict(rtol=1e-5, atol=1e-5)
G = 4
MESH = mtia_jax.make_mesh((G,), ("x",))
MESH_2X4 = mtia_jax.make_mesh((2, 4), ("data", "model"))
N, D = 16, 8  # rows: 4 per device of MESH

# ids touch every device's rows; -1 pads, 16, 40 and -3 are outside the table
INDICES = np.array([1, 5, 15, 16, 0, 9, -3, 12, 7, 4, 40, 2], np.int32)
OFFSETS = np.array([0, 3, 3, 6, 9, 11], np.int32)   # bags of 3, 0, 3, 3, 2, 1 ids
LENGTHS = np.array([3, 0, 4, 2, 0, 2], np.int32)    # 11 ids: the last is in no bag
PADDED = np.array([[1, 5, -1, 15], [-1, -1, -1, -1], [3, 3, 9, 12], [0, 16, -3, 7],
                   [-1, 40, 11, 8], [14, -1, 2, 6]], np.int32)
BAGS = 6


def ns(*spec, mesh=MESH):
    return NamedSharding(mesh, P(*spec))


def _normal(seed, shape):
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def _collectives(module):
    """(kind, operand shapes, mesh axes) of every collective, in program order
    (a combined collective has several operands)."""
    found = []
    for op in module.ops:
        if op.kind in COLLECTIVE_KINDS:
            axes = op.attrs.get("axes") or (op.attrs["axis"],)
            found.append((op.kind, tuple(v.type.shape for v in op.operands), axes))
        for region in op.regions.values():
            found.extend(_collectives(region))
    return found


def _run(fn, args, in_shardings, out_shardings=None):
    """(sharded result, its compiled program); the result checked against jax.jit."""
    g = mtia_jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)
    compiled = g.lower(*args).compile()
    got = compiled(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(jax.jit(fn)(*args)), strict=True):
        np.testing.assert_allclose(g, w, equal_nan=True, **TOL)
    return got, compiled


def _all_reduce(nbytes, p=G):
    # buffers this small all-reduce in one shot: each device sends its whole
    # buffer to the p - 1 others (lowering.network)
    return (p - 1) * nbytes


def _one_way(nbytes, p=G):  # reduce-scatter / all-to-all input, all-gather output
    return (p - 1) / p * nbytes


def _bag_args(layout, weighted=False):
    """The arguments after the table of one layout: ids, offsets/lengths, weights."""
    ids = PADDED if layout == "padded" else INDICES
    args = [jnp.asarray(ids)]
    if layout != "padded":
        args.append(jnp.asarray({"offsets": OFFSETS, "lengths": LENGTHS}[layout]))
    if weighted:
        args.append(jnp.linspace(-1.0, 2.0, ids.size).reshape(ids.shape))
    return args


def _split_table(args, table_sharding=None):
    """in_shardings: the table split (row-wise unless given), the other arguments replicated."""
    return (table_sharding or ns("x", None),) + (None,) * (len(args) - 1)


def _bag_fn(layout, mode="sum", weighted=False):
    def fn(table, ids, *rest):
        kw = {}
        if layout != "padded":
            kw[layout] = rest[0]
        if weighted:
            kw["per_sample_weights"] = rest[-1]
        return embedding_bag(table, ids, mode=mode, **kw)
    return fn


# ------------------------------------------------------------ stacked tables (the primitive)

def _stack_ids(layout, tables, seed):
    """Per-table ids (and segments) of one layout, stacked on a leading table axis."""
    rng = np.random.default_rng(seed)
    if layout == "padded":
        return (jnp.asarray(rng.integers(-1, N + 2, (tables, BAGS, 3)), jnp.int32),)
    ids = jnp.asarray(rng.integers(-1, N + 2, (tables, INDICES.size)), jnp.int32)
    segs = OFFSETS if layout == "offsets" else LENGTHS
    return ids, jnp.asarray(np.stack([np.roll(segs, k) if layout == "lengths" else segs
                                      for k in range(tables)]))


def _prims(fn, *args):
    return [e.primitive.name for e in jax.make_jaxpr(fn)(*args).eqns]


@pytest.mark.parametrize("layout, mode", [("offsets", "sum"), ("lengths", "mean"), ("padded", "max")])
def test_vmap_over_tables_is_one_kernel_reading_a_stack_of_tables(layout, mode):
    tables = _normal(0, (3, N, D))
    rest = _stack_ids(layout, 3, 1)
    lookup = jax.vmap(_bag_fn(layout, mode))
    want = np.stack([_bag_fn(layout, mode)(tables[t], *(a[t] for a in rest)) for t in range(3)])
    np.testing.assert_allclose(jax.jit(lookup)(tables, *rest), want, **TOL)
    jaxpr = jax.make_jaxpr(lookup)(tables, *rest)
    (bag,) = [e for e in jaxpr.eqns if e.primitive is embedding_bag_p]
    assert bag.invars[0].aval.shape == (3, N, D) and "gather" not in _prims(lookup, tables, *rest)


def test_vmap_folds_every_batch_into_one_lookup_in_a_stack_of_tables():
    tables, ids = _normal(2, (3, N, D)), jnp.asarray(PADDED)
    per_set = jnp.asarray(np.random.default_rng(3).integers(-1, N, (3, 2, BAGS, 4)), jnp.int32)
    one = lambda t, i: embedding_bag(t, i, mode="mean")
    cases = {
        # the same ids in every table
        "shared ids": (jax.vmap(one, in_axes=(0, None)), (tables, ids),
                       np.stack([one(t, ids) for t in tables])),
        # two index sets per table: vmap over sets inside vmap over tables
        "sets per table": (jax.vmap(jax.vmap(one, in_axes=(None, 0))), (tables, per_set),
                           np.stack([[one(t, i) for i in s] for t, s in zip(tables, per_set)])),
        # a stack the outer vmap does not map: the batch folds inside each table's sets
        "stack shared by a batch": (jax.vmap(lambda i: jax.vmap(one)(tables, i), in_axes=1), (per_set,),
                                    np.stack([[one(t, s[k]) for t, s in zip(tables, per_set)]
                                              for k in range(2)])),
    }
    for name, (fn, args, want) in cases.items():
        np.testing.assert_allclose(jax.jit(fn)(*args), want, err_msg=name, **TOL)
        assert _prims(fn, *args).count("embedding_bag") == 1, name


def test_grad_wrt_a_stack_of_tables_and_weights():
    tables = _normal(4, (2, N, D))
    (ids,) = _stack_ids("padded", 2, 5)
    weights = jnp.linspace(0.5, 2.0, ids.size).reshape(ids.shape)
    fn = jax.vmap(lambda t, i, w: embedding_bag(t, i, per_sample_weights=w))
    check_grads(jax.jit(lambda t, w: fn(t, ids, w)), (tables, weights), order=1, modes=("rev",))


def test_cost_of_a_stack_of_tables_counts_the_rows_read():
    s = jax.ShapeDtypeStruct
    tables, ids = s((8, 1000, 64), jnp.bfloat16), s((8, 32, 10), jnp.int32)
    compiled = mtia_jax.jit(jax.vmap(lambda t, i: embedding_bag(t, i))).lower(tables, ids).compile()
    (kernel,) = [k for k in compiled.cost.kernels if k.kind == "embedding_bag"]
    rows = 8 * 32 * 10
    # 64 bf16 = 128-byte rows (two whole 64-byte granules), int32 ids, the pooled output
    assert kernel.hbm_bytes == rows * 128 + rows * 4 + 8 * 32 * 64 * 2
    assert kernel.flops == rows * 64


def test_index_sets_must_group_over_the_stack_of_tables():
    with pytest.raises(ValueError, match=r"4 index sets cannot be grouped over a stack of 3 tables"):
        embedding_bag_p.bind(jnp.ones((3, N, D)), jnp.zeros((4, 2, 3), jnp.int32), layout="padded",
                             mode="sum", weighted=False)


# ------------------------------------------------------------ row-wise

@pytest.mark.parametrize("layout, mode, weighted", [
    ("offsets", "mean", False), ("lengths", "sum", True), ("padded", "sum", True),
    ("padded", "mean", False)])
def test_row_wise_bags_are_partial_sums_added_by_one_all_reduce(layout, mode, weighted):
    args = (_normal(6, (N, D)), *_bag_args(layout, weighted))
    _, compiled = _run(_bag_fn(layout, mode, weighted), args, _split_table(args))
    assert _collectives(compiled.module) == [("all_reduce", ((BAGS, D),), ("x",))]  # no table all-gather
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(_all_reduce(BAGS * D * 4))


@pytest.mark.parametrize("layout", ["offsets", "padded"])
def test_row_wise_bags_reduce_scatter_onto_the_batch(layout):
    ids = np.concatenate([PADDED, PADDED[:2, ::-1]]) if layout == "padded" else INDICES
    segs = np.array([0, 1, 3, 3, 6, 8, 9, 11]) if layout == "offsets" else None  # 8 bags
    args = (_normal(8, (N, D)), jnp.asarray(ids))
    if segs is not None:
        args += (jnp.asarray(segs, jnp.int32),)
    _, compiled = _run(_bag_fn(layout), args, _split_table(args), out_shardings=ns("x"))
    assert _collectives(compiled.module) == [("reduce_scatter", ((8, D),), ("x",))]
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(_one_way(8 * D * 4))


def test_row_wise_padding_and_ids_outside_the_table_stay_invalid_on_every_device():
    table = _normal(9, (N, D))
    ids = jnp.asarray([[-1, -1, -1], [16, 40, -3], [-1, 4, 16], [3, -1, 13]], jnp.int32)
    both = lambda t, i: (embedding_bag(t, i), embedding_bag(t, i, mode="mean"))
    (total, mean), _ = _run(both, (table, ids), (ns("x", None), None))
    for got, count in ((total, 1), (mean, 2)):
        np.testing.assert_array_equal(got[:2], 0.0)  # only padding / only ids outside the table
        np.testing.assert_allclose(got[2], table[4], **TOL)  # one valid id: sum = mean = its row
        np.testing.assert_allclose(got[3], (table[3] + table[13]) / count, **TOL)
    # flat: the id past the last bag is never read, however it shifts
    got, _ = _run(lambda t, i, n: embedding_bag(t, i, lengths=n, mode="mean"),
                  (table, jnp.asarray([2, -1, 6, 9], jnp.int32), jnp.asarray([2, 1], jnp.int32)),
                  (ns("x", None), None, None))
    np.testing.assert_allclose(got, np.stack([table[2], table[6]]), **TOL)


def test_row_wise_max_gathers_the_table():
    args = (_normal(10, (N, D)), jnp.asarray(PADDED))
    _, compiled = _run(_bag_fn("padded", "max"), args, (ns("x", None), None))
    assert _collectives(compiled.module) == [("all_gather", ((N // G, D),), ("x",))]
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(_one_way(N * D * 4))


def test_row_wise_with_batch_split_ids_gathers_the_ids_and_reduce_scatters_the_bags():
    ids = jnp.asarray(np.concatenate([PADDED, PADDED[:2]]))  # 8 bags of 4
    _, compiled = _run(_bag_fn("padded"), (_normal(11, (N, D)), ids), (ns("x", None), ns("x")),
                       out_shardings=ns("x"))
    assert _collectives(compiled.module) == [("all_gather", ((1, 2, 4),), ("x",)),
                                             ("reduce_scatter", ((8, D),), ("x",))]
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(
        _one_way(8 * 4 * 4) + _one_way(8 * D * 4))


def test_row_wise_over_model_keeps_the_batch_split_over_data():
    ids = jnp.asarray(np.concatenate([PADDED, PADDED[:2]]))
    _, compiled = _run(_bag_fn("padded", "mean"), (_normal(12, (N, D)), ids),
                       (ns("model", None, mesh=MESH_2X4), ns("data", mesh=MESH_2X4)),
                       out_shardings=ns("data", mesh=MESH_2X4))
    assert _collectives(compiled.module) == [("all_reduce", ((4, D),), ("model",))]
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(_all_reduce(4 * D * 4))


def test_rows_split_over_two_mesh_axes_reduce_scatter_over_both():
    table, ids = _normal(26, (2 * N, D)), jnp.asarray(np.concatenate([PADDED, PADDED[:2]]))
    both = lambda t, i: (embedding_bag(t, i, mode="mean"), jnp.take(t, i, axis=0))
    both_axes = ns(("data", "model"), mesh=MESH_2X4)
    _, compiled = _run(both, (table, ids), (ns(("data", "model"), None, mesh=MESH_2X4), None),
                       out_shardings=(both_axes, both_axes))
    # both lookups' partial sums in one combined reduce-scatter
    assert _collectives(compiled.module) == [("reduce_scatter", ((8, D), (8, 4, D)), ("data", "model"))]
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(
        _one_way(8 * D * 4, p=8) + _one_way(8 * 4 * D * 4, p=8))


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_column_wise_bags_need_no_communication(mode):
    ids = jnp.asarray(np.concatenate([PADDED, PADDED[:2]]))
    _, compiled = _run(_bag_fn("padded", mode), (_normal(13, (N, D)), ids),
                       (ns(None, "model", mesh=MESH_2X4), ns("data", mesh=MESH_2X4)),
                       out_shardings=ns("data", "model", mesh=MESH_2X4))
    assert _collectives(compiled.module) == []
    (bag,) = [op for op in compiled.module.ops if op.kind == "embedding_bag"]
    assert bag.results[0].type.shape == (1, 4, D // 4)


def test_stacked_tables_split_table_wise_and_row_wise():
    tables = _normal(14, (4, N, D))
    ids = _stack_ids("padded", 4, 15)[0]
    _, compiled = _run(jax.vmap(lambda t, i: embedding_bag(t, i)), (tables, ids),
                       (ns("data", "model", None, mesh=MESH_2X4), None),
                       out_shardings=ns("data", mesh=MESH_2X4))
    # tables split over data (no communication), rows over model (one all-reduce)
    assert _collectives(compiled.module) == [("all_reduce", ((2, BAGS, D),), ("model",))]


# ------------------------------------------------------------ table-wise

T = 8


def _table_wise(layout, mode="sum", to_batch=None):
    lookup = jax.vmap(_bag_fn(layout, mode))

    def fn(tables, *rest):
        pooled = lookup(tables, *rest)  # (T, bags, D)
        if to_batch == "constraint":
            return jax.lax.with_sharding_constraint(pooled, ns(None, "x"))
        if to_batch == "transpose":
            return jax.lax.with_sharding_constraint(pooled.transpose(1, 0, 2), ns("x"))
        return pooled
    return fn


@pytest.mark.parametrize("layout, mode", [("offsets", "mean"), ("lengths", "max"), ("padded", "sum")])
def test_table_wise_lookup_needs_no_communication(layout, mode):
    args = (_normal(16, (T, N, D)), *_stack_ids(layout, T, 17))
    _, compiled = _run(_table_wise(layout, mode), args, _split_table(args, ns("x", None, None)),
                       out_shardings=ns("x"))
    assert _collectives(compiled.module) == []
    (bag,) = [op for op in compiled.module.ops if op.kind == "embedding_bag"]
    assert bag.operands[0].type.shape == (T // G, N, D)
    assert bag.results[0].type.shape == (T // G, BAGS, D)


@pytest.mark.parametrize("to_batch", ["constraint", "transpose"])
def test_table_wise_output_moves_to_the_batch_split_with_one_all_to_all(to_batch):
    ids = jnp.asarray(np.random.default_rng(18).integers(-1, N, (T, 8, 3)), jnp.int32)
    _, compiled = _run(_table_wise("padded", to_batch=to_batch), (_normal(19, (T, N, D)), ids),
                       (ns("x", None, None), None))
    ((kind, shape, axes),) = _collectives(compiled.module)
    assert kind == "all_to_all" and axes == ("x",) and np.prod(shape) == T // G * 8 * D
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(_one_way(T // G * 8 * D * 4))


def test_table_wise_with_batch_split_ids_exchanges_ids_and_bags_all_to_all():
    ids = jnp.asarray(np.random.default_rng(20).integers(-1, N, (T, 8, 3)), jnp.int32)
    _, compiled = _run(_table_wise("padded", to_batch="constraint"), (_normal(21, (T, N, D)), ids),
                       (ns("x", None, None), ns(None, "x")))
    assert [c[0] for c in _collectives(compiled.module)] == ["all_to_all", "all_to_all"]
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(
        _one_way(T * 2 * 3 * 4) + _one_way(T // G * 8 * D * 4))


# ------------------------------------------------------------ gather

GATHERS = {
    "getitem": lambda t, i: t[i],                                        # promise_in_bounds
    "take": lambda t, i: jnp.take(t, i, axis=0),                         # fill with NaN
    "clip": lambda t, i: jnp.take(t, i, axis=0, mode="clip"),
    "fill": lambda t, i: t.at[i].get(mode="fill", fill_value=-3.0),
}
GATHER_IDS = jnp.asarray([[0, 5, 15, 16], [-1, -17, 100, 8]], jnp.int32)


def test_gather_from_a_row_split_table_is_one_all_reduce_in_every_mode():
    every = lambda t, i: tuple(fn(t, i) for fn in GATHERS.values())
    _, compiled = _run(every, (_normal(22, (N, D)), GATHER_IDS), (ns("x", None), None))
    # one all-reduce for the partial sums of every gather (combined)
    assert _collectives(compiled.module) == [("all_reduce", ((2, 4, D),) * len(GATHERS), ("x",))]
    assert compiled.cost_analysis()["collective_bytes"] == pytest.approx(
        len(GATHERS) * _all_reduce(2 * 4 * D * 4))


def test_gather_from_a_row_split_table_reduce_scatters_onto_a_split_output():
    _, compiled = _run(GATHERS["take"], (_normal(23, (N, D)), GATHER_IDS), (ns("x", None), None),
                       out_shardings=ns(None, "x"))
    assert _collectives(compiled.module) == [("reduce_scatter", ((2, 4, D),), ("x",))]


def test_gather_with_a_two_entry_index_vector_shifts_the_split_entry_only():
    table = _normal(24, (N, 6, D))
    i, j = jnp.asarray([0, 7, 15, 20, -2], jnp.int32), jnp.asarray([5, 0, 7, 2, 1], jnp.int32)
    # and one-row slices kept as an output dim (not collapsed)
    rows = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3), collapsed_slice_dims=(),
                                          start_index_map=(0,))
    every = lambda t, i, j: (t[i, j], t.at[i, j].get(mode="fill", fill_value=0.5),
                             jax.lax.gather(t, i[:, None], rows, (1, 6, D), mode="clip"))
    _, compiled = _run(every, (table, i, j), (ns("x", None, None), None, None))
    assert _collectives(compiled.module) == [("all_reduce", ((5, D), (5, D), (5, 1, 6, D)), ("x",))]


def test_gather_from_a_column_split_table_needs_no_communication():
    _, compiled = _run(GATHERS["getitem"], (_normal(25, (N, D)), GATHER_IDS), (ns(None, "x"), None),
                       out_shardings=ns(None, None, "x"))
    assert _collectives(compiled.module) == []


def test_gather_from_a_row_split_integer_table_gathers_the_table():
    table = jnp.arange(N * D, dtype=jnp.int32).reshape(N, D)
    _, compiled = _run(GATHERS["getitem"], (table, GATHER_IDS), (ns("x", None), None))
    assert _collectives(compiled.module) == [("all_gather", ((N // G, D),), ("x",))]


# ------------------------------------------------------------ real devices, and XLA

SUBPROCESS = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import mtia_jax
    from mtia_jax.primitives.embedding_bag import embedding_bag
    assert len(jax.devices()) == 8
    logical = mtia_jax.make_mesh((8,), ("x",))
    real = Mesh(np.array(jax.devices()), ("x",))
    ns = lambda mesh, *spec: NamedSharding(mesh, P(*spec))
    key = jax.random.PRNGKey(0)
    table = jax.random.normal(key, (256, 16))
    padded = jax.random.randint(jax.random.fold_in(key, 1), (16, 5), -1, 270)
    ids = jax.random.randint(jax.random.fold_in(key, 3), (16, 3), -300, 300)
    programs = {
        "row_wise_mean": (lambda t, i: embedding_bag(t, i, mode="mean"), (table, padded),
                          (P("x", None), P()), None),
        "gather_take": (lambda t, i: jnp.take(t, i, axis=0), (table, ids), (P("x", None), P()), P("x")),
    }
    out = {}
    for name, (fn, args, specs, out_spec) in programs.items():
        f = mtia_jax.jit(fn, in_shardings=tuple(ns(logical, *s) for s in specs),
                         out_shardings=None if out_spec is None else ns(logical, *out_spec),
                         numerics="spmd")
        diff = np.abs(np.asarray(f(*args)) - np.asarray(jax.jit(fn)(*args)))
        out[name + "_err"] = float(np.nanmax(diff)) if np.isfinite(diff).any() else 0.0
        out[name + "_nan_match"] = bool(np.array_equal(np.isnan(np.asarray(f(*args))),
                                                       np.isnan(np.asarray(jax.jit(fn)(*args)))))
    # the row-wise gather: our collectives and XLA's, per-device result bytes
    sizes = {"f32": 4, "s32": 4}
    for name, out_spec in (("replicated", P()), ("batch_split", P("x"))):
        fn = lambda t, i: t[i]
        hlo = jax.jit(fn, in_shardings=(ns(real, "x", None), ns(real)),
                      out_shardings=ns(real, *out_spec)).lower(table, ids).compile().as_text()
        xla = []
        pattern = r"= (\\w+)\\[([\\d,]*)\\]\\S* (all-reduce|all-gather|reduce-scatter|all-to-all)\\("
        for m in re.finditer(pattern, hlo):
            elements = int(np.prod([int(d) for d in m.group(2).split(",") if d]))
            xla.append([m.group(3), elements * sizes[m.group(1)]])
        c = mtia_jax.jit(fn, in_shardings=(ns(logical, "x", None), None),
                         out_shardings=ns(logical, *out_spec)).lower(table, ids).compile()
        ours = [[op.kind.replace("_", "-"), op.operands[0].type.nbytes] for op in c.module.ops
                if op.kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")]
        out[name] = {"xla": xla, "ours": ours}
    print(json.dumps(out))
""")


def test_spmd_numerics_on_8_host_devices_and_row_wise_gather_collectives_against_xla():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", SUBPROCESS], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("row_wise_mean", "gather_take"):
        assert out[name + "_err"] < 1e-5 and out[name + "_nan_match"], name
    rows = 16 * 3 * 16 * 4  # the (16, 3, 16) f32 rows every device reads before adding up
    # a replicated result: the same one all-reduce of the looked-up rows as XLA
    assert out["replicated"]["ours"] == out["replicated"]["xla"] == [["all-reduce", rows]]
    # a batch-split result: XLA all-reduces the rows and keeps its slice, after
    # all-gathering the ids it first split like the result; one reduce-scatter does both
    assert out["batch_split"]["ours"] == [["reduce-scatter", rows]]
    assert sorted(out["batch_split"]["xla"]) == [["all-gather", 16 * 3 * 4], ["all-reduce", rows]]
