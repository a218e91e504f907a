"""Sharding over logical meshes: the partition pass's collectives, numerics
equal to jax.jit (vmap over logical devices, and shard_map over real host
devices in a subprocess), XLA's SPMD partitioner as a reference, and errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mtia_jax

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import programs  # noqa: E402

MESH = mtia_jax.make_mesh((2, 4), ("data", "model"))
KEY = jax.random.PRNGKey(0)


def ns(*spec):
    return NamedSharding(MESH, P(*spec))


def _normal(i, shape):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape)


def _collectives(compiled):
    return [op for op in compiled.module.ops if op.kind in
            ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "permute")]


def mlp(x, w1, w2):
    return jax.nn.gelu(x @ w1) @ w2


MLP_SHARDINGS = dict(in_shardings=(ns("data"), ns(None, "model"), ns("model", None)),
                     out_shardings=ns("data"))


def test_make_mesh_is_an_abstract_mesh_of_logical_devices():
    mesh = mtia_jax.make_mesh((9, 8), ("data", "model"), chip="mtia400")
    assert isinstance(mesh, jax.sharding.AbstractMesh)
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 9, "model": 8}


@pytest.mark.parametrize("shape, chip, match", [
    ((9, 9), "mtia450", "81 devices in one scale-up domain, more than mtia450.s 72"),
    ((17,), "mtia300", "17 devices in one scale-up domain, more than mtia300.s 16"),
])
def test_make_mesh_larger_than_the_scale_up_domain_is_an_error(shape, chip, match):
    with pytest.raises(ValueError, match=match):
        mtia_jax.make_mesh(shape, tuple("abcdefg"[:len(shape)]), chip=chip)


def test_megatron_mlp_needs_exactly_one_all_reduce_and_equals_jax_jit():
    args = (_normal(1, (8, 16)), _normal(2, (16, 32)), _normal(3, (32, 16)))
    f = mtia_jax.jit(mlp, **MLP_SHARDINGS)
    np.testing.assert_allclose(f(*args), jax.jit(mlp)(*args), rtol=1e-5, atol=1e-5)
    compiled = f.lower(*args).compile()
    (allreduce,) = _collectives(compiled)
    assert allreduce.kind == "all_reduce" and allreduce.attrs["axes"] == ("model",)
    # the per-device partial result: (8 / 2 data) x 16 fp32
    assert allreduce.operands[0].type.shape == (4, 16)
    cost = compiled.cost_analysis()
    # a buffer this small is all-reduced in one shot: sent whole to each of the 3 others
    assert allreduce.attrs["algorithm"] == "one_shot"
    assert cost["collective_bytes"] == pytest.approx(3 * 4 * 16 * 4)
    assert cost["collective_time_s"] > 0
    # per-device shapes in the IR
    assert "%0: f32[4,16], %1: f32[16,8], %2: f32[8,16]" in compiled.as_text()


def test_partial_sum_feeding_a_split_output_becomes_a_reduce_scatter():
    args = (_normal(1, (8, 16)), _normal(2, (16, 32)), _normal(3, (32, 16)))
    f = mtia_jax.jit(mlp, in_shardings=MLP_SHARDINGS["in_shardings"], out_shardings=ns("data", "model"))
    np.testing.assert_allclose(f(*args), jax.jit(mlp)(*args), rtol=1e-5, atol=1e-5)
    assert [op.kind for op in _collectives(f.lower(*args).compile())] == ["reduce_scatter"]


def attention_block(x, wqkv, wo):
    b, t, d = x.shape
    q, k, v = jnp.split(x @ wqkv, 3, axis=-1)
    heads = 4
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
    return programs.attention(q, k, v).reshape(b, t, d) @ wo


def test_megatron_attention_block_heads_sharded_needs_one_all_reduce():
    # wq/wk/wv column-sharded so heads split over "model"; wo row-sharded
    def block(x, wq, wk, wv, wo):
        b, t, d = x.shape
        q, k, v = ((x @ w).reshape(b, t, 4, d // 4) for w in (wq, wk, wv))
        return programs.attention(q, k, v).reshape(b, t, d) @ wo

    args = (_normal(4, (2, 8, 16)), *(_normal(5 + i, (16, 16)) for i in range(4)))
    shardings = (ns("data"), ns(None, "model"), ns(None, "model"), ns(None, "model"), ns("model", None))
    f = mtia_jax.jit(block, in_shardings=shardings, out_shardings=ns("data"))
    np.testing.assert_allclose(f(*args), jax.jit(block)(*args), rtol=1e-5, atol=1e-5)
    assert [op.kind for op in _collectives(f.lower(*args).compile())] == ["all_reduce"]


@pytest.mark.parametrize("fn, make_args, shardings", [
    (mlp, lambda: (_normal(1, (8, 16)), _normal(2, (16, 32)), _normal(3, (32, 16))),
     dict(in_shardings=(ns("data"), ns(None, "model"), ns("model")))),
    (programs.transformer, lambda: programs.make_transformer(KEY, d=16, batch=2, seq=8),
     dict(in_shardings=(ns("data"), None))),
    (programs.rnn_scan, lambda: programs.make_rnn(KEY, d=8, steps=3, batch=4),
     dict(in_shardings=((ns(None, "model"), ns("model", None)), ns(None, "data"), ns("data")))),
])
def test_sharded_programs_equal_jax_jit(fn, make_args, shardings):
    args = make_args()
    got, want = mtia_jax.jit(fn, **shardings)(*args), jax.jit(fn)(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_with_sharding_constraint_reshards_inside_the_program():
    def f(x, w):
        y = jax.lax.with_sharding_constraint(x @ w, ns(None, "model"))
        return jnp.tanh(y).sum(axis=0)

    args = (_normal(1, (8, 16)), _normal(2, (16, 32)))
    g = mtia_jax.jit(f, in_shardings=(ns("data"), None))
    np.testing.assert_allclose(g(*args), jax.jit(f)(*args), rtol=1e-5, atol=1e-5)
    kinds = [op.kind for op in _collectives(g.lower(*args).compile())]
    assert "all_gather" in kinds or "all_to_all" in kinds


def test_shard_map_with_explicit_collectives():
    def f(x, w):
        def local(x, w):
            y = jax.lax.psum(x @ w, "model")
            return y + jax.lax.axis_index("model").astype(y.dtype), jax.lax.all_gather(y, "data", tiled=True)
        return jax.shard_map(local, mesh=MESH, in_specs=(P("data", "model"), P("model", None)),
                             out_specs=(P("data", "model"), P(None, None)), check_vma=False)(x, w)

    x, w = _normal(1, (8, 16)), _normal(2, (16, 8))
    got_y, got_all = mtia_jax.jit(f)(x, w)
    full = np.asarray(x) @ np.asarray(w)
    # every device holds the whole psum (4 rows of its data block) plus its model
    # index; out_specs P("data", "model") lays the 4 model blocks side by side
    expect = np.concatenate([full + i for i in range(4)], axis=1)
    assert got_y.shape == (8, 32)
    np.testing.assert_allclose(got_y, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_all, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shardings, mesh, args, match", [
    ((ns("data"), None, None), None, ((7, 16), (16, 32), (32, 16)),
     r"argument \[0\]: dimension 0 of size 7 .* 'data' of size 2"),
    ((P("expert"), None, None), MESH, ((8, 16), (16, 32), (32, 16)),
     r"mesh axis 'expert'.* \['data', 'model'\]"),
    ((P("data"), None, None), None, ((8, 16), (16, 32), (32, 16)), "need a mesh"),
])
def test_bad_shardings_are_clear_errors(shardings, mesh, args, match):
    structs = [jax.ShapeDtypeStruct(s, jnp.float32) for s in args]
    with pytest.raises(ValueError, match=match):
        mtia_jax.jit(mlp, in_shardings=shardings, mesh=mesh).lower(*structs)


def test_estimate_over_a_mesh_reports_per_device_time_and_collectives():
    structs = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((64, 1024), (1024, 4096), (4096, 1024))]
    mesh = mtia_jax.make_mesh((8,), ("model",))
    one = mtia_jax.estimate(mlp, *structs, chip="mtia450")
    tp = mtia_jax.estimate(mlp, *structs, chip="mtia450", mesh=mesh,
                           in_shardings=(None, P(None, "model"), P("model", None)))
    assert tp.devices == 8 and one.devices == 1
    assert tp.collective_time_s > 0 and one.collective_time_s == 0
    assert tp.peak_hbm_bytes < one.peak_hbm_bytes / 4
    d = tp.to_dict()
    assert d["by_bound"]["network"] == pytest.approx(tp.collective_time_s)
    assert "by kind" in tp.table() and "all_reduce" in tp.table()


SUBPROCESS = textwrap.dedent("""
    import json, os, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, {bench!r})
    import mtia_jax, programs
    assert len(jax.devices()) == 8
    def mlp(x, w1, w2):
        return jax.nn.gelu(x @ w1) @ w2
    key = jax.random.PRNGKey(0)
    args = [jax.random.normal(jax.random.fold_in(key, i), s) for i, s in enumerate([(8, 16), (16, 32), (32, 16)])]
    logical = mtia_jax.make_mesh((2, 4), ("data", "model"))
    specs = (P("data"), P(None, "model"), P("model", None))
    out = {{}}
    f = mtia_jax.jit(mlp, in_shardings=tuple(NamedSharding(logical, s) for s in specs),
                     out_shardings=NamedSharding(logical, P("data")), numerics="spmd")
    out["mlp_err"] = float(np.abs(np.asarray(f(*args)) - np.asarray(jax.jit(mlp)(*args))).max())
    x, layers = programs.make_transformer(key, d=16, batch=2, seq=8)
    g = mtia_jax.jit(programs.transformer, in_shardings=(NamedSharding(logical, P("data")), None), numerics="spmd")
    out["block_err"] = float(np.abs(np.asarray(g(x, layers)) - np.asarray(jax.jit(programs.transformer)(x, layers))).max())
    # XLA's own SPMD partitioner on the same program and shardings
    real = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    hlo = jax.jit(mlp, in_shardings=tuple(NamedSharding(real, s) for s in specs),
                  out_shardings=NamedSharding(real, P("data"))).lower(*args).compile().as_text()
    sizes = {{"f32": 4, "bf16": 2, "s32": 4}}
    xla = []
    for m in re.finditer(r"= (\\w+)\\[([\\d,]*)\\]\\S* (all-reduce|all-gather|reduce-scatter|all-to-all)\\(", hlo):
        n = 1
        for d in m.group(2).split(","):
            n *= int(d) if d else 1
        xla.append([m.group(3), n * sizes[m.group(1)]])
    out["xla"] = xla
    c = mtia_jax.jit(mlp, in_shardings=tuple(NamedSharding(logical, s) for s in specs),
                     out_shardings=NamedSharding(logical, P("data"))).lower(*args).compile()
    out["ours"] = [[op.kind.replace("_", "-"), op.results[0].type.nbytes] for op in c.module.ops
                   if op.kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")]
    print(json.dumps(out))
""")


def test_spmd_numerics_on_8_host_devices_and_collectives_match_xla():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    script = SUBPROCESS.format(bench=str(Path(__file__).parent.parent / "benchmarks"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["mlp_err"] < 1e-5 and out["block_err"] < 1e-4
    # the same collectives, with the same per-device buffer sizes, as XLA's partitioner
    assert sorted(map(tuple, out["ours"])) == sorted(map(tuple, out["xla"]))


def test_llama3_405b_decode_step_on_72_chips_is_estimated_from_shapes(shapes_only):
    import functools

    config = programs.LLAMA_CONFIGS["llama3-405b"]
    mesh = mtia_jax.make_mesh((9, 8), ("data", "model"), chip="mtia400")
    fn = functools.partial(programs.llama_decode_step, heads=config["heads"], kv_heads=config["kv_heads"])
    report = mtia_jax.estimate(fn, *programs.llama_shapes(config, batch=72, cache_len=2048),
                               chip="mtia400", mesh=mesh, in_shardings=programs.llama_shardings(config, 8))
    assert report.devices == 72 and report.fits
    # per device: an eighth of the 405B bf16 weights (~101 GB) must be read every step
    weights = 2 * sum(np.prod(s.shape) for s in jax.tree.leaves(programs.llama_shapes(config, 72, 2048)[0]))
    assert report.time_s >= weights / 8 / mtia_jax.chips.get("mtia400").hbm_bandwidth
    # Megatron: two all-reduces over "model" per layer, inside the scan body
    (scan,) = [op for op in report.module.ops if op.kind == "scan"]
    reduces = [op for op in scan.regions["body"].ops if op.kind == "all_reduce"]
    assert len(reduces) == 2 and all(op.attrs["axes"] == ("model",) for op in reduces)


def test_more_devices_than_kv_heads_split_heads_over_two_axes_and_equal_jax_jit():
    """4 query heads and 2 KV heads over 4 devices: queries, FFN and vocabulary
    split over ("model", "rep"), each KV head on the two "rep" devices whose
    queries read it. The head split survives the reshapes to (kv, group) and
    back, so each layer needs exactly Megatron's two all-reduces and the
    cache is not gathered."""
    import functools

    from lowering.collectives import COLLECTIVE_KINDS

    config = programs.LLAMA_CONFIGS["tiny"]
    mesh = programs.llama_mesh(config, 1, 4, chip="mtia450")
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 1, "model": 2, "rep": 2}
    structs = programs.llama_shapes(config, batch=2, cache_len=8, dtype=jnp.float32)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    params, ck, cv, tokens, _ = jax.tree.map(
        lambda s: (jax.random.randint(next(keys), s.shape, 0, config["vocab"]) if s.dtype == jnp.int32
                   else 0.3 * jax.random.normal(next(keys), s.shape, s.dtype)), structs)
    position = jnp.int32(3)
    fn = functools.partial(programs.llama_decode_step, heads=config["heads"], kv_heads=config["kv_heads"])
    f = mtia_jax.jit(fn, chip="mtia450", mesh=mesh, in_shardings=programs.llama_shardings(config, 4))
    want = jax.jit(fn)(params, ck, cv, tokens, position)
    for got, ref in zip(f(params, ck, cv, tokens, position), want):
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
    module = f.lower(params, ck, cv, tokens, position).compile().module
    (scan,) = [op for op in module.ops if op.kind == "scan"]
    body = [op for op in scan.regions["body"].ops if op.kind in COLLECTIVE_KINDS]
    assert [(op.kind, op.attrs["axes"]) for op in body] == [("all_reduce", ("model", "rep"))] * 2
