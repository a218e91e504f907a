"""``lowering.passes.prologue``: cheap producers recomputed inside the kernels
that read them, against hand-computed bytes, the rules that stop it, and
numerics equal to ``jax.jit``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtia_jax
from kernels import flat_kinds, inner, kernels_with, ops_with
from lowering.from_jaxpr import import_closed_jaxpr
from lowering.passes import prologue
from lowering.passes.prologue import MAX_CONSUMERS
from lowering.pipeline import PASSES, PassContext, run_passes
from mtia_jax import chips
from runtime.cost_model import program_cost

S = jax.ShapeDtypeStruct
F32 = jnp.float32
CHIP = chips.get("mtia450")
T, D = 8, 64
X_BYTES, G_BYTES, W_BYTES = T * D * 4, D * 4, D * D * 4
OUT_BYTES = T * D * 4
WITHOUT_PROLOGUE = tuple(p for p in PASSES if p is not prologue)


def _modules(f, *structs):
    """(module after every pass, module after every pass but prologue fusion)."""
    imported = import_closed_jaxpr(jax.make_jaxpr(f)(*structs))
    ctx = PassContext(chip=CHIP)
    return run_passes(imported, ctx), run_passes(imported, ctx, WITHOUT_PROLOGUE)


def _hbm(module) -> float:
    return program_cost(module, CHIP).total("hbm_bytes")


def _args(n_weights, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((T, D)).astype(np.float32),
            rng.standard_normal((D,)).astype(np.float32),
            *(rng.standard_normal((D, D)).astype(np.float32) / 8 for _ in range(n_weights))]


def _structs(n_weights):
    return [S((T, D), F32), S((D,), F32), *(S((D, D), F32) for _ in range(n_weights))]


def _norm_then(n):
    def f(x, g, *ws):
        h = mtia_jax.rms_norm(x, g)
        return tuple(h @ w for w in ws)
    f.__name__ = f"norm_then_{n}_matmuls"
    return f


def _check_numerics(f, structs, args):
    compiled = mtia_jax.jit(f, chip="mtia450").lower(*structs).compile()
    for got, want in zip(jax.tree.leaves(compiled(*args)), jax.tree.leaves(jax.jit(f)(*args)),
                         strict=True):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------ rms_norm into three matmuls

def test_rms_norm_feeding_three_matmuls_is_recomputed_in_each():
    f = _norm_then(3)
    fused, unfused = _modules(f, *_structs(3))
    assert not [op for op in fused.ops if op.kind == "rms_norm"]  # no standalone norm kernel
    matmuls = ops_with(fused.ops, "dot_general")
    assert len(matmuls) == 3
    for op in matmuls:
        assert op.kind == "fused_kernel" and op.attrs["pattern"] == "matmul"
        assert [o.kind for o in op.regions["body"].ops] == ["rms_norm", "dot_general"]
        assert inner(op, "rms_norm").params["eps"] == pytest.approx(1e-6)
    assert flat_kinds(fused.ops) == ["rms_norm", "dot_general"] * 3
    # without the pass: the norm is its own kernel
    assert flat_kinds(unfused.ops).count("rms_norm") == 1

    # bytes by hand: each fused kernel reads x, the norm weight, its W and writes its output
    per_kernel = X_BYTES + G_BYTES + W_BYTES + OUT_BYTES
    assert [k.hbm_bytes for k in program_cost(fused, CHIP).kernels] == [per_kernel] * 3
    # unfused: the norm reads x and g and writes h; each matmul reads h and its W
    norm = X_BYTES + G_BYTES + OUT_BYTES
    matmul = OUT_BYTES + W_BYTES + OUT_BYTES
    assert _hbm(unfused) == norm + 3 * matmul
    assert _hbm(fused) == 3 * per_kernel < norm + 3 * matmul
    # one launch fewer
    assert len(program_cost(fused, CHIP).kernels) == len(program_cost(unfused, CHIP).kernels) - 1
    _check_numerics(f, _structs(3), _args(3))


def test_exactly_max_consumers_are_fused():
    n = MAX_CONSUMERS
    fused, unfused = _modules(_norm_then(n), *_structs(n))
    assert not [op for op in fused.ops if op.kind == "rms_norm"]
    assert flat_kinds(fused.ops).count("rms_norm") == n
    assert _hbm(fused) == n * (X_BYTES + G_BYTES + W_BYTES + OUT_BYTES) < _hbm(unfused)


def test_more_than_max_consumers_are_not_fused():
    n = MAX_CONSUMERS + 1
    # the byte criterion alone would allow it: n * in <= in + (1 + n) * out
    assert n * (X_BYTES + G_BYTES) <= (X_BYTES + G_BYTES) + (1 + n) * OUT_BYTES
    f = _norm_then(n)
    fused, unfused = _modules(f, *_structs(n))
    (norm,) = [op for op in fused.ops if op.kind == "rms_norm"]  # still its own kernel
    assert flat_kinds(fused.ops).count("rms_norm") == 1
    assert len(ops_with(fused.ops, "dot_general")) == n
    assert all(op.kind == "dot_general" for op in ops_with(fused.ops, "dot_general"))
    assert _hbm(fused) == _hbm(unfused) == (X_BYTES + G_BYTES + OUT_BYTES
                                            + n * (OUT_BYTES + W_BYTES + OUT_BYTES))
    _check_numerics(f, _structs(n), _args(n, seed=1))


@pytest.mark.parametrize("returns", ["h", "a view of h"])
def test_a_producer_that_is_a_program_output_is_not_fused(returns):
    def f(x, g, *ws):
        h = mtia_jax.rms_norm(x, g)
        out = h if returns == "h" else h.reshape(-1)
        return (out, *(h @ w for w in ws))
    fused, unfused = _modules(f, *_structs(3))
    assert [op.kind for op in fused.ops if op.kind == "rms_norm"] == ["rms_norm"]
    assert flat_kinds(fused.ops).count("rms_norm") == 1
    assert _hbm(fused) == _hbm(unfused)
    _check_numerics(f, _structs(3), _args(3, seed=2))


# ------------------------------------------------------------ the byte criterion

def _sum_then(n):
    def f(a, b, *ws):
        h = a + b
        return tuple(h @ w for w in ws)
    return f


def test_byte_criterion_for_a_producer_with_two_inputs():
    # h = a + b reads 2 x out and writes out: with n consumers it is fused
    # when n * 2 out <= 2 out + (1 + n) out, i.e. n <= 3
    out = T * D * 4
    structs = lambda n: [S((T, D), F32), S((T, D), F32), *(S((D, D), F32) for _ in range(n))]
    for n in (1, 2, 3):
        fused, unfused = _modules(_sum_then(n), *structs(n))
        assert not [op for op in fused.ops if op.kind == "add"], n
        assert flat_kinds(fused.ops).count("add") == n
        assert _hbm(fused) == n * (2 * out + W_BYTES + out)
        assert _hbm(fused) <= _hbm(unfused)
    n = 4
    assert n * 2 * out > 2 * out + (1 + n) * out
    fused, unfused = _modules(_sum_then(n), *structs(n))
    assert [op.kind for op in fused.ops if op.kind == "add"] == ["add"]
    assert _hbm(fused) == _hbm(unfused) == 3 * out + n * (out + W_BYTES + out)
    rng = np.random.default_rng(3)
    args = [rng.standard_normal((T, D)).astype(np.float32) for _ in range(2)] + \
           [rng.standard_normal((D, D)).astype(np.float32) for _ in range(n)]
    _check_numerics(_sum_then(n), structs(n), args)


# ------------------------------------------------------------ index arithmetic into a gather

def test_index_arithmetic_is_fused_into_the_gather():
    f = lambda table, i: table[(i + 1) % 100]
    structs = [S((100, 16), F32), S((5,), jnp.int32)]
    fused, unfused = _modules(f, *structs)
    (gather,) = ops_with(fused.ops, "gather")
    assert gather.kind == "fused_kernel" and gather.attrs["pattern"] == "gather"
    kinds = flat_kinds([gather])
    assert kinds[-1] == "gather" and {"add", "rem", "select_n"} <= set(kinds)
    assert len(program_cost(fused, CHIP).kernels) == 1
    # without the pass: an elementwise kernel computes the indices, the gather reads them
    assert [k.kind for k in program_cost(unfused, CHIP).kernels][-1] == "gather"
    assert len(program_cost(unfused, CHIP).kernels) == 2
    # by hand: 5 indices (20 bytes) read, 5 rows of 64 bytes gathered, 5 rows written
    rows = 5 * 16 * 4
    assert _hbm(fused) == 5 * 4 + rows + rows
    # unfused: + the index kernel (read 20, write 20) and the gather reads them back
    assert _hbm(unfused) == _hbm(fused) + 2 * 5 * 4
    table = np.arange(1600, dtype=np.float32).reshape(100, 16)
    i = np.array([0, 99, -1, 42, -100], np.int32)
    _check_numerics(f, structs, [table, i])


def test_producers_fold_through_views_into_their_consumer():
    # the norm's result is reshaped (a view) before the matmul reads it
    def f(x, g, w):
        h = mtia_jax.rms_norm(x, g).reshape(2, T // 2, D)
        return h @ w
    structs = [S((T, D), F32), S((D,), F32), S((D, D), F32)]
    fused, _ = _modules(f, *structs)
    assert not [op for op in fused.ops if op.kind == "rms_norm"]
    (matmul,) = ops_with(fused.ops, "dot_general")
    assert "rms_norm" in [o.kind for o in matmul.regions["body"].ops]
    assert len(program_cost(fused, CHIP).kernels) == 1
    _check_numerics(f, structs, _args(1, seed=4))


def test_a_producer_read_by_a_loop_is_not_fused():
    # a scan is not a kernel that takes prologues: the norm stays a kernel
    def f(x, g, ws):
        h = mtia_jax.rms_norm(x, g)
        return jax.lax.scan(lambda c, w: (c @ w, None), h, ws)[0]
    structs = [S((T, D), F32), S((D,), F32), S((3, D, D), F32)]
    fused, unfused = _modules(f, *structs)
    assert [op.kind for op in fused.ops if op.kind == "rms_norm"] == ["rms_norm"]
    assert _hbm(fused) == _hbm(unfused)
    rng = np.random.default_rng(5)
    args = [rng.standard_normal((T, D)).astype(np.float32), rng.standard_normal((D,)).astype(np.float32),
            rng.standard_normal((3, D, D)).astype(np.float32) / 8]
    _check_numerics(f, structs, args)
