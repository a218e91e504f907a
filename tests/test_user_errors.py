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


# ------------------------------------------------------------ MX formats and primitives

def test_mx_block_size_past_the_axis_is_refused_before_xla_sees_it():
    from mtia_jax import mx

    x = jnp.ones((4, 64))
    for huge in (2**31, 2**62):  # XLA would allocate 17 GB, or abort the interpreter
        with pytest.raises(ValueError, match=rf"block_size {huge} is longer than the blocked axis \(64"):
            mx.quantize(x, "mx8", block_size=huge)
    assert mx.quantize(x, "mx8", block_size=64).num_blocks == 1      # the whole axis: fine
    assert mx.quantize(jnp.ones(8), "mx8").num_blocks == 1           # short axis, spec block


def test_tampered_or_tree_mapped_mxarray_is_refused_by_dequantize():
    from mtia_jax import mx

    q = mx.quantize(jnp.linspace(-1, 1, 64).reshape(2, 32), "mx4")
    mapped = jax.tree.map(lambda a: a.astype(jnp.float32), q)
    with pytest.raises(TypeError, match=r"elements have dtype float32; the format stores float4_e2m1fn"):
        mx.dequantize(mapped)
    with pytest.raises(TypeError, match=r"scales have dtype uint8"):
        mx.MXArray(q.elements, q.scale_bits(), "mx4", axis=-1)
    with pytest.raises(ValueError, match=r"scales shape \(2, 2\) does not match"):
        mx.MXArray(q.elements, jnp.concatenate([q.scales, q.scales], axis=1), "mx4")


def test_mx_format_names():
    from mtia_jax import mx

    assert mx.get_format("mxfp4").name == "mxfp4_e2m1"  # OCP MXFP4 is E2M1 only
    for family, full in (("mxfp8", "mxfp8_e4m3 and mxfp8_e5m2"), ("mxfp6", "mxfp6_e2m3 and mxfp6_e3m2")):
        with pytest.raises(ValueError, match=f"'{family}' is ambiguous: OCP MX has {full}"):
            mx.get_format(family)


def test_embedding_bag_offsets_follow_pytorchs_rule():
    from jax.experimental import checkify

    table, indices = jnp.ones((10, 4)), jnp.arange(6, dtype=jnp.int32)
    for offsets, where in (([1, 2, 4], r"offsets\[0\] = 1"), ([0, 4, 2], r"offsets\[2\] = 2")):
        with pytest.raises(ValueError, match=where):
            mtia_jax.embedding_bag(table, indices, offsets=jnp.array(offsets, jnp.int32))
    f = jax.jit(lambda o: mtia_jax.embedding_bag(table, indices, offsets=o))
    check = checkify.checkify(f, errors=checkify.index_checks)
    err, _ = check(jnp.array([0, 4, 2], jnp.int32))
    assert "offsets[2] = 2" in err.get()
    err, _ = check(jnp.array([0, 2, 4], jnp.int32))
    assert err.get() is None


# ------------------------------------------------------------ command-line examples

def _example(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("example, argv, bad", [
    ("serve_llama", ["--chip", "bogus"], "bogus"),
    ("serve_llama", ["--mesh", "0x8"], "0x8"),
    ("serve_llama", ["--mesh", "1x100"], "1x100"),
    ("serve_llama", ["--mesh", "eight"], "eight"),
    ("serve_llama", ["--preset", "bogus"], "bogus"),
    ("serve_dlrm", ["--chip", "bogus"], "bogus"),
    ("serve_dlrm", ["--mesh", "0"], "--mesh 0"),
    ("serve_dlrm", ["--preset", "bogus"], "bogus"),
])
def test_bad_flags_are_one_line_usage_errors(example, argv, bad, capsys):
    with pytest.raises(SystemExit) as info:
        _example(example).main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and bad in err and "Traceback" not in err


def test_cli_bad_chip_is_a_usage_error(capsys):
    from mtia_jax import cli

    assert cli.main(["chips", "--sources", "bogus"]) == 2  # the exit status of `mtia-jax`
    assert "unknown chip 'bogus'" in capsys.readouterr().err


def test_unknown_presets_name_the_choices_and_the_closest_for_both_models():
    from models import dlrm, transformer

    with pytest.raises(ValueError, match=r"unknown preset 'lama3-8b'; choose one of \[.*'llama3-8b'.*\] "
                                         r"\(did you mean 'llama3-8b'\?\)"):
        transformer.Config.preset("lama3-8b")
    with pytest.raises(ValueError, match=r"unknown preset 'mlperf'; choose one of \[.*'mlperf-dcnv2'"):
        dlrm.Config.preset("mlperf")
    with pytest.raises(ValueError, match=r"unknown preset 8"):
        dlrm.Config.preset(8)
