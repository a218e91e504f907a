"""Bad input to jit, estimate, meshes, config and primitives gets the error
jax.jit would give (or a clear one) naming the bad value and the user's code,
never a silent wrong answer or a traceback from inside mtia-jax."""

import inspect

import jax
import jax.numpy as jnp
import pytest

import mtia_jax


def add(x, y):
    return x + y


@pytest.mark.parametrize("options, match", [
    (dict(static_argnums=5), r"static_argnums=\(5,\), but only accepts 2 positional arguments"),
    (dict(donate_argnums=2), r"donate_argnums=\(2,\), but only accepts 2 positional arguments"),
    (dict(static_argnums=-3), r"static_argnums=\(-3,\)"),
    (dict(static_argnames="z"), r"invalid argnames \{'z'\} in static_argnames"),
    (dict(static_argnums=0, donate_argnums=0), r"cannot intersect: argument\(s\) \[0\] \(x\)"),
    (dict(static_argnames="y", donate_argnums=1), r"cannot intersect: argument\(s\) \[1\] \(y\)"),
])
def test_jit_rejects_argument_options_as_jax_jit_does(options, match):
    with pytest.raises(ValueError, match=match):
        mtia_jax.jit(add, **options)
    with pytest.raises(ValueError):  # jax.jit refuses the same
        jax.jit(add, **options)(jnp.ones(2), jnp.ones(2))


def test_functions_with_star_args_accept_any_argnums():
    f = mtia_jax.jit(lambda *xs: sum(xs), static_argnums=3)
    assert float(f(jnp.ones(()), jnp.ones(()), jnp.ones(()), 4.0)) == 7.0


def test_tracing_errors_name_the_users_function_line_and_parameter():
    def relu(scale):
        return scale if scale > 0 else -scale

    line = inspect.getsourcelines(relu)[1]
    with pytest.raises(jax.errors.TracerBoolConversionError) as info:
        mtia_jax.jit(relu)(jnp.ones(()))
    message = str(info.value)
    assert f"relu at {__file__}:{line}" in message and "argument scale" in message
    assert "api.py" not in message

    def name(x):
        return "not an array"

    with pytest.raises(TypeError, match=rf"function name at {__file__}:\d+ traced for mtia_jax.jit"):
        mtia_jax.jit(name)(jnp.ones(()))


def test_negative_dimensions_are_refused_naming_the_argument():
    with pytest.raises(ValueError, match=r"argument 'params'\['w'\] has shape \(-1, 3\)"):
        mtia_jax.estimate(lambda params: params["w"] * 2,
                          {"w": jax.ShapeDtypeStruct((-1, 3), jnp.float32)})


def test_byte_counts_do_not_overflow():
    # 2^32 x 2^32 float32: 2^66 bytes, far past int64
    report = mtia_jax.estimate(lambda x: x + 1, jax.ShapeDtypeStruct((2**32, 2**32), jnp.float32))
    assert report.peak_hbm_bytes == 2 * 2**66 and not report.fits
    assert report.time_s > 1e3  # seconds: 2^67 bytes over 18.4 TB/s


def test_mesh_and_config_mistakes():
    with pytest.raises(TypeError, match=r"mesh=3 \(int\) is not a mesh"):
        mtia_jax.jit(add, mesh=3)
    with pytest.raises(TypeError, match=r"axis sizes must be integers, got 2.5"):
        mtia_jax.make_mesh((2.5, 2), ("data", "model"))
    with pytest.raises(TypeError, match="axis names must be non-empty strings"):
        mtia_jax.make_mesh((2, 2), ("data", 3))
    with pytest.raises(AttributeError, match=r"no option 'debug_nan'; options: debug_infs, debug_nans"):
        mtia_jax.config.debug_nan = True
    mtia_jax.config.debug_nans = False  # a real option is still set


def test_flash_attention_needs_heads():
    q = jnp.ones((1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"need at least one head each \(N = 4, K = 0"):
        mtia_jax.flash_attention(q, jnp.ones((1, 2, 0, 8)), jnp.ones((1, 2, 0, 8)))
