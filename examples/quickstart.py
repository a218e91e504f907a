"""Quick start: compile two small programs for every chip in the catalogue.

Each program runs for real on the host (and is checked against ``jax.jit``)
and carries a *modeled* timeline on each chip: the times printed below come
from mtia-jax's performance model, not from MTIA silicon.

    python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np

import mtia_jax


def mlp(params, x):
    for w, b in params[:-1]:
        x = jax.nn.gelu(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def attention(q, k, v):
    """Causal softmax attention written in plain jnp; layout (batch, seq, heads, dim)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def make_inputs():
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    dims = [1024, 4096, 4096, 1024]
    params = [(jax.random.normal(next(keys), (i, o), jnp.bfloat16) / np.sqrt(i),
               jnp.zeros((o,), jnp.bfloat16)) for i, o in zip(dims[:-1], dims[1:])]
    x = jax.random.normal(next(keys), (256, dims[0]), jnp.bfloat16)
    qkv = [jax.random.normal(next(keys), (4, 512, 8, 64), jnp.bfloat16) for _ in range(3)]
    return (params, x), tuple(qkv)


def main():
    programs = dict(zip(("mlp", "attention"), make_inputs()))
    functions = {"mlp": mlp, "attention": attention}

    for name, args in programs.items():
        got = mtia_jax.jit(functions[name])(*args)
        want = jax.jit(functions[name])(*args)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        print(f"{name}: mtia_jax.jit result equals jax.jit bit for bit, shape {got.shape} {got.dtype}")

    print("\nModeled on each chip (performance model, not a measurement):")
    header = (f"{'program':<10} {'chip':<9} {'modeled us':>11} {'roofline us':>12} "
              f"{'efficiency':>10} {'GFLOP':>8} {'HBM MB':>9} {'peak HBM MB':>12}")
    print(header)
    print("-" * len(header))
    for name, args in programs.items():
        for chip in mtia_jax.chips.names():
            compiled = mtia_jax.jit(functions[name], chip=chip).lower(*args).compile()
            c = compiled.cost_analysis()
            print(f"{name:<10} {chip:<9} {c['time_s'] * 1e6:>11.2f} {c['roofline_time_s'] * 1e6:>12.2f} "
                  f"{c['efficiency']:>10.2f} {c['flops'] / 1e9:>8.2f} {c['hbm_bytes'] / 1e6:>9.2f} "
                  f"{c['peak_hbm_bytes'] / 1e6:>12.2f}")

    compiled = mtia_jax.jit(attention, chip="mtia450").lower(*programs["attention"]).compile()
    print("\nPer-kernel view of the attention program on mtia450:")
    print(compiled.kernel_table())


if __name__ == "__main__":
    main()
