"""The runtime: config options, eager-mode NaN/Inf checks, devices and their
modeled busy time, and the memory analysis."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import mtia_jax
from mtia_jax import config
from runtime.device import Device, DeviceStats
from runtime.executor import EagerExecutor, host_function

HERE = os.path.abspath(__file__)


def _line_of(fn, offset=1):
    """The source line ``offset`` lines below ``def``."""
    return fn.__code__.co_firstlineno + offset


@pytest.fixture(autouse=True)
def _default_options():
    saved = config.values()
    yield
    for name, value in saved.items():
        config.update(name, value)


# ------------------------------------------------------------------ config


def test_config_update_and_read():
    assert mtia_jax.config.debug_nans is False
    mtia_jax.config.update("debug_nans", True)
    assert mtia_jax.config.debug_nans is True and config.read("debug_nans") is True
    mtia_jax.config.update("debug_nans", "0")
    assert mtia_jax.config.debug_nans is False
    mtia_jax.config.debug_nans = 1  # assignment is a checked update
    assert config.values()["debug_nans"] is True


def test_config_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match="debug_nans") as info:
        mtia_jax.config.update("debug_nan", True)
    assert "unknown option 'debug_nan'" in str(info.value) and "debug_infs" in str(info.value)
    with pytest.raises(ValueError, match="valid options"):
        mtia_jax.config.read("nope")
    with pytest.raises(AttributeError, match="debug_nans"):
        mtia_jax.config.nope
    with pytest.raises(ValueError, match="boolean"):
        mtia_jax.config.update("debug_nans", "maybe")


def test_config_override_restores_on_exit_and_on_error():
    with mtia_jax.config.override(debug_nans=True, debug_infs=True):
        assert config.debug_nans and config.debug_infs
    assert not config.debug_nans and not config.debug_infs
    with pytest.raises(KeyError):
        with mtia_jax.config.override(debug_nans=True):
            raise KeyError("boom")
    assert not config.debug_nans
    with pytest.raises(ValueError, match="unknown option"):
        with mtia_jax.config.override(debug_everything=True):
            pass


@pytest.mark.parametrize("env, expected", [("1", True), ("0", False), ("true", True)])
def test_config_initial_value_from_environment(env, expected):
    out = subprocess.run(
        [sys.executable, "-c", "import mtia_jax; print(mtia_jax.config.debug_nans)"],
        env={**os.environ, "MTIA_JAX_DEBUG_NANS": env}, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


# -------------------------------------------------------- eager debug_nans


def log_times_zero(x):
    return jnp.log(x) * 0


def test_eager_debug_nans_names_the_kernel_and_the_user_line():
    f = mtia_jax.jit(log_times_zero, mode="eager")
    x = jnp.array([-1.0, 2.0])
    assert np.isnan(np.asarray(f(x))[0])  # off by default: NaN comes back
    mtia_jax.config.update("debug_nans", True)
    with pytest.raises(FloatingPointError) as info:
        f(x)
    message = str(info.value)
    assert "'log'" in message
    assert f"{HERE}:{_line_of(log_times_zero)} (log_times_zero)" in message
    assert "NaN" in message and "debug_nans" in message
    assert "produced it" in message  # its operand was finite
    np.testing.assert_array_equal(f(jnp.array([1.0, 2.0])), jnp.zeros(2))  # finite: no error


def test_eager_debug_nans_says_when_the_nan_came_in_through_an_argument():
    def add_one(x):
        return x + 1.0

    with mtia_jax.config.override(debug_nans=True):
        with pytest.raises(FloatingPointError, match="program's arguments") as info:
            mtia_jax.jit(add_one, mode="eager")(jnp.array([np.nan, 1.0]))
    assert f"{HERE}:{_line_of(add_one)} (" in str(info.value) and "add_one)" in str(info.value)


def test_debug_nans_ignores_inf_and_debug_infs_catches_it():
    def overflow(x):
        return jnp.exp(x) - 1.0

    f = mtia_jax.jit(overflow, mode="eager")
    x = jnp.array([1000.0])
    with mtia_jax.config.override(debug_nans=True):
        assert np.isinf(np.asarray(f(x))).all()
    with mtia_jax.config.override(debug_infs=True):
        with pytest.raises(FloatingPointError, match="Inf in result 0") as info:
            f(x)
    assert "'exp'" in str(info.value) and "debug_infs" in str(info.value)


def test_debug_nans_checks_bfloat16_and_skips_integers():
    def f(x, i):
        return jnp.sqrt(x), i // 2

    g = mtia_jax.jit(f, mode="eager")
    with mtia_jax.config.override(debug_nans=True):
        y, j = g(jnp.array([4.0], jnp.bfloat16), jnp.array([5]))
        assert y.dtype == jnp.bfloat16 and int(j[0]) == 2
        with pytest.raises(FloatingPointError, match="bf16.*'sqrt'"):
            g(jnp.array([-4.0], jnp.bfloat16), jnp.array([5]))


def scan_with_log(xs):
    def step(c, x):
        return c + jnp.log(x), c

    return lax.scan(step, 0.0, xs)


def test_eager_debug_nans_in_a_region_names_the_region_op():
    f = mtia_jax.jit(scan_with_log, mode="eager")
    with mtia_jax.config.override(debug_nans=True):
        f(jnp.array([1.0, 2.0]))
        with pytest.raises(FloatingPointError) as info:
            f(jnp.array([1.0, -2.0]))
    message = str(info.value)
    assert "'scan' region op" in message and "not checked one by one" in message
    assert f"{HERE}:{_line_of(scan_with_log, 4)} (scan_with_log)" in message


def test_graph_mode_debug_nans_reruns_kernel_by_kernel_to_name_the_kernel():
    f = mtia_jax.jit(log_times_zero)
    x = jnp.array([3.0, -1.0])
    with mtia_jax.config.override(debug_nans=True):
        with pytest.raises(FloatingPointError) as info:
            f(x)
    assert "'log'" in str(info.value)
    assert f"{HERE}:{_line_of(log_times_zero)}" in str(info.value)
    assert np.isnan(np.asarray(f(x))[1])  # and back off


def test_graph_mode_debug_nans_with_donated_input_names_the_output():
    f = mtia_jax.jit(log_times_zero, donate_argnums=0)
    with mtia_jax.config.override(debug_nans=True):
        with pytest.raises(FloatingPointError, match="output 0 of 'log_times_zero' holds NaN"):
            f(jnp.array([3.0, -1.0]))


def _programs():
    from test_jit import PROGRAMS
    return PROGRAMS


@pytest.mark.parametrize("name", ["mlp", "layer_norm", "attention", "math_ops", "integer_math",
                                  "bf16_matmul", "custom_rules"])
def test_eager_results_are_unchanged_by_the_checks(name):
    # the eager loop gives exactly what running the emitted host function
    # primitive by primitive gives, with and without the checks
    fn, make_args = _programs()[name]
    args = make_args()
    compiled = mtia_jax.jit(fn, mode="eager").lower(*args).compile()
    leaves = jax.tree.leaves(args)
    reference, _ = host_function(compiled.module)(*leaves)
    for options in ({}, {"debug_nans": True, "debug_infs": True}):
        with mtia_jax.config.override(**options):
            got, _ = EagerExecutor(compiled.module)(*leaves)
        for g, r in zip(got, reference):
            assert g.dtype == jnp.asarray(r).dtype
            np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


# ----------------------------------------------------------------- devices


def test_devices_are_one_logical_device_per_chip():
    (dev,) = mtia_jax.devices()
    assert isinstance(dev, Device) and isinstance(dev.stats, DeviceStats)
    assert dev.chip.name == mtia_jax.chips.default_name() == dev.device_kind
    assert dev.platform == "mtia" and dev.id == 0
    (dev400,) = mtia_jax.devices("MTIA 400")
    assert dev400.device_kind == "mtia400" and dev400 is mtia_jax.devices("mtia400")[0]
    assert str(dev400) == "mtia400:0" and dev400 is not dev
    with pytest.raises(ValueError, match="unknown chip"):
        mtia_jax.devices("mtia9000")


def test_stats_accumulate_n_times_the_modeled_cost():
    def f(x, w):
        return jax.nn.relu(x @ w).sum(axis=0)

    x, w = jnp.ones((64, 32)), jnp.ones((32, 16))
    g = mtia_jax.jit(f, chip="mtia450")
    compiled = g.lower(x, w).compile()
    cost = compiled.cost_analysis()
    assert compiled.device is mtia_jax.devices("mtia450")[0]
    dev = compiled.device
    dev.stats.reset()
    n = 7
    for _ in range(n):
        g(x, w)
    compiled(x, w)  # the Compiled object records too
    assert dev.stats.calls == n + 1
    assert dev.stats.busy_s == pytest.approx((n + 1) * cost["time_s"], rel=1e-12)
    assert dev.stats.hbm_bytes == pytest.approx((n + 1) * cost["hbm_bytes"], rel=1e-12)
    assert dev.stats.flops == pytest.approx((n + 1) * cost["flops"], rel=1e-12)
    assert dev.stats.as_dict()["calls"] == n + 1
    dev.stats.reset()
    assert (dev.stats.calls, dev.stats.busy_s, dev.stats.flops) == (0, 0.0, 0.0)


def test_calls_on_other_chips_land_on_their_own_device():
    f = lambda x: x * 2.0
    a, b = mtia_jax.devices("mtia400")[0], mtia_jax.devices("mtia300")[0]
    a.stats.reset()
    b.stats.reset()
    mtia_jax.jit(f, chip="mtia400")(jnp.ones(4))
    mtia_jax.jit(f, chip="mtia300")(jnp.ones(4))
    mtia_jax.jit(f, chip="mtia300")(jnp.ones(4))
    assert (a.stats.calls, b.stats.calls) == (1, 2)


def collatz_steps(n):
    # the scalar state runs on the control core; the vector is each trip's kernel
    def body(state):
        v, steps, x = state
        return jnp.where(v % 2 == 0, v // 2, 3 * v + 1), steps + 1, jnp.sin(x)

    return lax.while_loop(lambda s: s[0] != 1, body, (n, 0, jnp.ones(256)))[1]


def test_while_loop_calls_are_charged_their_measured_trip_counts_when_read():
    compiled = mtia_jax.jit(collatz_steps, chip="mtia500").lower(27).compile()
    dev = compiled.device
    dev.stats.reset()
    expected = []
    for n in (27, 6, 27, 1):
        compiled(n)
        expected.append(compiled.cost_analysis()["time_s"])
    # trip counts are still device values: nothing was converted yet
    assert len(dev.stats._queue) == 4
    assert dev.stats.calls == 4
    assert dev.stats.busy_s == pytest.approx(sum(expected), rel=1e-12)
    assert len(set(expected)) == 3  # 27 runs 111 trips, 6 runs 8, 1 runs none
    assert not dev.stats._queue


def test_calls_traced_under_jax_transformations_are_not_recorded():
    f = mtia_jax.jit(lambda x: jnp.sin(x).sum(), chip="mtia450")
    f(jnp.ones(3))
    dev = mtia_jax.devices("mtia450")[0]
    dev.stats.reset()
    jax.make_jaxpr(f)(jnp.ones(3))
    jax.jit(f).lower(jnp.ones(3))
    assert dev.stats.calls == 0
    loop = mtia_jax.jit(collatz_steps, chip="mtia450")
    loop(5)  # compiled outside the trace
    (compiled,) = loop._cache.values()
    counts = compiled._trip_counts
    dev.stats.reset()
    jax.make_jaxpr(loop)(5)
    assert dev.stats.calls == 0
    assert compiled._trip_counts is counts  # no tracers kept as trip counts
    f(jnp.ones(3))
    assert dev.stats.calls == 1


def test_stats_count_every_call_from_several_threads():
    import threading

    f = mtia_jax.jit(lambda x: x * 3.0, chip="mtia450")
    x = jnp.ones(8)
    f(x)
    dev = mtia_jax.devices("mtia450")[0]
    dev.stats.reset()

    def work():
        for _ in range(300):
            f(x)
            if _ % 50 == 0:
                dev.stats.busy_s  # folding while others record

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dev.stats.calls == 1200


def test_stats_queue_stays_bounded():
    from runtime import device as device_module

    compiled = mtia_jax.jit(lambda x: x + 1, chip="mtia450").lower(jnp.ones(2)).compile()
    dev = compiled.device
    dev.stats.reset()
    for _ in range(device_module._FOLD_AT + 10):
        dev.stats.record(compiled._static_totals)
    assert len(dev.stats._queue) <= device_module._FOLD_AT
    assert dev.stats.calls == device_module._FOLD_AT + 10


# ---------------------------------------------------------- memory analysis


def two_matmuls(x, w1, w2):
    h = x @ w1
    return h @ w2


def test_memory_analysis_byte_totals_by_hand():
    x, w1, w2 = jnp.ones((256, 128)), jnp.ones((128, 64)), jnp.ones((64, 32))
    mem = mtia_jax.jit(two_matmuls).lower(x, w1, w2).compile().memory_analysis()
    arguments = 4 * (256 * 128 + 128 * 64 + 64 * 32)
    hidden, out = 4 * 256 * 64, 4 * 256 * 32
    assert mem.argument_size_in_bytes == arguments
    assert mem.output_size_in_bytes == out
    assert mem.temp_size_in_bytes == hidden
    assert mem.alias_size_in_bytes == 0
    # the second matmul reads h while writing its output; arguments stay live
    assert mem.peak_memory_in_bytes == arguments + hidden + out == mem.peak_bytes
    assert [b.nbytes for b in mem.largest(2)] == [4 * 256 * 128, hidden]
    assert mem.generated_code_size_in_bytes == 0
    assert "MiB" in str(mem)


def test_memory_analysis_alias_is_the_donated_bytes_and_outputs_count_once():
    def f(x, y):
        z = jnp.tanh(x) + y
        return z, z

    x, y = jnp.ones((128, 128)), jnp.ones((128, 128))
    kept = mtia_jax.jit(f).lower(x, y).compile().memory_analysis()
    donated = mtia_jax.jit(f, donate_argnums=0).lower(x, y).compile().memory_analysis()
    nbytes = 128 * 128 * 4
    assert kept.alias_size_in_bytes == 0 and donated.alias_size_in_bytes == nbytes
    assert kept.argument_size_in_bytes == donated.argument_size_in_bytes == 2 * nbytes
    assert kept.output_size_in_bytes == nbytes


def test_public_api_names():
    for name in ("config", "devices", "Device", "profiler"):
        assert name in mtia_jax.__all__ and getattr(mtia_jax, name) is not None
