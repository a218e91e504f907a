"""Tests of the chip catalogue (mtia_jax.chips) and the `mtia-jax chips` CLI."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mtia_jax import chips
from mtia_jax.cli import main

MTIA_2026 = ("mtia300", "mtia400", "mtia450", "mtia500")


def spec(name):
    return chips.get(name)


# -- catalogue contents ------------------------------------------------------


def test_catalogue_order_and_default():
    assert chips.names() == (
        "mtia300",
        "mtia400",
        "mtia450",
        "mtia500",
        "mtia_v1",
        "mtia_v2i",
        "h100",
        "h200",
    )
    assert chips.DEFAULT_CHIP == "mtia450"


@pytest.mark.parametrize("name", chips.names())
def test_every_number_has_a_source(name):
    s = spec(name)
    assert s.missing_sources() == ()
    for field in chips.NUMERIC_FIELDS:
        assert str(s.sources[field]).strip(), field
    for cls in s.peak_flops:
        assert s.sources[f"peak_flops.{cls}"].strip(), cls
    for cls in s.vector_flops:
        assert s.sources[f"vector_flops.{cls}"].strip(), cls


@pytest.mark.parametrize("name", chips.names())
def test_sources_use_the_agreed_labels(name):
    # Published/secondary values cite a key; everything else says "derived" or "assumption".
    for key in spec(name).source_keys():
        text = spec(name).sources[key]
        if key == "units":
            continue
        assert text.startswith(("P [", "S [", "derived", "assumption")), (key, text)


@pytest.mark.parametrize("name", chips.names())
def test_u_leads_are_only_used_as_labelled_assumptions(name):
    for key, text in spec(name).sources.items():
        if "U lead" in text:
            assert text.startswith("assumption (U lead"), (key, text)
            assert "unverified" in text


def test_published_mtia_2026_table():
    table = {  # name: (bf16 PF, fp8 PF, mx4 PF or None, HBM GB, HBM TB/s, TDP W, domain, link TB/s)
        "mtia300": (0.6, 1.2, None, 216, 6.1, 800, 16, 1.0),
        "mtia400": (3, 6, 12, 288, 9.2, 1200, 72, 1.2),
        "mtia450": (3.5, 7, 21, 288, 18.4, 1400, 72, 1.2),
        "mtia500": (5, 10, 30, 512, 27.6, 1700, 72, 1.2),
    }
    for name, (bf16, fp8, mx4, hbm_gb, hbm_tbs, tdp, domain, link) in table.items():
        s = spec(name)
        assert s.peak_flops["bf16"] == pytest.approx(bf16 * 1e15)
        assert s.peak_flops["fp8"] == pytest.approx(fp8 * 1e15)
        assert s.peak_flops["mx8"] == s.peak_flops["fp8"]
        assert s.peak_flops["mx6"] == s.peak_flops["mx8"]
        assert s.peak_flops["fp32"] == pytest.approx(s.peak_flops["bf16"] / 4)
        if mx4 is None:
            assert "mx4" not in s.peak_flops
        else:
            assert s.peak_flops["mx4"] == pytest.approx(mx4 * 1e15)
        assert "int8" not in s.peak_flops
        assert s.hbm_bytes == hbm_gb * 10**9
        assert s.hbm_bandwidth == pytest.approx(hbm_tbs * 1e12)
        assert s.tdp_watts == tdp
        assert s.scaleup_domain == domain
        assert s.scaleup_link_bandwidth == pytest.approx(link * 1e12)
        assert s.memory_kind == "HBM"


def test_older_mtia_and_gpus():
    v1, v2i, h100, h200 = (spec(n) for n in ("mtia_v1", "mtia_v2i", "h100", "h200"))
    assert v1.peak_flops["bf16"] == pytest.approx(51.2e12)
    assert v1.peak_flops["int8"] == pytest.approx(102.4e12)
    assert v2i.peak_flops["bf16"] == pytest.approx(177e12)
    assert v2i.peak_flops["int8"] == pytest.approx(354e12)
    assert v2i.vector_flops == {"fp32": 2.76e12, "bf16": 5.53e12, "int8": 11.06e12}
    assert v2i.hbm_bandwidth == pytest.approx(204.8e9)
    assert v2i.memory_kind == v1.memory_kind == "LPDDR5"
    assert "LPDDR5" in v2i.sources["hbm_bandwidth"] and "LPDDR5" in v1.sources["hbm_bytes"]
    assert (v2i.pe_rows, v2i.pe_cols, v2i.pe_local_bytes) == (8, 8, 384 * 1024)
    assert v2i.clock_hz == 1.35e9
    assert v2i.kernel_launch_s == pytest.approx(1e-6)
    assert h100.peak_flops["bf16"] == pytest.approx(989.4e12)
    assert h100.peak_flops["fp8"] == pytest.approx(1978.9e12)
    assert h100.peak_flops["fp32"] == pytest.approx(989.4e12 / 2)
    assert h100.hbm_bytes == 80 * 10**9 and h100.hbm_bandwidth == pytest.approx(3.35e12)
    assert h200.hbm_bytes == 141 * 10**9 and h200.hbm_bandwidth == pytest.approx(4.8e12)
    assert h200.peak_flops == h100.peak_flops
    for g in (h100, h200):
        assert g.scaleup_domain == 8
        assert g.scaleup_link_bandwidth == pytest.approx(450e9)
        assert g.units == frozenset()
        assert g.tdp_watts == 700


def test_dedicated_units_of_each_chip():
    assert spec("mtia300").units == {"near_memory_reduce", "mx_matmul"}
    assert spec("mtia400").units == {"near_memory_reduce", "mx_matmul"}
    full = {"flash_attention", "moe_ffn", "near_memory_reduce", "mx_matmul"}
    assert spec("mtia450").units == full
    assert spec("mtia500").units == full
    for name in ("mtia_v1", "mtia_v2i", "h100", "h200"):
        assert spec(name).units == frozenset()


# -- announced relations (hardware-facts §1.2 consistency table) --------------


def test_450_doubles_400_hbm_bandwidth():
    assert spec("mtia450").hbm_bandwidth / spec("mtia400").hbm_bandwidth == pytest.approx(2.0, rel=0.01)


def test_500_vs_450():
    s450, s500 = spec("mtia450"), spec("mtia500")
    assert s500.hbm_bandwidth / s450.hbm_bandwidth == pytest.approx(1.5, rel=0.01)
    capacity = s500.hbm_bytes / s450.hbm_bytes
    assert capacity == pytest.approx(1.78, abs=0.01)
    assert capacity <= 1.8  # "up to +80%"
    assert s500.peak_flops["mx4"] / s450.peak_flops["mx4"] == pytest.approx(1.43, abs=0.01)


def test_300_to_500_scaling():
    s300, s500 = spec("mtia300"), spec("mtia500")
    assert s500.hbm_bandwidth / s300.hbm_bandwidth == pytest.approx(4.5, rel=0.02)
    # "25x compute" compares 500's MX4 with 300's FP8/MX8.
    assert s500.peak_flops["mx4"] / s300.peak_flops["mx8"] == pytest.approx(25, rel=0.01)
    assert s500.matmul_peak("mx4") / s300.matmul_peak("mx4") == pytest.approx(25, rel=0.01)


def test_450_mx4_is_6x_bf16():
    s = spec("mtia450")
    assert s.peak_flops["mx4"] / s.peak_flops["bf16"] == pytest.approx(6, rel=0.01)
    assert spec("mtia400").peak_flops["mx4"] / spec("mtia400").peak_flops["bf16"] == pytest.approx(4)
    assert spec("mtia450").peak_flops["mx4"] / spec("mtia400").peak_flops["mx4"] == pytest.approx(1.75)


@pytest.mark.parametrize("name", MTIA_2026)
def test_fp8_is_2x_bf16(name):
    s = spec(name)
    assert s.peak_flops["fp8"] / s.peak_flops["bf16"] == pytest.approx(2, rel=0.01)


def test_400_vs_300():
    s300, s400 = spec("mtia300"), spec("mtia400")
    assert s400.peak_flops["fp8"] / s300.peak_flops["fp8"] == pytest.approx(5, rel=0.01)  # +400%
    assert s400.hbm_bandwidth / s300.hbm_bandwidth == pytest.approx(1.51, abs=0.01)  # +51%


@pytest.mark.parametrize(
    "name, dtype, ridge",
    [  # hardware-facts D tables (FLOP per HBM byte), rounded to whole numbers there
        ("mtia300", "bf16", 98),
        ("mtia300", "fp8", 197),
        ("mtia400", "bf16", 326),
        ("mtia400", "mx4", 1304),
        ("mtia450", "bf16", 190),
        ("mtia450", "fp8", 380),
        ("mtia450", "mx4", 1141),
        ("mtia500", "mx4", 1087),
        ("h100", "bf16", 295),
        ("h100", "fp8", 591),
        ("h200", "bf16", 206),
        ("h200", "fp8", 412),
        ("mtia_v1", "bf16", 291),
        ("mtia_v2i", "bf16", 864),
    ],
)
def test_ridge_points_match_hardware_facts(name, dtype, ridge):
    assert spec(name).ridge_point(dtype) == pytest.approx(ridge, abs=1.0)


def test_v2i_sram_ridge_point_and_scaled_sram_bandwidth():
    assert spec("mtia_v2i").ridge_point("bf16", memory="sram") == pytest.approx(63, abs=1)
    for name in MTIA_2026:  # the assumption keeps the 2i SRAM ridge point
        assert spec(name).ridge_point("bf16", memory="sram") == pytest.approx(63.2, abs=0.5)
        assert spec(name).sram_bandwidth > spec(name).hbm_bandwidth


@pytest.mark.parametrize("name", MTIA_2026)
def test_vector_rates_scaled_from_v2i(name):
    s, v2i = spec(name), spec("mtia_v2i")
    for cls in ("fp32", "bf16", "int8"):
        ratio = v2i.vector_flops[cls] / v2i.peak_flops["bf16"]
        assert s.vector_flops[cls] == pytest.approx(s.peak_flops["bf16"] * ratio)


# -- compute classes and fallback --------------------------------------------


@pytest.mark.parametrize(
    "dtype, cls",
    [
        (np.float32, "fp32"),
        (np.dtype("float64"), "fp32"),
        (np.int32, "fp32"),
        (np.int64, "fp32"),
        (np.uint16, "fp32"),
        (np.complex64, "fp32"),
        (jnp.float32, "fp32"),
        (jnp.bfloat16, "bf16"),
        (np.float16, "bf16"),
        (ml_dtypes.bfloat16, "bf16"),
        (jnp.float8_e4m3fn, "fp8"),
        (ml_dtypes.float8_e5m2, "fp8"),
        (np.int8, "int8"),
        (np.uint8, "int8"),
        (np.bool_, "int8"),
        (ml_dtypes.int4, "int8"),
        (ml_dtypes.float4_e2m1fn, "mx4"),
        (ml_dtypes.float6_e3m2fn, "mx6"),
        ("mx4", "mx4"),
        ("mx6", "mx6"),
        ("mx8", "mx8"),
        ("mxfp8_e4m3", "mx8"),
        ("mxfp8_e5m2", "mx8"),
        ("mxfp6_e3m2", "mx6"),
        ("mxfp6_e2m3", "mx6"),
        ("mxfp4_e2m1", "mx4"),
        ("MXINT8", "int8"),
        ("bf16", "bf16"),
        ("float32", "fp32"),
        ("bfloat16", "bf16"),
        ("float8_e4m3fn", "fp8"),
        ("fp16", "bf16"),
    ],
)
def test_compute_class_of_each_dtype(dtype, cls):
    assert chips.compute_class(dtype) == cls


def test_compute_class_duck_types():
    class MXLike:
        format = "mxfp4_e2m1"
        block_size = 32

    class FormatLike:
        name = "mxfp6_e3m2"

    class MXTypeLike:
        format = FormatLike()

    assert chips.compute_class(MXLike()) == "mx4"
    assert chips.compute_class(FormatLike()) == "mx6"
    assert chips.compute_class(MXTypeLike()) == "mx6"
    assert chips.compute_class(jnp.zeros((2,), jnp.bfloat16)) == "bf16"
    import jax

    assert chips.compute_class(jax.ShapeDtypeStruct((4,), jnp.int8)) == "int8"


def test_compute_class_of_mx_module_types():
    from mtia_jax import mx
    expected = {"mxfp8_e4m3": "mx8", "mxfp8_e5m2": "mx8", "mxfp6_e3m2": "mx6",
                "mxfp6_e2m3": "mx6", "mxfp4_e2m1": "mx4", "mxint8": "int8"}
    for name, cls in expected.items():
        assert chips.compute_class(mx.MXType(name)) == cls
        assert chips.compute_class(mx.get_format(name)) == cls
    assert spec("mtia300").matmul_peak(mx.MXType("mx4")) == spec("mtia300").peak_flops["mx8"]


@pytest.mark.parametrize("bad", ["nope", "mxfp3", "datetime64", None, 3.5, object()])
def test_compute_class_rejects_unknown(bad):
    with pytest.raises(ValueError):
        chips.compute_class(bad)


def test_matmul_peak_native_and_fallback():
    s300 = spec("mtia300")
    assert s300.matmul_peak("mx4") == s300.peak_flops["mx8"]  # mx4 -> mx6 -> mx8 on the 300
    assert s300.matmul_class("mxfp4_e2m1") == "mx6"  # first rated class in the chain
    assert not s300.is_native("mx4")
    assert s300.matmul_peak(jnp.bfloat16) == pytest.approx(0.6e15)
    assert s300.matmul_peak("int8") == s300.peak_flops["fp8"]  # int8 -> fp8
    assert s300.matmul_peak(np.float32) == s300.peak_flops["fp32"]
    s450 = spec("mtia450")
    assert s450.matmul_peak("mxfp4_e2m1") == pytest.approx(21e15)
    assert s450.matmul_peak(ml_dtypes.float8_e4m3fn) == pytest.approx(7e15)
    v2i = spec("mtia_v2i")
    assert v2i.matmul_peak("mx4") == v2i.peak_flops["bf16"]  # no MX/FP8 datapath on 2i
    assert v2i.matmul_peak("mxint8") == v2i.peak_flops["int8"]
    assert spec("h100").matmul_peak("int8") == spec("h100").peak_flops["fp8"]
    assert spec("h100").matmul_peak("mx4") == spec("h100").peak_flops["fp8"]


def test_vector_peak_per_dtype_upcasts_narrow_types():
    s = spec("mtia_v2i")
    assert s.vector_peak(np.float32) == pytest.approx(2.76e12)
    assert s.vector_peak(jnp.bfloat16) == pytest.approx(5.53e12)
    assert s.vector_peak(np.int8) == pytest.approx(11.06e12)
    assert s.vector_peak("mx4") == s.vector_flops["bf16"]  # narrow floats upcast to bf16
    assert s.vector_peak(ml_dtypes.float8_e5m2) == s.vector_flops["bf16"]
    assert s.vector_peak(np.int32) == s.vector_flops["fp32"]


def test_fallback_chains_end_in_fp32():
    for table in (chips.MATMUL_FALLBACK, chips.VECTOR_FALLBACK):
        for chain in table.values():
            assert chain[-1] == "fp32"
    assert chips.MATMUL_FALLBACK["mx4"] == ("mx4", "mx6", "mx8", "fp8", "bf16", "fp32")
    assert chips.MATMUL_FALLBACK["int8"][:3] == ("int8", "fp8", "bf16")


# -- registry -----------------------------------------------------------------


def test_get_is_case_insensitive_and_accepts_specs():
    s = spec("mtia450")
    assert chips.get("MTIA450") is s
    assert chips.get("MTIA 450") is s
    assert chips.get("mtia-450") is s
    assert chips.get(s) is s
    assert chips.get("MTIA 200") is chips.get("mtia_v2i")
    assert chips.get("mtia_V1").name == "mtia_v1"


def test_unknown_chip_lists_known_names():
    with pytest.raises(ValueError) as err:
        chips.get("tpu9")
    message = str(err.value)
    assert "tpu9" in message
    for name in chips.names():
        assert name in message
    with pytest.raises(TypeError):
        chips.get(450)


def test_register_and_overwrite():
    custom = spec("mtia450").replace(name="mtia450_test_variant", tdp_watts=1000)
    try:
        chips.register(custom)
        assert chips.get("MTIA450_TEST_VARIANT") is custom
        assert chips.names()[-1] == "mtia450_test_variant"
        with pytest.raises(ValueError, match="already registered"):
            chips.register(custom)
        bigger = custom.replace(tdp_watts=1100)
        chips.register(bigger, overwrite=True)
        assert chips.get("mtia450_test_variant").tdp_watts == 1100
        with pytest.raises(ValueError):
            chips.register(spec("mtia_v2i").replace(name="mtia200"))  # an alias is taken too
    finally:
        chips._REGISTRY.pop("mtia450testvariant", None)
    assert "mtia450_test_variant" not in chips.names()


def test_default_from_env(monkeypatch):
    monkeypatch.delenv("MTIA_JAX_CHIP", raising=False)
    assert chips.default_name() == "mtia450"
    assert chips.default() is spec("mtia450")
    monkeypatch.setenv("MTIA_JAX_CHIP", "H100")
    assert chips.default_name() == "h100"
    assert chips.default() is spec("h100")
    monkeypatch.setenv("MTIA_JAX_CHIP", "")
    assert chips.default_name() == "mtia450"


def test_bad_env_value(monkeypatch):
    monkeypatch.setenv("MTIA_JAX_CHIP", "mtia999")
    with pytest.raises(ValueError) as err:
        chips.default()
    assert "MTIA_JAX_CHIP" in str(err.value)
    assert "mtia999" in str(err.value)
    assert "mtia450" in str(err.value)


# -- ChipSpec behaviour ---------------------------------------------------------


def test_replace_overrides_and_keeps_original():
    s = spec("mtia400")
    t = s.replace(hbm_bandwidth=12e12, peak_flops={**s.peak_flops, "bf16": 4e15})
    assert t is not s and t != s
    assert t.hbm_bandwidth == 12e12
    assert t.sources["hbm_bandwidth"] == "user override"
    assert t.peak_flops["bf16"] == 4e15
    assert t.sources["peak_flops.bf16"] == "user override"
    assert t.sources["peak_flops.fp8"] == s.sources["peak_flops.fp8"]  # unchanged rate keeps its source
    assert t.sources["hbm_bytes"] == s.sources["hbm_bytes"]
    # the original is untouched
    assert s.hbm_bandwidth == pytest.approx(9.2e12)
    assert s.sources["hbm_bandwidth"].startswith("P [")
    assert s.peak_flops["bf16"] == pytest.approx(3e15)
    assert chips.get("mtia400") is s
    assert t.missing_sources() == ()


def test_replace_drops_sources_of_removed_rates_and_validates():
    s = spec("mtia450")
    t = s.replace(peak_flops={k: v for k, v in s.peak_flops.items() if k != "mx4"})
    assert "peak_flops.mx4" not in t.sources
    assert t.matmul_peak("mx4") == t.peak_flops["mx6"]
    with pytest.raises(TypeError):
        s.replace(not_a_field=1)
    with pytest.raises(ValueError):
        s.replace(hbm_bandwidth=-1.0)
    with pytest.raises(ValueError):
        s.replace(peak_flops={"bf16": 1e15})  # no fp32 rate to end the fallback chain
    with pytest.raises(ValueError):
        s.replace(peak_flops={**s.peak_flops, "fp4": 1e15})
    with pytest.raises(ValueError):
        s.replace(units={"warp_drive"})


def test_spec_is_frozen_hashable_and_picklable():
    s = spec("mtia450")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tdp_watts = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.peak_flops["bf16"] = 1.0  # type: ignore[index]
    assert hash(s) == hash(copy.deepcopy(s))
    assert pickle.loads(pickle.dumps(s)) == s
    assert len({spec(n) for n in chips.names()}) == len(chips.names())
    assert {s: 1}[chips.get("mtia450")] == 1


def test_numeric_fields_have_sane_types():
    for s in chips.specs():
        for field in ("hbm_bytes", "sram_bytes", "pe_rows", "pe_cols", "pe_local_bytes", "scaleup_domain"):
            assert isinstance(getattr(s, field), int), (s.name, field)
        assert s.num_pes == s.pe_rows * s.pe_cols
        assert s.sram_bytes < s.hbm_bytes
        assert s.kernel_launch_s < 1e-4


def test_assumptions_are_listed():
    a = spec("mtia450").assumptions()
    assert "clock_hz" in a and "peak_flops.mx6" in a and "peak_flops.fp32" in a
    assert "vector_flops.bf16" in a and "sram_bandwidth" in a  # "derived (assumption)"
    assert "hbm_bandwidth" not in a
    assert "peak_flops.bf16" not in spec("mtia_v2i").assumptions()


def test_summary_row_and_table():
    row = spec("mtia450").summary_row()
    assert tuple(row) == chips.SUMMARY_COLUMNS
    assert row["BF16 TF"] == "3500" and row["MX4 TF"] == "21000" and row["HBM TB/s"] == "18.4"
    assert spec("mtia300").summary_row()["MX4 TF"] == "-"
    assert spec("mtia_v2i").summary_row()["HBM GB"] == "128*"
    table = chips.summary_table()
    lines = table.splitlines()
    assert lines[0].startswith("name")
    for name in chips.names():
        assert any(l.startswith(name + " ") for l in lines)


# -- CLI ----------------------------------------------------------------------------


def test_cli_chips_table(capsys, monkeypatch):
    monkeypatch.delenv("MTIA_JAX_CHIP", raising=False)
    assert main(["chips"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines[0]
    for column in ("name", "generation", "BF16 TF", "FP8 TF", "MX4 TF", "HBM GB", "HBM TB/s", "SRAM MB", "TDP W", "units"):
        assert column in header
    rows = [l for l in lines if l.split(" ")[0] in chips.names()]
    assert [r.split()[0] for r in rows] == list(chips.names())
    # aligned: each numeric column ends at the same offset in every row
    end = header.index("HBM TB/s") + len("HBM TB/s")
    for r in rows:
        assert r[end - 1] != " " and r[end] == " "
    assert "21000" in out and "989.4" in out
    assert "default chip: mtia450" in out


def test_cli_chips_sources(capsys):
    assert main(["chips", "--sources", "MTIA 450"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mtia450: MTIA 450 (2026)")
    for field in chips.NUMERIC_FIELDS:
        assert field in out
    assert "peak_flops[mx4]" in out and "21,000 TFLOP/s" in out
    assert "P [M26 via TH26" in out and "assumption" in out
    assert "user override" not in out


def test_cli_unknown_chip(capsys):
    assert main(["chips", "--sources", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown chip 'nope'" in err and "mtia300" in err


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "chips" in capsys.readouterr().out


def test_cli_dispatch_is_table_driven(capsys):
    from mtia_jax import cli

    def configure(parser):
        parser.add_argument("--x", type=int, default=1)

    def run(args):
        print(f"x={args.x}")
        return 0

    cli.register_command("probe-test", help="test only", configure=configure, run=run)
    try:
        assert main(["probe-test", "--x", "3"]) == 0
        assert capsys.readouterr().out.strip() == "x=3"
    finally:
        cli.COMMANDS.pop("probe-test")
