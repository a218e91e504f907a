"""Published H100/H200 inference measurements that ``benchmarks/validate.py``
compares the performance model against.

Every row is a measurement copied from a public source (``SOURCES``; the
source, the table and the conditions are named in the row) with the
conditions the model needs: model, precision, batch, input/output lengths,
tensor parallelism, framework, and the metric exactly as the source defines
it. The ``split`` of every row was fixed before any fitting: the rows are
listed source by source and alternate ``train``, ``held-out`` down the list
(r01 train, r02 held-out, ...). Calibration constants are fitted on the
``train`` rows only; the ``held-out`` rows measure the error.

Metrics (``METRICS``):

- ``out_tok_s_gpu``: output tokens per second per GPU of a static batch,
  ``batch x output_len / total latency / TP`` (the formula stated in the
  Falcon180B-H200 source; the TRT061 and H200L tables use the same column,
  "Throughput (out tok/s/GPU)", measured with ``gptSessionBenchmark``, which
  runs one batch of ``batch`` sequences through the context phase and then
  generates ``output_len`` tokens each).
- ``first_token_s``: time to the first token of one sequence (batch 1),
  seconds (the source gives milliseconds).
- ``samples_s_system``: MLPerf Inference Offline samples per second of the
  whole system (``gpus`` GPUs, each running its own copy of the model).
"""

from __future__ import annotations

import dataclasses

METRICS = ("out_tok_s_gpu", "first_token_s", "samples_s_system")
SPLITS = ("train", "held-out")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where measurements come from.

    ``grouped_decode_attention``: whether the measured engine's
    generation-phase attention reads each K/V head once for its whole group
    of query heads (GQA-aware). False: it runs one attention per query head,
    each reading the cache of its K/V head, so a group of G query heads
    reads the cache G times. ``launch``: how the engine launches kernels,
    "eager" (the host, one at a time) or "graph" (a recorded graph)."""

    title: str
    url: str
    framework: str
    note: str = ""
    grouped_decode_attention: bool = True
    launch: str = "eager"


# TensorRT-LLM's GQA-aware generation kernel (XQA) came with v0.8: its blog
# (docs/source/blogs/XQA-kernel.md, https://nvidia.github.io/TensorRT-LLM/blogs/
# XQA-kernel.html) gives Llama-70B 128/2048 on one H200 at 1,227 out tok/s/GPU
# without XQA and 2,941 with it ("will be included in the v0.8 releases"). The
# v0.5 and v0.6.1 measurements predate it: their masked multi-head attention
# runs one attention per query head. The H200F rows (v0.7a) are XQA runs: r21
# is the blog's 2,941.
_PRE_XQA = ("generation-phase attention before the XQA GQA kernel (TensorRT-LLM v0.8, XQA "
            "blog): one attention per query head")
_LAUNCH = ("kernels launched by the host one at a time (assumption: the sources' commands "
           "enable no CUDA graph)")


SOURCES = {
    "TRT061": Source(
        "NVIDIA TensorRT-LLM, docs/source/performance.md ('Performance of TensorRT-LLM'): "
        "'Peak Throughput, H100 GPUs (FP8)' (data updated for v0.6.1) and 'Low Latency, "
        "H100 GPUs (FP8)' (data from v0.5) tables; the build commands give the model shapes "
        "and '--enable_fp8 --fp8_kv_cache'",
        "https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/"
        "docs/source/performance.md",
        "TensorRT-LLM v0.6.1 (throughput) / v0.5 (first-token latency), gptSessionBenchmark, "
        "H100 SXM 80GB",
        f"hardware-facts key TRT061; {_PRE_XQA}; {_LAUNCH}", grouped_decode_attention=False),
    "H200L": Source(
        "NVIDIA TensorRT-LLM blog 'H200 achieves nearly 12,000 tokens/sec on Llama2-13B with "
        "TensorRT-LLM', table 'H200 FP8 Max throughput' (batch = largest power of 2 that fits)",
        "https://github.com/NVIDIA/TensorRT-LLM/blob/1555478c1b417a0b34de05209862ea5a2ab9add1/"
        "docs/source/blogs/H200launch.md",
        "TensorRT-LLM v0.5.0, TensorRT 9.1.0.4, H200 SXM 141GB ('preliminary measured "
        "performance')", f"{_PRE_XQA}; {_LAUNCH}", grouped_decode_attention=False),
    "H200F": Source(
        "NVIDIA TensorRT-LLM blog 'Falcon-180B on a single H200 GPU with INT4 AWQ, and 6.7x "
        "faster Llama-70B over A100', table 'H200 6.7x A100' (Llama2-70B, 1 GPU rows; the "
        "footnote gives FP8 and the batch sizes, and out_tps = output_seqlen x batch_size / "
        "total_latency / tp)",
        "https://github.com/NVIDIA/TensorRT-LLM/blob/3c44cb974badec8966108b16054a99c0923e410d/"
        "docs/source/blogs/Falcon180B-H200.md",
        "TensorRT-LLM v0.7a, H200 SXM 141GB ('preliminary measured performance')",
        f"generation-phase attention with the XQA GQA kernel (r21 is the XQA blog's 'with "
        f"XQA' figure); {_LAUNCH}"),
    "MLP40": Source(
        "MLCommons Inference v4.0 results, NVIDIA closed division: results/<system>/dlrm-v2-99/"
        "Offline/performance/run_1/mlperf_log_summary.txt ('Samples per second') for "
        "DGX-H100_H100-SXM-80GBx8_TRT and H200-SXM-141GBx8_TRT; configs/dlrm-v2/Offline/"
        "__init__.py (gpu_batch_size = 600_000, embedding_weights_on_gpu_part = 1.0)",
        "https://github.com/mlcommons/inference_results_v4.0/tree/"
        "3c4a1cf196b70175cfe7c59e067cd1d923aa4f3f/closed/NVIDIA",
        "NVIDIA MLPerf Inference v4.0 harness (TensorRT), 8 GPUs",
        "dlrm-v2-99 is the 99% accuracy target, run in 8 bits (the 99.9% entries override "
        "the interaction to fp16 in the same configs; the 8-bit format is not stated in the "
        "result files); hardware-facts key MLP41 is the v4.1 round of the same repository"),
    "MLPOL": Source(
        "MLCommons inference rules (inference_policies, inference_rules.adoc), DLRM: a sample "
        "is 100-700 user-item pairs drawn from the quantiles 100, 100, 200 x 12, 300, 300, "
        "400, 500, 600, 700 (mean 270), as quoted in mlcommons/inference issues #784 and "
        "#1975 and the dlrm_v2 reference README ('each sample is mapped to 100-700 user-item "
        "pairs following the distribution specified by tools/dist_quantile.txt')",
        "https://github.com/mlcommons/inference/issues/1975",
        "-"),
}

# Llama 2 shapes (head dim 128 in all three). 7B and 70B: the TRT061 build commands
# (n_layer, n_head, n_kv_head, n_embd, inter_size, vocab_size); 13B: the Hugging Face
# config of meta-llama/Llama-2-13b-hf (Touvron et al. 2023, "Llama 2").
MODELS = {
    "llama2-7b": dict(layers=32, d_model=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000),
    "llama2-13b": dict(layers=40, d_model=5120, ffn=13824, heads=40, kv_heads=40, vocab=32000),
    "llama2-70b": dict(layers=80, d_model=8192, ffn=28672, heads=64, kv_heads=8, vocab=32000),
    # models.dlrm preset (MLPerf DLRM-DCNv2, every shape cited there)
    "dlrm-dcnv2": dict(preset="mlperf-dcnv2"),
}

# MLPerf DLRM: user-item pairs per sample, the mean of the MLPOL quantiles
# (derived: (2 x 100 + 12 x 200 + 2 x 300 + 400 + 500 + 600 + 700) / 20 = 270)
DLRM_PAIRS_PER_SAMPLE = 270


@dataclasses.dataclass(frozen=True)
class Row:
    """One published measurement and its conditions.

    ``batch``: sequences of a static batch (LLM rows) or user-item pairs per
    GPU batch (DLRM rows). ``input_len``/``output_len``: tokens per sequence
    (``output_len`` None for first-token latency). ``tp``: tensor-parallel
    GPUs per model copy. ``gpus``: GPUs of the measured system (the per-GPU
    metrics divide by ``tp``; ``samples_s_system`` counts all ``gpus``)."""

    id: str
    split: str
    source: str
    where: str          # table / file in the source
    chip: str           # mtia_jax.chips name
    model: str          # key of MODELS
    precision: str
    batch: int
    input_len: int | None
    output_len: int | None
    tp: int
    gpus: int
    metric: str
    measured: float

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"row {self.id}: split {self.split!r} not in {SPLITS}")
        if self.metric not in METRICS:
            raise ValueError(f"row {self.id}: metric {self.metric!r} not in {METRICS}")
        if self.source not in SOURCES or self.model not in MODELS:
            raise ValueError(f"row {self.id}: unknown source {self.source!r} or model {self.model!r}")
        if self.measured <= 0 or self.batch < 1 or self.tp < 1 or self.gpus < self.tp:
            raise ValueError(f"row {self.id}: measured, batch, tp must be positive and gpus >= tp")


_TRT_THR = "Peak Throughput / H100 GPUs (FP8), v0.6.1"
_TRT_LAT = "Low Latency / H100 GPUs (FP8), 1st Token Latency (ms), v0.5"
_H200L = "H200 FP8 Max throughput"
_H200F = "Llama-70B H200 table, 1 GPU rows (BS 960, 192, 96 per the footnote)"


def _llm(i, split, source, where, chip, model, batch, isl, osl, tp, measured):
    metric = "out_tok_s_gpu" if osl is not None else "first_token_s"
    return Row(f"r{i:02d}", split, source, where, chip, model, "fp8", batch, isl, osl, tp, tp,
               metric, measured)


ROWS = (
    # TRT061 throughput: LLaMA 7B / 70B (Llama 2), FP8 weights/activations and FP8 KV cache
    _llm(1, "train", "TRT061", _TRT_THR, "h100", "llama2-7b", 768, 128, 128, 1, 19694),
    _llm(2, "held-out", "TRT061", _TRT_THR, "h100", "llama2-7b", 112, 128, 2048, 1, 6818),
    _llm(3, "train", "TRT061", _TRT_THR, "h100", "llama2-7b", 80, 2048, 128, 1, 2244),
    _llm(4, "held-out", "TRT061", _TRT_THR, "h100", "llama2-7b", 48, 2048, 2048, 1, 2740),
    _llm(5, "train", "TRT061", _TRT_THR, "h100", "llama2-70b", 1024, 128, 128, 2, 2657),
    _llm(6, "held-out", "TRT061", _TRT_THR, "h100", "llama2-70b", 480, 128, 2048, 4, 1486),
    _llm(7, "train", "TRT061", _TRT_THR, "h100", "llama2-70b", 96, 2048, 128, 2, 306),
    _llm(8, "held-out", "TRT061", _TRT_THR, "h100", "llama2-70b", 64, 2048, 2048, 2, 547),
    # TRT061 first-token latency, batch 1 (ms -> s)
    _llm(9, "train", "TRT061", _TRT_LAT, "h100", "llama2-7b", 1, 128, None, 1, 7e-3),
    _llm(10, "held-out", "TRT061", _TRT_LAT, "h100", "llama2-7b", 1, 2048, None, 1, 36e-3),
    _llm(11, "train", "TRT061", _TRT_LAT, "h100", "llama2-70b", 1, 128, None, 4, 26e-3),
    _llm(12, "held-out", "TRT061", _TRT_LAT, "h100", "llama2-70b", 1, 2048, None, 4, 109e-3),
    # H200L: llama_13b / llama_70b (Llama 2), FP8
    _llm(13, "train", "H200L", _H200L, "h200", "llama2-13b", 1024, 128, 128, 1, 11819),
    _llm(14, "held-out", "H200L", _H200L, "h200", "llama2-13b", 128, 128, 2048, 1, 4750),
    _llm(15, "train", "H200L", _H200L, "h200", "llama2-13b", 64, 2048, 128, 1, 1349),
    _llm(16, "held-out", "H200L", _H200L, "h200", "llama2-70b", 512, 128, 128, 1, 3014),
    # (r17, r18: llama_70b 512 128/2048 1,654 and 64 2048/128 341 are left out: the release/0.5.0
    # version of the same table gives them at TP 4 and TP 2 as totals (6,616 and 682 out tok/s),
    # this version at TP 2 and TP 1 per GPU; the parallelism of the measurement is unknown)
    _llm(19, "train", "H200L", _H200L, "h200", "llama2-70b", 32, 2048, 128, 1, 303),
    # H200F: Llama2-70B on one H200, FP8
    _llm(20, "held-out", "H200F", _H200F, "h200", "llama2-70b", 960, 128, 128, 1, 3803),
    _llm(21, "train", "H200F", _H200F, "h200", "llama2-70b", 192, 128, 2048, 1, 2941),
    _llm(22, "held-out", "H200F", _H200F, "h200", "llama2-70b", 96, 128, 4096, 1, 1946),
    # MLPerf Inference v4.0 DLRM-DCNv2 (dlrm-v2-99), Offline, 8 GPUs, each with all tables
    Row("r23", "train", "MLP40", "DGX-H100_H100-SXM-80GBx8_TRT/dlrm-v2-99/Offline", "h100",
        "dlrm-dcnv2", "8-bit", 600_000, None, None, 1, 8, "samples_s_system", 568422),
    Row("r24", "held-out", "MLP40", "H200-SXM-141GBx8_TRT/dlrm-v2-99/Offline", "h200",
        "dlrm-dcnv2", "8-bit", 600_000, None, None, 1, 8, "samples_s_system", 572867),
)


def rows(split: str | None = None) -> tuple[Row, ...]:
    """The rows, or those of one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"rows: split must be one of {SPLITS} or None, got {split!r}")
    return tuple(r for r in ROWS if split is None or r.split == split)
