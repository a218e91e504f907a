"""Custom MTIA kernels written in Pallas, run through ``mtia_jax.jit`` and
modeled from their own structure.

    python examples/pallas_kernels.py

Four kernels: a tiled matmul, a fused RMSNorm + matmul, a FlashAttention
forward (online softmax over KV blocks) and an MX4-weight dequantize-and-
multiply. Each runs on the host in Pallas's interpret mode and is checked
bit for bit against ``jax.jit`` of the same kernel with ``interpret=True``
and against its ``jnp`` reference; each is printed beside what the
compiler's own kernels are modeled at for the same math (``jnp`` through
``mtia_jax.estimate``). Then ``mtia_jax.pallas.autotune`` picks the matmul's
block sizes. Every time printed is modeled on the chip, not measured.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

import mtia_jax
from mtia_jax import mx
from mtia_jax.pallas import CompilerParams

PARALLEL, SEQUENTIAL = "parallel", "arbitrary"


# ------------------------------------------------------------ tiled matmul

def matmul(x, w, *, bm: int = 128, bn: int = 128, bk: int = 128, interpret: bool = False):
    """``x @ w`` (float32 out) over a (M/bm, N/bn, K/bk) grid; the K steps
    accumulate into the output block, which stays put while k runs."""
    (m, k), n = x.shape, w.shape[1]

    def kernel(x_ref, w_ref, o_ref):
        @pl.when(pl.program_id(2) == 0)
        def _():
            o_ref[...] = jnp.zeros_like(o_ref)

        o_ref[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32), grid=(m // bm, n // bn, k // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        compiler_params=CompilerParams(dimension_semantics=(PARALLEL, PARALLEL, SEQUENTIAL)),
        interpret=interpret, name="tiled_matmul")(x, w)


# ------------------------------------------------------------ RMSNorm + matmul

def rmsnorm_matmul(x, gamma, w, *, bm: int = 128, bn: int = 256, eps: float = 1e-6,
                   interpret: bool = False):
    """``rms_norm(x) * gamma @ w``: each (bm, D) row block is normalized in the
    kernel and multiplied by a (D, bn) column block; the normalized rows
    never go to HBM."""
    (m, d), n = x.shape, w.shape[1]

    def kernel(x_ref, g_ref, w_ref, o_ref):
        x = x_ref[...].astype(jnp.float32)
        h = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * g_ref[...].astype(jnp.float32)
        o_ref[...] = jnp.dot(h.astype(w_ref.dtype), w_ref[...],
                             preferred_element_type=jnp.float32).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, d), lambda i, j: (i, 0)), pl.BlockSpec((1, d), lambda i, j: (0, 0)),
                  pl.BlockSpec((d, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=CompilerParams(dimension_semantics=(PARALLEL, PARALLEL)),
        interpret=interpret, name="rmsnorm_matmul")(x, gamma.reshape(1, d), w)


def rmsnorm_matmul_reference(x, gamma, w, eps: float = 1e-6):
    xf = x.astype(jnp.float32)
    h = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps) * gamma.astype(jnp.float32)
    return jnp.dot(h.astype(w.dtype), w, preferred_element_type=jnp.float32).astype(x.dtype)


# ------------------------------------------------------------ FlashAttention forward

def flash_attention(q, k, v, *, bq: int = 128, bkv: int = 128, interpret: bool = False):
    """Softmax attention (no mask) of q (BH, T, d) over k, v (BH, S, d): each
    grid step owns a (bq, d) query block and walks the KV blocks with a
    running max and sum (online softmax); the score matrix stays on chip."""
    bh, t, d = q.shape
    s = k.shape[1]
    scale = 1.0 / math.sqrt(d)

    def kernel(q_ref, k_ref, v_ref, o_ref):
        q_blk = q_ref[0].astype(jnp.float32) * scale

        def step(j, carry):
            m_prev, l_prev, acc = carry
            kb = k_ref[0, pl.ds(j * bkv, bkv), :].astype(jnp.float32)
            vb = v_ref[0, pl.ds(j * bkv, bkv), :].astype(jnp.float32)
            scores = jnp.dot(q_blk, kb.T)
            m_new = jnp.maximum(m_prev, scores.max(axis=-1))
            p = jnp.exp(scores - m_new[:, None])
            alpha = jnp.exp(m_prev - m_new)
            return m_new, alpha * l_prev + p.sum(axis=-1), alpha[:, None] * acc + jnp.dot(p, vb)

        init = (jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32),
                jnp.zeros((bq, d), jnp.float32))
        _, l_final, acc = lax.fori_loop(0, s // bkv, step, init)
        o_ref[0] = (acc / l_final[:, None]).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(bh, t // bq),
        in_specs=[pl.BlockSpec((1, bq, d), lambda b, i: (b, i, 0)),
                  pl.BlockSpec((1, s, d), lambda b, i: (b, 0, 0)),
                  pl.BlockSpec((1, s, d), lambda b, i: (b, 0, 0))],
        out_specs=pl.BlockSpec((1, bq, d), lambda b, i: (b, i, 0)),
        compiler_params=CompilerParams(dimension_semantics=(PARALLEL, PARALLEL)),
        interpret=interpret, name="flash_attention_fwd")(q, k, v)


def attention_reference(q, k, v):
    scores = jnp.einsum("bqd,bkd->bqk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
    return jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, axis=-1), v.astype(jnp.float32)).astype(q.dtype)


# ------------------------------------------------------------ MX4 weights

def mx4_matmul(x, w: mx.MXArray, *, bm: int = 128, bn: int = 128, interpret: bool = False):
    """``x @ dequantize(w)`` for MX4 weights quantized along K (axis 0): the
    kernel reads the packed 4-bit elements and one E8M0 scale per 32 of K,
    and dequantizes on chip."""
    (m, k), n = x.shape, w.shape[1]
    block = w.block_size

    def kernel(x_ref, e_ref, s_ref, o_ref):
        scales = jnp.exp2(s_ref[...].astype(jnp.float32) - 127.0)              # (K/32, bn)
        values = e_ref[...].astype(jnp.float32).reshape(k // block, block, bn) * scales[:, None, :]
        o_ref[...] = jnp.dot(x_ref[...].astype(jnp.float32), values.reshape(k, bn),
                             preferred_element_type=jnp.float32)

    scale_bits = lax.bitcast_convert_type(w.scales, jnp.uint8)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.float32), grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((k, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((k // block, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=CompilerParams(dimension_semantics=(PARALLEL, PARALLEL)),
        interpret=interpret, name="mx4_matmul")(x, w.elements, scale_bits)


def mx4_matmul_reference(x, w: mx.MXArray):
    return jnp.dot(x.astype(jnp.float32), mx.dequantize(w, jnp.float32), preferred_element_type=jnp.float32)


# ------------------------------------------------------------ the demo

def _inputs(chip: str):
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    normal = lambda shape, dtype=jnp.bfloat16: jax.random.normal(next(keys), shape, jnp.float32).astype(dtype)
    x, w = normal((512, 1024)), normal((1024, 512)) / 32
    gamma = 1 + normal((1024,)) / 8
    q, k, v = normal((2, 512, 128)), normal((2, 512, 128)), normal((2, 512, 128))
    w_mx = mx.quantize(normal((1024, 512), jnp.float32) / 32, "mx4", axis=0)
    return {
        "tiled matmul": (matmul, functools.partial(jnp.dot, preferred_element_type=jnp.float32), (x, w)),
        "RMSNorm + matmul": (rmsnorm_matmul, rmsnorm_matmul_reference, (x, gamma, w)),
        "FlashAttention forward": (flash_attention, attention_reference, (q, k, v)),
        "MX4 dequantize-and-multiply": (mx4_matmul, mx4_matmul_reference, (x.astype(jnp.float32), w_mx)),
    }


def compare(chip: str = "mtia450") -> None:
    print(f"{'kernel':<28} {'Pallas us':>10} {'floor us':>9} {'compiler us':>12} {'max |err| vs jnp':>17}  "
          f"(modeled on {chip})")
    for name, (kernel, reference, args) in _inputs(chip).items():
        got = mtia_jax.jit(kernel, chip=chip)(*args)
        interpreted = jax.jit(functools.partial(kernel, interpret=True))(*args)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(interpreted))  # bit-equal
        want = reference(*args)
        err = float(np.max(np.abs(np.asarray(got, np.float32) - np.asarray(want, np.float32))))
        pallas = mtia_jax.estimate(kernel, *args, chip=chip)
        ours = mtia_jax.estimate(reference, *args, chip=chip)
        print(f"{name:<28} {pallas.time_s * 1e6:>10.2f} {pallas.roofline_time_s * 1e6:>9.2f} "
              f"{ours.time_s * 1e6:>12.2f} {err:>17.3g}")


def tune(chip: str = "mtia450") -> None:
    x = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)
    configs = [dict(bm=bm, bn=bn, bk=bk) for bm in (64, 128, 256) for bn in (128, 256, 512) for bk in (128, 512)]
    result = mtia_jax.pallas.autotune(lambda **c: functools.partial(matmul, **c), configs, x, x, chip=chip)
    print()
    print(result.table())


if __name__ == "__main__":
    compare()
    tune()
