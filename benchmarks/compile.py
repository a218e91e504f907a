"""Time to first result of mtia_jax.jit against jax.jit: trace, compile and
the first call, the wait a user has before a program's first answer.

    python benchmarks/compile.py [--repeats 3] [--layers 1 4 16 32] [--markdown]

Cases: the unrolled plain-jnp transformer of ``programs.transformer`` (d=128,
batch 2, sequence 64) at 1, 4, 16 and 32 layers, and the tiny serving engine
(``models.serving.ServingEngine`` on the ``tiny`` preset: one request of 8
prompt tokens and 2 new tokens, i.e. two calls of its paged step program,
the prefill and one decode; against jax.jit, the same program called with
the same arguments).

Each measurement runs in a fresh Python process, so that no trace, XLA or
mtia-jax cache of an earlier measurement is warm. In that process the
inputs are built and both jits compile and run an unrelated one-op program
first (backend start-up is paid by neither side), then the clock runs from
the ``jit`` call to the first result being ready. The best of ``--repeats``
processes is kept. Targets: ratio <= 1.5 at every size; the time per added
layer (the slope between sizes) stays flat, i.e. growth is linear.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JITS = ("jax", "mtia")
RATIO_TARGET = 1.5


# ------------------------------------------------------------ one measurement (in a child)

def _warm_up(jit) -> None:
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jit(lambda x: x * 2 + 1)(jnp.ones((4,), jnp.float32)))


def _transformer_seconds(jit, layers: int) -> float:
    import jax

    import programs

    x, params = programs.make_transformer(jax.random.PRNGKey(0), layers=layers)
    jax.block_until_ready((x, params))
    start = time.perf_counter()
    jax.block_until_ready(jit(programs.transformer)(x, params))
    return time.perf_counter() - start


def _engine_seconds(which: str) -> float:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from models import serving
    from models import transformer as tf

    cfg = tf.Config.preset("tiny")
    params = tf.Transformer(cfg, rngs=nnx.Rngs(0)).params()
    prompt, new_tokens, max_len = list(range(1, 9)), 2, 32
    jax.block_until_ready(params)
    start = time.perf_counter()
    if which == "mtia":
        engine = serving.ServingEngine(cfg, params, max_num_seqs=2, max_len=max_len)
        engine.submit(serving.Request(prompt, max_new_tokens=new_tokens))
        (result,) = engine.run()
        assert len(result.tokens) == new_tokens
        return time.perf_counter() - start
    # the engine's step program through jax.jit, called as the engine calls it:
    # 2 sequences of 32 positions in blocks of 16 (4 blocks); the request holds blocks 0, 1
    step = jax.jit(functools.partial(tf.paged_step, cfg), donate_argnums=(7,))
    pool = tf.init_kv_pool(cfg, 4, 16)
    n = len(prompt)
    i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))
    logits, pool = step(params, i32(prompt), i32(range(n)), i32(range(n)), i32([0] * n),
                        i32([[0]]), i32([n - 1]), pool)
    first = int(np.argmax(np.asarray(logits)[0]))
    pad = [4 * 16] * (n - 1)  # padding tokens write nothing
    logits, pool = step(params, i32([first] + [0] * (n - 1)), i32([n] + [0] * (n - 1)),
                        i32([n] + pad), i32([0] * n), i32([[0]]), i32([0]), pool)
    int(np.argmax(np.asarray(logits)[0]))
    return time.perf_counter() - start


def child(case: str, which: str) -> float:
    sys.path[:0] = [str(HERE), str(ROOT)]
    import jax

    import mtia_jax

    _warm_up(jax.jit)
    _warm_up(mtia_jax.jit)
    if case == "engine":
        return _engine_seconds(which)
    return _transformer_seconds(jax.jit if which == "jax" else mtia_jax.jit, int(case))


# ------------------------------------------------------------ the driver

def measure(case: str, which: str) -> float:
    done = subprocess.run([sys.executable, __file__, "--child", case, which], capture_output=True,
                          text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} with {which}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="processes per case and jit (best kept)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "JIT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps({"seconds": child(*args.child)}))
        return 0

    rows = []
    for case in [str(n) for n in args.layers] + ["engine"]:
        best = {}
        for which in JITS:  # alternate, so that machine load hits both alike
            best[which] = min(measure(case, which) for _ in range(args.repeats))
        rows.append((case, best["jax"], best["mtia"]))
    bar = "|" if args.markdown else ""
    print(f"{bar}{'case':<22}{bar}{'jax.jit s':>10}{bar}{'mtia_jax.jit s':>15}{bar}{'ratio':>7}{bar}"
          f"{'mtia s/added layer':>19}{bar}{'jax s/added layer':>18}{bar}")
    if args.markdown:
        print("|---|--:|--:|--:|--:|--:|")
    previous, worst = None, 0.0
    for case, t_jax, t_mtia in rows:
        name = "tiny serving engine" if case == "engine" else f"transformer, {case} layers"
        slope_mtia = slope_jax = ""
        if case != "engine":
            if previous is not None:
                layers = int(case) - int(previous[0])
                slope_mtia = f"{(t_mtia - previous[2]) / layers:.4f}"
                slope_jax = f"{(t_jax - previous[1]) / layers:.4f}"
            previous = (case, t_jax, t_mtia)
        worst = max(worst, t_mtia / t_jax)
        print(f"{bar}{name:<22}{bar}{t_jax:>10.3f}{bar}{t_mtia:>15.3f}{bar}{t_mtia / t_jax:>7.2f}{bar}"
              f"{slope_mtia:>19}{bar}{slope_jax:>18}{bar}")
    verdict = "PASS" if worst <= RATIO_TARGET else "FAIL"
    print(f"\nworst ratio {worst:.2f} (target <= {RATIO_TARGET}): {verdict}; best of {args.repeats} "
          f"fresh processes per cell")
    return 0 if worst <= RATIO_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
