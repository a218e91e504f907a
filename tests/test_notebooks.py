"""examples/compare_dtypes.ipynb: generated from its percent-format twin, and
executed end to end (small sizes) on a kernel of this interpreter, its results
checked against independent computations and against what MX formats must do."""

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import build_notebooks  # noqa: E402

TWIN = ROOT / "examples" / "compare_dtypes.py"
NOTEBOOK = ROOT / "examples" / "compare_dtypes.ipynb"
KERNEL = "mtia-jax-test-python"
# appended to the notebook before it runs: what the checks below read
RESULTS_CELL = ("import json\nprint(json.dumps({'python': sys.executable, 'size': SIZE, "
                "'llama_shapes': LLAMA_SHAPES, 'llama': llama_table, 'dlrm_batch': DLRM_BATCH, "
                "'dlrm_auc': dlrm_auc, 'dlrm': dlrm_table, 'fastest': fastest}))")


# ------------------------------------------------------------ the twin and the notebook

def test_notebook_is_in_sync_with_its_twin():
    assert NOTEBOOK.read_text() == build_notebooks.render(TWIN), \
        "examples/compare_dtypes.ipynb is stale: run python examples/build_notebooks.py"


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


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """(the executed notebook, the results the notebook computed)."""
    nb = build_notebooks.build(TWIN)
    nb.cells.append(nbformat.v4.new_code_cell(RESULTS_CELL))
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the kernel's inline plots
    env["COMPARE_DTYPES_SIZE"] = "small"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=300, startup_timeout=120,
                            resources={"metadata": {"path": str(ROOT / "examples")}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(_kernel_dir(tmp_path_factory.mktemp("jupyter"))))
        client.execute(env=env)
    stdout = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    return nb, json.loads(stdout)


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
