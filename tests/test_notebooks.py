"""The example notebooks, generated from their percent-format twins and
executed end to end on a kernel of this interpreter: examples/compare_dtypes.ipynb
(small sizes), its results checked against independent computations and
against what MX formats must do; examples/energy_per_token.ipynb (shapes only),
its figures checked against the power model applied to fresh estimates."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

import mtia_jax
from models import dlrm
from models import transformer as tf
from runtime import power

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import build_notebooks  # noqa: E402

TWIN = ROOT / "examples" / "compare_dtypes.py"
NOTEBOOK = ROOT / "examples" / "compare_dtypes.ipynb"
ENERGY_TWIN = ROOT / "examples" / "energy_per_token.py"
ENERGY_NOTEBOOK = ROOT / "examples" / "energy_per_token.ipynb"
KERNEL = "mtia-jax-test-python"
# appended to the notebook before it runs: what the checks below read
RESULTS_CELL = ("import json\nprint(json.dumps({'python': sys.executable, 'size': SIZE, "
                "'llama_shapes': LLAMA_SHAPES, 'llama': llama_table, 'dlrm_batch': DLRM_BATCH, "
                "'dlrm_auc': dlrm_auc, 'dlrm': dlrm_table, 'fastest': fastest}))")
ENERGY_RESULTS_CELL = ("import json\nprint(json.dumps({'python': sys.executable, 'decode': decode, "
                       "'dcnv2': dcnv2}))")


# ------------------------------------------------------------ the twin and the notebook

@pytest.mark.parametrize("twin, notebook", [(TWIN, NOTEBOOK), (ENERGY_TWIN, ENERGY_NOTEBOOK)],
                         ids=["compare_dtypes", "energy_per_token"])
def test_notebook_is_in_sync_with_its_twin(twin, notebook):
    assert notebook.read_text() == build_notebooks.render(twin), \
        f"examples/{notebook.name} is stale: run python examples/build_notebooks.py"


def test_every_twin_is_built():
    twins = {path.stem for path in (ROOT / "examples").glob("*.py")
             if path.read_text().startswith(build_notebooks.MARKDOWN_MARKER)}
    assert twins == set(build_notebooks.NOTEBOOKS)
    assert build_notebooks.main(["--check"]) == 0


def test_parse_splits_percent_cells():
    text = "# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\ny = 2\n# %% a title\nz = 3\n"
    assert build_notebooks.parse(text) == [("markdown", "# Title\n\ntext"), ("code", "x = 1\n\n\ny = 2"),
                                           ("code", "z = 3")]


def test_parse_rejects_text_outside_cells_and_uncommented_markdown():
    with pytest.raises(ValueError, match=r"t\.py:1: text before the first"):
        build_notebooks.parse("import os\n# %%\nx = 1\n", "t.py")
    with pytest.raises(ValueError, match=r"t\.py:2: a markdown cell's lines must start with '# '"):
        build_notebooks.parse("# %% [markdown]\nplain text\n", "t.py")


# ------------------------------------------------------------ executing it

def _kernel_dir(root: Path) -> Path:
    """A kernelspec whose argv is this interpreter, so the notebook runs in the
    environment the tests run in (not whichever "python3" kernel is installed)."""
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mtia-jax tests", "language": "python"}))
    return root


def _execute(twin: Path, results_cell: str, jupyter: Path, **env_vars):
    """Run the notebook of ``twin`` with ``results_cell`` appended, in
    examples/: (the executed notebook, the JSON the last cell printed)."""
    nb = build_notebooks.build(twin)
    nb.cells.append(nbformat.v4.new_code_cell(results_cell))
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline plots
    env.update(env_vars)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                            resources={"metadata": {"path": str(ROOT / "examples")}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(_kernel_dir(jupyter)))
        client.execute(env=env)
    stdout = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    return nb, json.loads(stdout)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(the executed dtype notebook, the results the notebook computed)."""
    return _execute(TWIN, RESULTS_CELL, tmp_path_factory.mktemp("jupyter"), COMPARE_DTYPES_SIZE="small")


@pytest.fixture(scope="module")
def executed_energy(tmp_path_factory):
    """(the executed energy notebook, its decode and DCNv2 rows)."""
    return _execute(ENERGY_TWIN, ENERGY_RESULTS_CELL, tmp_path_factory.mktemp("jupyter"))


def _rows(results, key, **match):
    rows = [r for r in results[key] if all(r[k] == v for k, v in match.items())]
    assert rows, f"no {key} row with {match}"
    return rows


def test_notebook_runs_with_plots_and_a_table(executed):
    nb, results = executed
    assert results["python"] == sys.executable  # the kernel is this interpreter
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # Llama and DLRM
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "llama3-8b decode ms" in text and "mx4 w, mx8 a" in text
    policies = {r["policy"] for r in results["llama"]}
    assert {"fp32", "bf16", "mx8", "mx4 w only"} <= policies
    assert len(results["llama"]) == len(results["dlrm"]) == len(policies) * 3  # on mtia400/450/500
    assert len(results["fastest"]) == 3 * 3  # three workloads on three chips


def test_fp32_policy_reproduces_the_jax_jit_reference(executed):
    _, results = executed
    for row in _rows(results, "llama", policy="fp32"):
        assert row["kl"] == 0.0 and row["top1"] == 1.0
    for row in _rows(results, "dlrm", policy="fp32"):
        assert row["auc delta"] == 0.0 and row["max logit err"] == 0.0


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_bf16_kl_matches_an_independent_computation(executed):
    """bf16 without a policy: mtia_jax.jit equals jax.jit, so plain jax.jit of
    the bf16 model gives the KL the notebook reports."""
    _, results = executed
    size = results["size"]
    cfg = tf.Config.preset("tiny")
    params = tf.init_params(cfg, jax.random.key(0))
    prompts = jax.random.randint(jax.random.key(1), (size["prompts"], size["prompt_len"]), 0, cfg.vocab)
    logits = lambda c, p: jax.jit(lambda p: tf.forward(c, p, prompts)[0])(p)
    ref = _log_softmax(logits(cfg, params))
    got = _log_softmax(logits(cfg.replace(dtype="bfloat16"),
                              jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - got), axis=-1)))
    for row in _rows(results, "llama", policy="bf16"):
        np.testing.assert_allclose(row["kl"], kl, rtol=1e-6)


def test_error_grows_as_formats_narrow(executed):
    _, results = executed
    row = {p: _rows(results, "llama", policy=p, chip="mtia450")[0]
           for p in ("bf16", "mx8", "mx6 w, mx8 a", "mx4 w, mx8 a", "mx4 w only")}
    assert row["bf16"]["top1"] >= 0.9 and row["bf16"]["kl"] < 1e-3
    assert 0 < row["bf16"]["kl"] < row["mx8"]["kl"] < row["mx4 w, mx8 a"]["kl"]
    assert row["mx6 w, mx8 a"]["kl"] < row["mx4 w, mx8 a"]["kl"]
    assert row["mx4 w only"]["kl"] > row["mx8"]["kl"]
    assert row["mx4 w, mx8 a"]["top1"] < row["bf16"]["top1"]


def test_latency_cells_are_estimates_and_narrow_weights_speed_up_decode(executed):
    _, results = executed
    shape = results["llama_shapes"]["llama3-8b"]
    cfg = tf.Config.preset("llama3-8b")
    batch = shape["batch"]
    report = mtia_jax.estimate(functools.partial(tf.decode, cfg), tf.param_shapes(cfg),
                               jax.ShapeDtypeStruct((batch,), jnp.int32),
                               tf.cache_shapes(cfg, batch, shape["context"]), chip="mtia500",
                               precision=mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8"),
                               donate_argnums=(2,))  # the notebook donates the cache, as engines do
    cell = _rows(results, "llama", policy="mx4 w, mx8 a", chip="mtia500")[0]["llama3-8b decode ms"]
    np.testing.assert_allclose(cell, report.time_s * 1e3, rtol=1e-9)
    for chip in ("mtia400", "mtia450", "mtia500"):
        decode = {p: _rows(results, "llama", policy=p, chip=chip)[0]["llama3-8b decode ms"]
                  for p in ("fp32", "bf16", "mx4 w, mx8 a")}
        # a decode step streams every weight: fewer bytes per weight, less time
        assert decode["mx4 w, mx8 a"] < decode["bf16"] < decode["fp32"], (chip, decode)


def test_dlrm_learns_the_synthetic_clicks_and_narrow_formats_cost_more(executed):
    _, results = executed
    assert results["dlrm_auc"] > 0.7  # trained: the AUC delta measures something
    row = {p: _rows(results, "dlrm", policy=p, chip="mtia400")[0]
           for p in ("bf16", "mx8", "mx4 w, mx8 a")}
    assert abs(row["bf16"]["auc delta"]) < 1e-3
    assert 0 < row["bf16"]["max logit err"] < row["mx8"]["max logit err"] < row["mx4 w, mx8 a"]["max logit err"]


def test_dlrm_latency_cells_are_estimates_and_bf16_tables_beat_fp32(executed):
    _, results = executed
    cfg = dlrm.Config.preset("mlperf-dcnv2").replace(dtype="bfloat16")
    report = dlrm.estimate(cfg, results["dlrm_batch"], chip="mtia450",
                           precision=mtia_jax.PrecisionPolicy(weights="mx8", activations="mx8"))
    cell = _rows(results, "dlrm", policy="mx8", chip="mtia450")[0]["mlperf-dcnv2 batch ms"]
    np.testing.assert_allclose(cell, report.time_s * 1e3, rtol=1e-9)
    for chip in ("mtia400", "mtia450", "mtia500"):
        batch = {p: _rows(results, "dlrm", policy=p, chip=chip)[0]["mlperf-dcnv2 batch ms"]
                 for p in ("fp32", "bf16")}
        # the pooled lookups read table rows: half the bytes per row in bf16
        assert batch["bf16"] < batch["fp32"], (chip, batch)


def test_fastest_policy_table_picks_the_minimum(executed):
    _, results = executed
    columns = {"Llama-3-8B decode": ("llama", "llama3-8b decode ms"),
               "Llama-3-8B prefill": ("llama", "llama3-8b prefill ms"),
               "DLRM-DCNv2 batch": ("dlrm", "mlperf-dcnv2 batch ms")}
    for row in results["fastest"]:
        key, column = columns[row["workload"]]
        times = {r["policy"]: r[column] for r in _rows(results, key, chip=row["chip"])}
        assert row["ms"] == min(times.values()) == times[row["fastest policy"]]
        np.testing.assert_allclose(row["x vs bf16"], times["bf16"] / row["ms"])


# ------------------------------------------------------------ the energy notebook

MTIA = ("mtia400", "mtia450", "mtia500")
GPUS = ("h100", "h200")


def test_energy_notebook_runs_with_a_plot_and_labelled_tables(executed_energy):
    nb, results = executed_energy
    assert results["python"] == sys.executable
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 1
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for words in ("power model (assumptions): idle = 30% of TDP", "60% compute / 40% HBM",
                  "Llama-3-70B decode, batch 64, KV cache 2048, TP8 (modeled)", "J/token", "tokens/J",
                  "tokens/s/dev", "mJ/sample", "idle 15 %", "idle 45 %", "compute 40 %", "compute 80 %"):
        assert words in text, words
    # every table and figure title says modeled
    titles = [line for line in text.splitlines() if line.startswith(("Llama-3-70B", "DLRM-DCNv2", "J/token of",
                                                                      "mJ/sample of", "order of"))]
    assert len(titles) == 5 and all("(modeled)" in t for t in titles), titles
    # bf16 on every chip, MX4 on the chips with MX matrix engines only
    assert sorted((r["chip"], r["dtype"]) for r in results["decode"]) == sorted(
        [(c, "bf16") for c in MTIA + GPUS] + [(c, "MX4") for c in MTIA])
    assert [r["chip"] for r in results["dcnv2"]] == list(MTIA + GPUS)


def test_energy_notebook_figures_are_the_power_model_of_fresh_estimates(executed_energy):
    _, results = executed_energy
    batch, tp = 64, 8
    for chip, policy, dtype in (("mtia450", mtia_jax.PrecisionPolicy(weights="mx4", activations="mx8"), "MX4"),
                                ("h200", None, "bf16")):
        cfg = tf.Config.preset("llama3-70b")
        mesh = tf.tensor_parallel_mesh(cfg, 1, tp, chip=chip)
        pspecs, cspecs, tspec = tf.shardings(cfg, mesh, batch)
        report = mtia_jax.estimate(functools.partial(tf.decode, cfg), tf.param_shapes(cfg),
                                   jax.ShapeDtypeStruct((batch,), jnp.int32), tf.cache_shapes(cfg, batch, 2048),
                                   chip=chip, mesh=mesh, in_shardings=(pspecs, tspec, cspecs),
                                   donate_argnums=(2,), precision=policy)
        row = _rows(results, "decode", chip=chip, dtype=dtype)[0]
        per_token = lambda **moved: power.energy(report.cost, report.chip, **moved).joules * tp / batch
        np.testing.assert_allclose(row["step ms"], report.time_s * 1e3, rtol=1e-9)
        np.testing.assert_allclose(row["tokens/s/dev"], batch / report.time_s / tp, rtol=1e-9)
        np.testing.assert_allclose(row["J/token"], per_token(), rtol=1e-9)
        np.testing.assert_allclose(row["J/token idle45"], per_token(idle_fraction=0.45), rtol=1e-9)
        np.testing.assert_allclose(row["J/token comp80"], per_token(compute_share=0.8), rtol=1e-9)


def test_energy_notebook_rows_are_consistent(executed_energy):
    _, results = executed_energy
    for row in results["decode"]:
        np.testing.assert_allclose(row["tokens/J"] * row["J/token"], 1.0, rtol=1e-12)
        # more idle power, more energy; decode streams bytes more than it computes,
        # so moving the dynamic power toward compute makes it cheaper
        assert row["J/token idle15"] < row["J/token"] < row["J/token idle45"], row
        assert row["J/token comp80"] < row["J/token"] < row["J/token comp40"], row
        assert 0 <= row["launch %"] <= 100
    for row in results["dcnv2"]:
        np.testing.assert_allclose(row["samples/J"] * row["mJ/sample"], 1e3, rtol=1e-12)
        assert row["mJ/sample idle15"] < row["mJ/sample"] < row["mJ/sample idle45"], row
    for chip in MTIA:  # MX4 weights: fewer bytes per step, less energy per token
        mx4, bf16 = (_rows(results, "decode", chip=chip, dtype=d)[0]["J/token"] for d in ("MX4", "bf16"))
        assert mx4 < bf16, chip
