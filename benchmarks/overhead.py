"""Host overhead of mtia_jax.jit against jax.jit, measured in one process.

    python benchmarks/overhead.py

Prints, for an MLP, a jnp transformer block and a scan RNN:
- steady-state call time ratio mtia_jax.jit / jax.jit (target <= 1.10),
- compile time ratio (first call: trace + compile), target <= 2.0.
Time to first result against program size (1 to 32 unrolled layers, each in
a fresh process) and for the serving engine: ``benchmarks/compile.py``.
"""

import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
import programs  # noqa: E402

import mtia_jax  # noqa: E402

KEY = jax.random.PRNGKey(0)


def first_call_seconds(jit, fn, args) -> float:
    jax.clear_caches()
    f = jit(fn)
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    return time.perf_counter() - start


def call_seconds(functions, args, calls: int, rounds: int = 9) -> list[float]:
    """Best per-call time of each function; rounds alternate between them so
    that load from other processes hits both alike."""
    for f in functions:
        jax.block_until_ready(f(*args))
    best = [float("inf")] * len(functions)
    for _ in range(rounds):
        for i, f in enumerate(functions):
            start = time.perf_counter()
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best


def main():
    cases = {
        "mlp": (programs.mlp, programs.make_mlp(KEY)),
        "transformer block": (programs.transformer, programs.make_transformer(KEY)),
        "scan rnn": (programs.rnn_scan, programs.make_rnn(KEY)),
    }
    print(f"{'program':<18} {'jax.jit call us':>15} {'mtia call us':>13} {'call ratio':>10} "
          f"{'jax compile s':>13} {'mtia compile s':>14} {'compile ratio':>13}")
    for name, (fn, args) in cases.items():
        compile_jax = min(first_call_seconds(jax.jit, fn, args) for _ in range(3))
        compile_mtia = min(first_call_seconds(mtia_jax.jit, fn, args) for _ in range(3))
        t_jax, t_mtia = call_seconds([jax.jit(fn), mtia_jax.jit(fn)], args, 200)
        print(f"{name:<18} {t_jax * 1e6:>15.1f} {t_mtia * 1e6:>13.1f} {t_mtia / t_jax:>10.3f} "
              f"{compile_jax:>13.3f} {compile_mtia:>14.3f} {compile_mtia / compile_jax:>13.2f}")


if __name__ == "__main__":
    main()
