"""The collective combiner (lowering/passes/combine_collectives.py): which
collectives it merges and which it leaves apart, on per-device programs from
shard_map bodies and from the partition pass; numerics of the combined
programs against jax.jit; their modeled cost against the uncombined ones."""

import math
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
from lowering import from_jaxpr
from lowering.collectives import COLLECTIVE_KINDS
from lowering.ir import verify
from lowering.passes import combine_collectives, partition
from lowering.pipeline import PASSES, PassContext

MESH_4 = mtia_jax.make_mesh((4,), ("data",))
MESH_2X4 = mtia_jax.make_mesh((2, 4), ("data", "model"))
KEY = jax.random.PRNGKey(0)


def _normal(i, shape):
    return jax.random.normal(jax.random.fold_in(KEY, i), shape)


def _collectives(module):
    """(kind, operand shapes) of every collective, region bodies included, in program order."""
    found = []
    for op in module.ops:
        if op.kind in COLLECTIVE_KINDS:
            found.append((op.kind, tuple(v.type.shape for v in op.operands)))
        for region in op.regions.values():
            found.extend(_collectives(region))
    return found


def _shard_mapped(body, mesh, in_specs, out_specs):
    return lambda *args: jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                       check_vma=False)(*args)


def _per_device(fn, *args):
    """The per-device program of ``fn`` (a shard_map), before and after combining."""
    module = from_jaxpr.import_closed_jaxpr(jax.make_jaxpr(fn)(*args))
    before = partition.run(module, PassContext(chip=mtia_jax.chips.get("mtia450")))
    after = combine_collectives.run(before)
    verify(after)
    return before, after


# ------------------------------------------------------------ jax.jit of the shard_maps
#
# A mtia_jax mesh is logical (no JAX devices behind it), so jax.jit cannot run
# a shard_map over it. As in test_sharding.py, the jax.jit references run in a
# subprocess with 8 host devices: the same bodies, specs and arguments, over a
# jax.sharding.Mesh of real devices. Bodies with numerics register here.

SHARD_MAPS = {}  # name -> (body, logical mesh, in_specs, out_specs, args)


def shard_map_case(mesh, in_specs, out_specs, *args):
    def register(body):
        SHARD_MAPS[body.__name__] = (body, mesh, in_specs, out_specs, args)
        return body
    return register


def _case(body):
    """``body`` shard-mapped over its logical mesh, then its arguments."""
    _, mesh, in_specs, out_specs, args = SHARD_MAPS[body.__name__]
    return _shard_mapped(body, mesh, in_specs, out_specs), *args


JAX_JIT_ON_HOST_DEVICES = textwrap.dedent("""
    import importlib.util, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    assert len(jax.devices()) == 8
    spec = importlib.util.spec_from_file_location("cases", sys.argv[1])
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    out = {}
    for name, (body, mesh, in_specs, out_specs, args) in cases.SHARD_MAPS.items():
        real = Mesh(np.array(jax.devices()[:mesh.size]).reshape(mesh.axis_sizes), mesh.axis_names)
        results = jax.jit(cases._shard_mapped(body, real, in_specs, out_specs))(*args)
        for i, r in enumerate(jax.tree.leaves(results)):
            out[f"{name}/{i}"] = np.asarray(r)
    np.savez(sys.argv[2], **out)
""")


@pytest.fixture(scope="module")
def jax_jit(tmp_path_factory):
    """name -> the results of jax.jit of that shard_map on real host devices."""
    path = tmp_path_factory.mktemp("jax_jit") / "results.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", JAX_JIT_ON_HOST_DEVICES, __file__, str(path)],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(path) as saved:
        results = {key: saved[key] for key in saved.files}
    return {name: [results[f"{name}/{i}"] for i in range(sum(k.startswith(name + "/") for k in results))]
            for name in SHARD_MAPS}


def _check_numerics(body, jax_jit):
    f, *args = _case(body)
    got = jax.tree.leaves(mtia_jax.jit(f)(*args))
    want = jax_jit[body.__name__]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ the pass alone

@shard_map_case(MESH_4, (P("data"),) * 3, (P(),) * 3,
                _normal(1, (8,)), _normal(2, (4, 3)), _normal(3, (4, 2, 5)))
def three_psums(x, y, z):
    a = jax.lax.psum(x, "data")
    a1 = a + 1.0  # reads the first psum before the others are issued: moves after the combined op
    b = jax.lax.psum(y * 2.0, "data")
    c = jax.lax.psum(jnp.sin(z), "data")
    return a1, b, c


def test_independent_psums_of_different_shapes_become_one_all_reduce(jax_jit):
    before, after = _per_device(*_case(three_psums))
    assert [k for k, _ in _collectives(before)] == ["all_reduce"] * 3
    assert _collectives(after) == [("all_reduce", ((2,), (1, 3), (1, 2, 5)))]
    (combined,) = [op for op in after.ops if op.kind == "all_reduce"]
    assert combined.attrs["axes"] == ("data",) and combined.attrs["reduce"] == "sum"
    # the results are the original values: nothing downstream renamed
    assert after.outputs == before.outputs
    # a + 1 now follows the combined op that defines a
    kinds = [op.kind for op in after.ops]
    assert kinds.index("all_reduce") < kinds.index("add")
    # one op, several operands and results, in the IR text
    assert "all_reduce(%" in after.as_text() and ", f32[1,3], f32[1,2,5]" in after.as_text()
    _check_numerics(three_psums, jax_jit)


@shard_map_case(MESH_4, (P("data"),) * 2, (P(),) * 2, _normal(4, (8,)), _normal(5, (8,)))
def psum_of_a_psum(x, y):
    a = jax.lax.psum(x, "data")
    b = jax.lax.psum(a * y, "data")  # depends on the first
    c = jax.lax.psum(y, "data")      # independent of both
    return b, c


def test_a_psum_of_another_psums_result_is_not_merged(jax_jit):
    _, after = _per_device(*_case(psum_of_a_psum))
    # b depends on a, so it opens a new group, and c joins the open one: b's.
    # (XLA's combiner does the same: a group ends at its first dependent op.)
    assert _collectives(after) == [("all_reduce", ((2,),)), ("all_reduce", ((2,), (2,)))]
    first, second = [op for op in after.ops if op.kind == "all_reduce"]
    (mul,) = [op for op in after.ops if op.kind == "mul"]
    assert mul.operands[0] is first.results[0] and second.operands[0] is mul.results[0]
    _check_numerics(psum_of_a_psum, jax_jit)


@shard_map_case(MESH_2X4, (P("data", "model"),) * 4,
                (P(None, "model"), P("data"), P(None, "model"), P(None, "model"), P("data"), P("data")),
                *(_normal(i, (4, 8)) for i in range(6, 10)))
def mixed_collectives(x, y, z, w):
    return (jax.lax.psum(x, "data"), jax.lax.psum(y, "model"), jax.lax.pmax(z, "data"),
            jax.lax.psum(w, "data"),  # joins the first
            jax.lax.all_gather(x, "model", tiled=True), jax.lax.all_gather(y, "model", axis=1, tiled=True))


def test_different_axes_kinds_and_reductions_are_not_merged(jax_jit):
    _, after = _per_device(*_case(mixed_collectives))
    assert sorted(_collectives(after)) == [
        ("all_gather", ((2, 2),)), ("all_gather", ((2, 2),)),  # dim 0 and dim 1
        ("all_reduce", ((2, 2),)), ("all_reduce", ((2, 2),)),  # over "model"; a max
        ("all_reduce", ((2, 2), (2, 2)))]
    (merged,) = [op for op in after.ops if len(op.operands) == 2]
    assert merged.attrs["axes"] == ("data",) and merged.attrs["reduce"] == "sum"
    _check_numerics(mixed_collectives, jax_jit)


@shard_map_case(MESH_4, (P("data"),) * 2, (P("data"),) * 2, _normal(10, (8, 2)), _normal(11, (4,)))
def psums_in_a_scan(x, y):
    def step(carry, _):
        u, v = carry
        return (jax.lax.psum(u, "data") * 0.5, jax.lax.psum(jnp.cos(v), "data") * 0.25), None
    return jax.lax.scan(step, (x, y), None, length=3)[0]


def test_psums_inside_a_scan_body_are_merged(jax_jit):
    before, after = _per_device(*_case(psums_in_a_scan))
    (scan,) = [op for op in after.ops if op.kind == "scan"]
    assert _collectives(scan.regions["body"]) == [("all_reduce", ((2, 2), (1,)))]
    assert len(_collectives(before)) == 2
    _check_numerics(psums_in_a_scan, jax_jit)


@shard_map_case(MESH_4, (P("data"),) * 2, (P("data"), P("data")), _normal(12, (64,)), _normal(13, (64,)))
def crossed_dependencies(p0, p1):
    r1 = jax.lax.psum_scatter(p0, "data", tiled=True)
    s1 = jax.lax.psum(p1, "data")
    r2 = jax.lax.psum_scatter(s1 * 2.0, "data", tiled=True)
    s2 = jax.lax.psum(r1 + 1.0, "data")
    return r2, s2


def test_groups_never_wait_for_each_other(jax_jit):
    # r2 waits for s1 (an all-reduce); s2 waits for r1 (a reduce-scatter). Each
    # pair could merge on its own, but not both: the merged ops would wait
    # for each other. The reduce-scatters merge, the all-reduces stay apart.
    _, after = _per_device(*_case(crossed_dependencies))
    assert sorted(_collectives(after)) == [("all_reduce", ((4,),)), ("all_reduce", ((16,),)),
                                           ("reduce_scatter", ((16,), (16,)))]
    _check_numerics(crossed_dependencies, jax_jit)


def test_combined_size_is_capped(monkeypatch):
    def body(x, y, z):
        return jax.lax.psum(x, "data"), jax.lax.psum(y, "data"), jax.lax.psum(z, "data")

    f = _shard_mapped(body, MESH_4, (P("data"),) * 3, (P(),) * 3)
    args = tuple(_normal(i, (64,)) for i in range(14, 17))  # 64 bytes per device each
    monkeypatch.setattr(combine_collectives, "COMBINE_THRESHOLD_BYTES", 128)
    _, after = _per_device(f, *args)
    assert _collectives(after) == [("all_reduce", ((16,), (16,))), ("all_reduce", ((16,),))]


def test_all_to_alls_carrying_a_payload_are_left_alone():
    def body(x, y):
        return (jax.lax.all_to_all(x, "data", 0, 1, tiled=True),
                jax.lax.all_to_all(y, "data", 0, 1, tiled=True))

    f = _shard_mapped(body, MESH_4, (P("data"),) * 2, (P("data"),) * 2)
    args = (_normal(17, (16, 4)), _normal(18, (16, 4)))
    before, after = _per_device(f, *args)
    assert _collectives(after) == [("all_to_all", ((4, 4), (4, 4)))]  # without a payload: merged
    for op in before.ops:
        if op.kind == "all_to_all":
            op.attrs["payload_bytes"] = 8
    assert _collectives(combine_collectives.run(before)) == [("all_to_all", ((4, 4),))] * 2


def test_the_pass_runs_right_after_partitioning():
    assert PASSES[PASSES.index(partition) + 1] is combine_collectives


# ------------------------------------------------------------ from the partition pass

def _row_split_lookups(t1, t2, t3, ids):
    # three row-split tables: three partial sums, resolved where concatenated
    return jnp.concatenate([jnp.take(t, ids, axis=0) for t in (t1, t2, t3)], axis=-1)


def _row_split_lookups_per_table(t1, t2, t3, ids):
    # TorchRec's row-wise sharding: each table's lookups, split over the batch
    return tuple(jnp.take(t, ids, axis=0) for t in (t1, t2, t3))


def _compiled(fn, args, shardings, out_shardings=None, **kwargs):
    f = mtia_jax.jit(fn, in_shardings=shardings, out_shardings=out_shardings, **kwargs)
    return f, f.lower(*args).compile()


LOOKUP_ARGS = (_normal(20, (16, 4)), _normal(21, (16, 8)), _normal(22, (16, 4)),
               jnp.asarray([[0, 3, 15], [7, 8, 12], [4, 4, 1], [11, 2, 9]], jnp.int32))


@pytest.mark.parametrize("fn, mesh, spec, out, kind", [
    (_row_split_lookups, MESH_4, P("data", None), None, "all_reduce"),
    (_row_split_lookups_per_table, MESH_4, P("data", None), (P("data"),) * 3, "reduce_scatter"),
    (_row_split_lookups, MESH_2X4, P(("data", "model"), None), None, "all_reduce"),
])
def test_partial_sums_of_row_split_tables_are_resolved_by_one_collective(fn, mesh, spec, out, kind):
    shardings = (NamedSharding(mesh, spec),) * 3 + (None,)
    out_shardings = None if out is None else tuple(NamedSharding(mesh, o) for o in out)
    f, compiled = _compiled(fn, LOOKUP_ARGS, shardings, out_shardings)
    ((found, shapes),) = _collectives(compiled.module)
    assert found == kind and shapes == ((4, 3, 4), (4, 3, 8), (4, 3, 4))
    (op,) = [op for op in compiled.module.ops if op.kind == kind]
    rows = 1 if kind == "reduce_scatter" else 4  # a reduce-scatter keeps this device's 4 / 4 batch rows
    assert [v.type.shape for v in op.results] == [(rows, 3, 4), (rows, 3, 8), (rows, 3, 4)]
    for got, want in zip(jax.tree.leaves(f(*LOOKUP_ARGS)), jax.tree.leaves(jax.jit(fn)(*LOOKUP_ARGS))):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_eager_mode_refuses_a_sharded_program_before_running_it():
    # eager mode runs one device's kernels one by one, outside any mesh axis:
    # a collective (combined or not) cannot run there, so compiling says so
    shardings = (NamedSharding(MESH_4, P("data", None)),) * 3 + (None,)
    with pytest.raises(ValueError, match=r"sharded programs run in mode='graph'.*drop mode='eager'"):
        _compiled(_row_split_lookups, LOOKUP_ARGS, shardings, mode="eager")
    f, _ = _compiled(_row_split_lookups, LOOKUP_ARGS, shardings, mode="graph")
    np.testing.assert_allclose(f(*LOOKUP_ARGS), jax.jit(_row_split_lookups)(*LOOKUP_ARGS),
                               rtol=1e-6, atol=1e-6)


def test_row_split_contractions_all_reduce_together_in_mixed_dtypes():
    def f(x, w1, w2):
        return (x @ w1).astype(jnp.float32), (x.astype(jnp.bfloat16) @ w2.astype(jnp.bfloat16))

    x, w1, w2 = _normal(23, (4, 16)), _normal(24, (16, 8)), _normal(25, (16, 4))
    shardings = (NamedSharding(MESH_4, P(None, "data")), NamedSharding(MESH_4, P("data", None)),
                 NamedSharding(MESH_4, P("data", None)))
    g, compiled = _compiled(f, (x, w1, w2), shardings)
    (op,) = [op for op in compiled.module.ops if op.kind == "all_reduce"]
    assert [str(v.type) for v in op.operands] == ["f32[4,8]", "bf16[4,4]"]
    for got, want in zip(g(x, w1, w2), jax.jit(f)(x, w1, w2)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------ modeled cost
#
# On MTIA 450 (a switched scale-up fabric) a small all-reduce over p = 4
# devices runs one-shot: one step in which a device sends its N bytes to
# each of the p - 1 others (lowering/network.py),
#     alpha + ceil((p - 1) / L) o + (p - 1) N / B.
# A combined all-reduce is one such message of the bytes of all its operands.

def _one_shot_s(chip, nbytes, p=4):
    bandwidth = chip.scaleup_link_bandwidth * chip.collective_efficiency
    return (chip.scaleup_link_latency_s + math.ceil((p - 1) / chip.scaleup_links) * chip.scaleup_message_s
            + (p - 1) * nbytes / bandwidth)


def _network(compiled):
    return [k for k in compiled.cost.kernels if k.stream == "network"]


def _with_and_without_combining(monkeypatch, compile_it):
    combined = compile_it()
    monkeypatch.setattr(combine_collectives, "run", lambda module, ctx=None: module)
    return combined, compile_it()


def test_a_combined_all_reduce_pays_one_message_latency_for_the_bytes_of_all(monkeypatch):
    def body(x, y, z):
        return jax.lax.psum(x, "data"), jax.lax.psum(y, "data"), jax.lax.psum(z, "data")

    f = _shard_mapped(body, MESH_4, (P("data"),) * 3, (P(),) * 3)
    args = (_normal(30, (8,)), _normal(31, (4, 3)), _normal(32, (4, 2, 5)))
    combined, separate = _with_and_without_combining(
        monkeypatch, lambda: mtia_jax.jit(f).lower(*args).compile())
    chip = mtia_jax.chips.get(combined.cost.chip)
    assert chip.scaleup_topology == "switched" and "near_memory_reduce" in chip.units
    sizes = (2 * 4, 3 * 4, 10 * 4)  # per-device bytes of f32[2], f32[1,3], f32[1,2,5]
    assert [k.algorithm for k in _network(separate)] == ["one_shot"] * 3
    assert [k.algorithm for k in _network(combined)] == ["one_shot"]
    assert [k.transfer_s for k in _network(separate)] == pytest.approx([_one_shot_s(chip, n) for n in sizes])
    (one,) = _network(combined)
    assert one.transfer_s == pytest.approx(_one_shot_s(chip, sum(sizes)))
    # the same bytes on the wire, (p - 1) N, and through HBM: each sent byte
    # read and each received byte written, each reduced one read again (near memory)
    assert one.collective_bytes == pytest.approx(3 * sum(sizes)) == separate.cost.total("collective_bytes")
    assert one.hbm_bytes == pytest.approx(9 * sum(sizes)) == separate.cost.total("hbm_bytes")
    # nothing to overlap: the separate all-reduces run back to back, each
    # launched while the one before runs, the first launch exposed
    launch = chip.kernel_launch_s
    assert separate.cost.time_s == pytest.approx(launch + sum(_one_shot_s(chip, n) for n in sizes))
    assert combined.cost.time_s == pytest.approx(launch + _one_shot_s(chip, sum(sizes)))
    # two message latencies saved: two messages of no bytes
    assert separate.cost.time_s - combined.cost.time_s == pytest.approx(2 * _one_shot_s(chip, 0))


def test_a_combined_collective_starts_when_its_last_operand_is_ready(monkeypatch):
    # The DLRM case: the three tables' partial sums are ready one after the
    # other. Apart, the first all-reduces run while the next tables are looked
    # up; combined, the one all-reduce waits
    # for the last table. It saves two message latencies but loses that
    # overlap, and here (tiny tables, latency-bound) it ends later: the price
    # the pass's docstring names.
    shardings = (NamedSharding(MESH_4, P("data", None)),) * 3 + (None,)
    combined, separate = _with_and_without_combining(
        monkeypatch, lambda: _compiled(_row_split_lookups, LOOKUP_ARGS, shardings)[1])
    chip = mtia_jax.chips.get(combined.cost.chip)
    sizes = tuple(4 * 3 * width * 4 for width in (4, 8, 4))  # f32[4,3,width] partial sums
    assert [k.transfer_s for k in _network(separate)] == pytest.approx([_one_shot_s(chip, n) for n in sizes])
    (one,) = _network(combined)
    assert one.transfer_s == pytest.approx(_one_shot_s(chip, sum(sizes)))
    assert one.transfer_s < sum(k.transfer_s for k in _network(separate))
    assert combined.cost.total("collective_bytes") == pytest.approx(separate.cost.total("collective_bytes"))
    assert combined.cost.total("hbm_bytes") == pytest.approx(separate.cost.total("hbm_bytes"))

    def compute_ends(compiled):
        return [k.start_s + k.time_s for k in compiled.cost.kernels if k.stream == "compute"]

    # apart, the first all-reduce starts while tables are still being looked up
    assert min(k.start_s for k in _network(separate)) < max(compute_ends(separate))
    # combined, it starts after the last lookup, launch exposed (the kernel
    # before it is shorter than a launch), and the program ends with it
    assert one.start_s == pytest.approx(max(compute_ends(combined)))
    ns = 1e-9  # the kernel before it and the final concatenation take ~1e-11 s
    assert one.launch_s == pytest.approx(chip.kernel_launch_s, abs=ns)
    assert combined.cost.time_s == pytest.approx(one.start_s + chip.kernel_launch_s + one.transfer_s, abs=ns)
    assert combined.cost.time_s > separate.cost.time_s
