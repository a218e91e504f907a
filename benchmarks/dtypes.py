"""What MX weights buy: a Llama-style decoder block and an MLP under bf16 and
MX8/MX6/MX4 weight policies (activations MX8), modeled on MTIA 400/450/500,
with the output error each policy costs.

    python benchmarks/dtypes.py

Modeled times come from ``mtia_jax.estimate`` at full size (shapes only):

* block, decode: batch 8, one new token against a KV cache of 2048;
* block, prefill: batch 1, 2048 tokens (causal);
* the block: d_model 4096, 32 heads, 8 KV heads (GQA), FFN 14336 with
  SwiGLU, RMSNorm, rotary embeddings, written in plain jnp;
* MLP: the block's SwiGLU FFN alone (4096 -> 14336 -> 4096), decode (8
  tokens) and prefill (2048 tokens).

Weights and activations are bf16 program arguments; a policy quantizes the
weight matmuls (the attention products stay bf16: ``attention=False``).
The error column is ``||y - y_fp32|| / ||y_fp32||`` of the same program
actually executed with ``mtia_jax.jit`` at small shapes (d_model 256, 8
heads, 2 KV heads, FFN 896, cache / prompt 64), against an fp32 run without
a policy on the same (fp32) weights and inputs.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mtia_jax  # noqa: E402
from mtia_jax.precision import PrecisionPolicy  # noqa: E402

CHIPS = ("mtia400", "mtia450", "mtia500")
POLICIES = {
    "bf16": None,
    "mx8": PrecisionPolicy(weights="mx8", activations="mx8"),
    "mx6": PrecisionPolicy(weights="mx6", activations="mx8"),
    "mx4": PrecisionPolicy(weights="mx4", activations="mx8"),
}
FULL = dict(d=4096, heads=32, kv_heads=8, ffn=14336, cache=2048, decode_batch=8, prompt=2048)
SMALL = dict(d=256, heads=8, kv_heads=2, ffn=896, cache=64, decode_batch=4, prompt=64)


# ------------------------------------------------------------ the programs

def rms_norm(x, gamma, eps=1e-5):
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * gamma.astype(jnp.float32)).astype(x.dtype)


def rotary(x, positions, base=10000.0):
    """Rotate-half rotary embedding of x (b, t, h, d) at ``positions`` (t,)."""
    half = x.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def gqa_attention(q, k, v, mask):
    """q (b, t, h, d); k, v (b, s, g, d) with h = g * r; mask (t, s) True = attend."""
    b, t, h, d = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, d)
    scores = jnp.einsum("btgrd,bsgd->bgrts", q, k).astype(jnp.float32) / np.sqrt(d)
    scores = jnp.where(mask, scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bgrts,bsgd->btgrd", probs, v).reshape(b, t, h * d)


def swiglu_ffn(x, p):
    return (jax.nn.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def _qkv(x, p, heads, kv_heads, positions):
    b, t, d = x.shape
    hd = d // heads
    h = rms_norm(x, p["attn_norm"])
    q = rotary((h @ p["wq"]).reshape(b, t, heads, hd), positions)
    k = rotary((h @ p["wk"]).reshape(b, t, kv_heads, hd), positions)
    v = (h @ p["wv"]).reshape(b, t, kv_heads, hd)
    return q, k, v


def _finish(x, attn, p):
    x = x + attn @ p["wo"]
    return x + swiglu_ffn(rms_norm(x, p["ffn_norm"]), p)


def decode_block(p, x, k_cache, v_cache, pos, *, heads, kv_heads):
    """One new token per sequence: x (b, 1, d), caches (b, s, g, hd), pos scalar."""
    q, k, v = _qkv(x, p, heads, kv_heads, pos[None])
    k_cache = lax.dynamic_update_slice(k_cache, k, (0, pos, 0, 0))
    v_cache = lax.dynamic_update_slice(v_cache, v, (0, pos, 0, 0))
    mask = (jnp.arange(k_cache.shape[1]) <= pos)[None, :]
    out = _finish(x, gqa_attention(q, k_cache, v_cache, mask), p)
    return out, k_cache, v_cache


def prefill_block(p, x, *, heads, kv_heads):
    """A whole prompt, causal: x (b, t, d)."""
    t = x.shape[1]
    q, k, v = _qkv(x, p, heads, kv_heads, jnp.arange(t))
    mask = jnp.tril(jnp.ones((t, t), bool))
    return _finish(x, gqa_attention(q, k, v, mask), p)


def mlp(p, x):
    return swiglu_ffn(x, p)


# ------------------------------------------------------------ arguments

def param_shapes(d, heads, kv_heads, ffn, **_):
    hd = d // heads
    return {"attn_norm": (d,), "ffn_norm": (d,), "wq": (d, d), "wk": (d, kv_heads * hd),
            "wv": (d, kv_heads * hd), "wo": (d, d), "w_gate": (d, ffn), "w_up": (d, ffn),
            "w_down": (ffn, d)}


def programs(cfg):
    """name -> (function, argument shapes as {name: shape}, int args)."""
    d, hd = cfg["d"], cfg["d"] // cfg["heads"]
    b, s, t = cfg["decode_batch"], cfg["cache"], cfg["prompt"]
    kw = dict(heads=cfg["heads"], kv_heads=cfg["kv_heads"])
    cache = (b, s, cfg["kv_heads"], hd)
    return {
        "block decode": (functools.partial(decode_block, **kw), [(b, 1, d), cache, cache], True),
        "block prefill": (functools.partial(prefill_block, **kw), [(1, t, d)], False),
        "mlp decode": (mlp, [(b, d)], False),
        "mlp prefill": (mlp, [(t, d)], False),
    }


def _structs(cfg, shapes, with_pos, dtype):
    params = {k: jax.ShapeDtypeStruct(s, dtype) for k, s in param_shapes(**cfg).items()}
    args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
    if with_pos:
        args.append(jax.ShapeDtypeStruct((), jnp.int32))
    return params, args


def _values(cfg, shapes, with_pos, seed=0):
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(**cfg).items():
        if name.endswith("norm"):
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            params[name] = rng.standard_normal(shape) / np.sqrt(shape[0])
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    if with_pos:
        args.append(jnp.int32(shapes[1][1] - 1))  # the last cache slot
    return params, args


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def relative_error(fn, cfg, shapes, with_pos, policy) -> float:
    params, args = _values(cfg, shapes, with_pos)
    want = np.asarray(_first(mtia_jax.jit(fn)(params, *args)), np.float64)
    to_bf16 = lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
    p16, a16 = jax.tree.map(to_bf16, params), [to_bf16(a) for a in args]
    got = np.asarray(_first(mtia_jax.jit(fn, precision=policy)(p16, *a16)).astype(jnp.float32),
                     np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def modeled_time(fn, cfg, shapes, with_pos, policy, chip) -> float:
    params, args = _structs(cfg, shapes, with_pos, jnp.bfloat16)
    donated = (2, 3) if with_pos else ()  # decode_block's KV caches, written in place
    return mtia_jax.estimate(fn, params, *args, chip=chip, precision=policy,
                             donate_argnums=donated).time_s


def main():
    full, small = programs(FULL), programs(SMALL)
    print("Llama-style block (d_model 4096, 32 heads, 8 KV heads, FFN 14336, SwiGLU) and its")
    print("SwiGLU MLP: modeled time in us (a performance model, not a measurement); weights")
    print("in the policy's format, activations mx8; error vs fp32 at small shapes (executed)")
    header = f"{'program':<14} {'policy':<6} " + " ".join(f"{c + ' us':>12}" for c in CHIPS)
    header += f" {'x vs bf16 (450)':>16} {'rel. error':>11}"
    print(header)
    print("-" * len(header))
    for name, (fn, shapes, with_pos) in full.items():
        base = None
        for label, policy in POLICIES.items():
            times = [modeled_time(fn, FULL, shapes, with_pos, policy, c) for c in CHIPS]
            base = base or times[CHIPS.index("mtia450")]
            sfn, sshapes, swith = small[name]
            err = relative_error(sfn, SMALL, sshapes, swith, policy)
            cells = " ".join(f"{t * 1e6:>12.2f}" for t in times)
            speedup = base / times[CHIPS.index("mtia450")]
            print(f"{name:<14} {label:<6} {cells} {speedup:>16.2f} {err:>11.2e}")


if __name__ == "__main__":
    main()
