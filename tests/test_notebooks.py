"""The example notebooks, generated from their percent-format twins and
executed end to end on a kernel of this interpreter: examples/compare_dtypes.ipynb
(small sizes), its perplexities, AUCs, sensitivities, searched policy and
modeled cells checked against the checkpoints, independent computations and
what MX formats must do; examples/energy_per_token.ipynb (shapes only),
its figures checked against the power model applied to fresh estimates."""

from __future__ import annotations

import functools
import json
import math
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
from models import ctr_data, dlrm, tiny_llm
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
RESULTS_CELL = ("import json\nimport sys\nprint(json.dumps({'python': sys.executable, 'size': SIZE, 'llm_ppl': llm_ppl, "
                "'kv_check': kv_check, 'decode_shapes': DECODE_SHAPES, 'llm': llm_table, "
                "'searched_rows': searched_rows, 'search': search_summary, 'pareto': pareto_rows, "
                "'sensitivity': [{'group': g, 'format': f, 'delta': sens.delta(g, f)} "
                "for g in sens.groups for f in SIZE['formats']], "
                "'dlrm_samples': len(heldout), 'teacher': {'AUC': teacher_auc, 'NE': teacher_ne}, "
                "'dlrm_acc': dlrm_acc, 'dlrm_batch': DLRM_BATCH, 'dlrm': dlrm_table, 'fastest': fastest}))")
ENERGY_RESULTS_CELL = ("import json\nimport sys\nprint(json.dumps({'python': sys.executable, 'decode': decode, "
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


def test_notebook_runs_with_plots_and_labelled_tables(executed):
    nb, results = executed
    assert results["python"] == sys.executable  # the kernel is this interpreter
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert len(images) == 3  # sensitivity heat map, Pareto fronts, DLRM
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for words in ("8B mJ/tok", "70B tok/s", "mx4 w, mx8 a", "kv mx4", "teacher (ceiling)", "unigram baseline",
                  "on the whole held-out split", "KV-cache check", "searched policy on the held-out slice",
                  "on the Pareto front"):
        assert words in text, words
    # every table's title says what is measured and what is modeled
    titles = [line for line in text.splitlines() if line.startswith(
        ("trained byte-level", "KV-cache check", "Llama decode step", "loss increase per group", "searched policy (",
         "the searched policy at", "trained DLRM", "DLRM: AUC", "the fastest policy"))]
    assert len(titles) == 9 and all("measured" in t for t in titles), titles
    with_latency = [t for t in titles if t.startswith(("Llama decode step", "searched policy (",
                                                       "the searched policy at", "DLRM: AUC", "the fastest policy"))]
    assert len(with_latency) == 5 and all("modeled" in t for t in with_latency), with_latency
    policies = {r["policy"] for r in results["llm"]}
    assert policies == set(results["llm_ppl"]) and len(policies) == 8
    assert len(results["llm"]) == 8 * 3 and len(results["searched_rows"]) == 3  # on mtia400/450/500
    assert len(results["dlrm"]) == 6 * 3  # no KV cache in the DLRM
    assert len(results["fastest"]) == 4 * 3  # 8B, 70B, DCNv2 at two AUC targets, on three chips


def test_perplexity_is_the_checkpoints(executed):
    """fp32 reloads to the perplexity recorded beside the checkpoint; bf16 without a
    policy is heldout_perplexity of plain jax.jit; all beat the unigram baseline."""
    _, results = executed
    ppl, meta = results["llm_ppl"], tiny_llm.read_meta()
    # recorded by the training run: equal to float32 rounding (another CPU may sum in another order)
    np.testing.assert_allclose(ppl["fp32"], meta["eval_slice_ppl"], rtol=1e-5)
    cfg, params = tiny_llm.load()
    bf16 = tiny_llm.heldout_perplexity(cfg.replace(dtype="bfloat16"), jax.tree.map(
        lambda w: jnp.asarray(w, jnp.bfloat16), params), tiny_llm.eval_slice())
    np.testing.assert_allclose(ppl["bf16"], bf16, rtol=1e-12)
    assert abs(ppl["bf16"] / ppl["fp32"] - 1) < 1e-3  # the weights are stored in bf16
    assert max(ppl.values()) < meta["eval_slice_unigram_ppl"] / 4


def test_perplexity_grows_as_formats_narrow(executed):
    _, results = executed
    ppl = results["llm_ppl"]
    assert ppl["bf16"] < ppl["mx8"] < 1.01 * ppl["bf16"]  # MX8 within 1 % (issue 16)
    assert ppl["mx6 w, mx8 a"] < 1.01 * ppl["bf16"]
    assert ppl["mx4 w only"] > 1.02 * ppl["bf16"] and ppl["mx4 w only"] > ppl["mx6 w, mx8 a"]
    assert ppl["mx4 w, mx8 a"] > ppl["mx8"]
    assert ppl["bf16"] < ppl["kv mx8"] < ppl["kv mx4"]


def test_kv_cache_check_decode_pays_what_the_forward_pass_pays(executed):
    _, results = executed
    bf16, mx4 = (_rows(results, "kv_check", policy=p)[0] for p in ("bf16", "kv mx4"))
    effect = mx4["forward nats/byte"] - bf16["forward nats/byte"]
    assert effect > 0.005
    assert abs(bf16["decode nats/byte"] - bf16["forward nats/byte"]) < 1e-3  # bf16 rounding only
    assert abs((mx4["decode nats/byte"] - bf16["decode nats/byte"]) - effect) < 0.2 * effect


def _decode_report(preset, chip, policy, batch, context, tp):
    cfg = tf.Config.preset(preset)
    args = (tf.param_shapes(cfg), jax.ShapeDtypeStruct((batch,), jnp.int32), tf.cache_shapes(cfg, batch, context))
    kwargs = {}
    if tp > 1:
        mesh = tf.tensor_parallel_mesh(cfg, 1, tp, chip=chip)
        pspecs, cspecs, tspec = tf.shardings(cfg, mesh, batch)
        kwargs = dict(mesh=mesh, in_shardings=(pspecs, tspec, cspecs))
    return mtia_jax.estimate(functools.partial(tf.decode, cfg), *args, chip=chip, precision=policy,
                             donate_argnums=(2,), **kwargs)


def test_decode_cells_are_fresh_estimates_and_narrow_formats_speed_up_decode(executed):
    _, results = executed
    P = mtia_jax.PrecisionPolicy
    for preset, short, chip, name, policy in (("llama3-8b", "8B", "mtia500", "mx4 w, mx8 a",
                                               P(weights="mx4", activations="mx8")),
                                              ("llama3-70b", "70B", "mtia450", "kv mx4", P(kv_cache="mx4"))):
        shape = results["decode_shapes"][preset]
        report = _decode_report(preset, chip, policy, **shape)
        row = _rows(results, "llm", policy=name, chip=chip)[0]
        np.testing.assert_allclose(row[f"{short} ms"], report.time_s * 1e3, rtol=1e-9)
        np.testing.assert_allclose(row[f"{short} tok/s"], shape["batch"] / report.time_s, rtol=1e-9)
        joules = power.energy(report.cost, report.chip).joules * shape["tp"] / shape["batch"]
        np.testing.assert_allclose(row[f"{short} mJ/tok"], joules * 1e3, rtol=1e-9)
    assert results["decode_shapes"]["llama3-70b"]["tp"] == 8
    for chip in ("mtia400", "mtia450", "mtia500"):
        row = {p: _rows(results, "llm", policy=p, chip=chip)[0] for p in results["llm_ppl"]}
        for short in ("8B", "70B"):
            # a decode step streams every weight and the cache: fewer bytes, less time and energy
            assert row["mx4 w only"][f"{short} ms"] < row["bf16"][f"{short} ms"] < row["fp32"][f"{short} ms"]
            assert row["mx4 w only"][f"{short} mJ/tok"] < row["bf16"][f"{short} mJ/tok"]
            assert row["kv mx4"][f"{short} ms"] < row["kv mx8"][f"{short} ms"] < row["bf16"][f"{short} ms"]
            assert all(r["ppl"] == results["llm_ppl"][p] for p, r in row.items())


def test_sensitivity_table_and_search(executed):
    _, results = executed
    sens, search = results["sensitivity"], results["search"]
    groups = {r["group"] for r in sens}
    assert groups == set(results["size"]["groups"] or groups) and len(sens) == len(groups) * len(
        results["size"]["formats"])
    delta = {(r["group"], r["format"]): r["delta"] for r in sens}
    for g in groups:  # 4-bit elements cost more than 6-bit ones, group by group
        assert delta[(g, "mx4")] > delta[(g, "mx6")], g
    np.testing.assert_allclose(search["target"], math.log(1.01))
    np.testing.assert_allclose(search["budget"], search["target"] / 2)
    assert search["cal loss rise"] <= search["budget"]  # by construction, on the calibration windows
    assert search["rules"] and search["8B ms after"] < search["8B ms before"]
    # held out: within the target, or the notebook says it is not
    assert search["meets target"] == (search["heldout rise"] <= search["target"])
    if not search["meets target"]:
        text = "".join(o.get("text", "") for c in executed[0].cells if c.cell_type == "code" for o in c.outputs)
        assert "NOT met" in text
    # the rules reported are the policy measured and modeled
    policy = mtia_jax.PrecisionPolicy(rules=tuple(tuple(r) for r in search["rules"]))
    cfg, params = tiny_llm.load(dtype="bfloat16")
    ppl = tiny_llm.heldout_perplexity(cfg, params, tiny_llm.eval_slice(), precision=policy, chip="mtia450")
    np.testing.assert_allclose(search["ppl"], ppl, rtol=1e-12)
    np.testing.assert_allclose(search["heldout rise"], math.log(ppl / results["llm_ppl"]["bf16"]), rtol=1e-9)
    row = _rows(results, "searched_rows", chip="mtia450")[0]
    np.testing.assert_allclose(row["8B ms"], search["8B ms after"], rtol=1e-9)
    report = _decode_report("llama3-8b", "mtia450", policy, **results["decode_shapes"]["llama3-8b"])
    np.testing.assert_allclose(row["8B ms"], report.time_s * 1e3, rtol=1e-9)


def test_pareto_front_is_the_non_dominated_policies(executed):
    _, results = executed
    ppl = results["llm_ppl"] | {"searched": results["search"]["ppl"]}
    for front in results["pareto"]:
        rows = [r for r in results["llm"] + results["searched_rows"] if r["chip"] == front["chip"]]
        ms = {r["policy"]: r[f"{front['shape']} ms"] for r in rows}
        dominated = {p for p in ms for q in ms if q != p and ms[q] <= ms[p] and ppl[q] <= ppl[p]
                     and (ms[q], ppl[q]) != (ms[p], ppl[p])}
        assert front["front"] == sorted(set(ms) - dominated, key=ms.get), front


def test_dlrm_auc_is_under_the_teachers_ceiling(executed):
    _, results = executed
    acc, teacher = results["dlrm_acc"], results["teacher"]
    assert all(r["AUC"] < teacher["AUC"] and r["NE"] > teacher["NE"] for r in acc.values())
    assert abs(acc["bf16"]["AUC"] - acc["fp32"]["AUC"]) < 1e-4
    assert acc["mx4 w, mx8 a"]["AUC"] < acc["mx8"]["AUC"] < acc["fp32"]["AUC"]
    assert acc["mx4 w, mx8 a"]["NE"] > acc["mx8"]["NE"] > acc["fp32"]["NE"]
    # the scores are the checkpoint's on the held-out samples regenerated from the recorded seed
    meta = ctr_data.read_meta()
    heldout = ctr_data.make_data(meta["seed"], meta["heldout_samples"], "heldout").take(
        slice(0, results["dlrm_samples"]))
    cfg, params = ctr_data.load()
    np.testing.assert_allclose((acc["fp32"]["AUC"], acc["fp32"]["NE"]), ctr_data.heldout_auc(params, cfg, heldout),
                               rtol=1e-12)
    np.testing.assert_allclose((teacher["AUC"], teacher["NE"]), ctr_data.teacher_metrics(heldout), rtol=1e-12)


def test_dlrm_latency_cells_are_estimates_and_bf16_tables_beat_fp32(executed):
    _, results = executed
    cfg = dlrm.Config.preset("mlperf-dcnv2").replace(dtype="bfloat16")
    report = dlrm.estimate(cfg, results["dlrm_batch"], chip="mtia450",
                           precision=mtia_jax.PrecisionPolicy(weights="mx8", activations="mx8"))
    row = _rows(results, "dlrm", policy="mx8", chip="mtia450")[0]
    np.testing.assert_allclose(row["DCNv2 ms"], report.time_s * 1e3, rtol=1e-9)
    np.testing.assert_allclose(row["mJ/sample"], power.energy(report.cost, report.chip).joules
                               / results["dlrm_batch"] * 1e3, rtol=1e-9)
    for chip in ("mtia400", "mtia450", "mtia500"):
        batch = {p: _rows(results, "dlrm", policy=p, chip=chip)[0]["DCNv2 ms"] for p in ("fp32", "bf16", "mx8")}
        # the pooled lookups read table rows: half the bytes per row in bf16
        assert batch["mx8"] < batch["bf16"] < batch["fp32"], (chip, batch)


def test_fastest_policy_table_picks_the_fastest_that_meets_the_target(executed):
    _, results = executed
    ppl = results["llm_ppl"] | {"searched": results["search"]["ppl"]}
    llm = results["llm"] + results["searched_rows"]
    fp32_auc = results["dlrm_acc"]["fp32"]["AUC"]
    for row in results["fastest"]:
        if row["workload"].startswith("Llama"):
            column = row["workload"].split("-")[2].split()[0] + " ms"  # "Llama-3-8B decode" -> "8B ms"
            times = {r["policy"]: r[column] for r in llm if r["chip"] == row["chip"]}
            ok = {p for p in times if ppl[p] <= 1.01 * ppl["bf16"]}
        else:
            column, share = "DCNv2 ms", 0.99 if "99.0%" in row["target"] else 0.999
            times = {r["policy"]: r[column] for r in results["dlrm"] if r["chip"] == row["chip"]}
            ok = {p for p in times if results["dlrm_acc"][p]["AUC"] >= share * fp32_auc}
        assert "bf16" in ok and row["fastest policy"] in ok
        assert row["ms"] == min(times[p] for p in ok) == times[row["fastest policy"]]
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
