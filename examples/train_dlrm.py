"""Train a DLRM-DCNv2 on synthetic click logs drawn from a known teacher, and
save the checkpoint.

    python examples/train_dlrm.py                          # the committed checkpoint
    python examples/train_dlrm.py --train-samples 200000 --out /tmp/dlrm
    python examples/train_dlrm.py --formats bf16 mx8 mx4   # also the held-out AUC under MX

The data (``models.ctr_data``): 13 log-normal dense counts and 8 tables of
ids with Zipf frequencies (exponents 1.05..1.2), clicks drawn as
Bernoulli(sigmoid(teacher logit)) from a fixed random DLRM-DCNv2 (the
teacher). Because the labels come from known probabilities, the teacher's
held-out AUC is the ceiling any model can reach and its normalized entropy
(NE: log loss over the entropy of the base rate) the floor; the script
prints the student's figures beside them.

The student (``models.ctr_data.CONFIG``) is trained from
``dlrm.init_params(key(seed))`` with Adam (cosine decay) for one pass over
the training set, as production CTR models are (more epochs overfit the
tail ids), a tqdm bar (stderr) showing the loss and the held-out AUC / NE.
Writes under ``--out``: ``model.safetensors`` (float32) and ``meta.json``
(config, seed, steps, data sizes, the student's and teacher's held-out AUC
and NE, timings). The held-out set is regenerated from the seed and its
size (``ctr_data.make_data(seed, n, "heldout")``): no data file. Deterministic
given ``--seed`` (on one machine; XLA's float sums may differ across CPUs).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from models import ctr_data, dlrm  # noqa: E402

TRAIN_SAMPLES = 3_000_000
HELDOUT_SAMPLES = 100_000
BATCH = 2048
LR = 1e-2


def _policies():
    import mtia_jax

    P = mtia_jax.PrecisionPolicy
    # name -> (dtype of parameters and activations, MX policy), as examples/compare_dtypes.py
    return {"bf16": ("bfloat16", None), "mx8": ("bfloat16", P(weights="mx8", activations="mx8")),
            "mx6": ("bfloat16", P(weights="mx6", activations="mx8")),
            "mx4": ("bfloat16", P(weights="mx4", activations="mx8")),
            "mx4-w": ("bfloat16", P(weights="mx4"))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0,
                        help="data, initialization and batch order (default %(default)s)")
    parser.add_argument("--train-samples", type=int, default=TRAIN_SAMPLES, help="default %(default)s")
    parser.add_argument("--heldout-samples", type=int, default=HELDOUT_SAMPLES, help="default %(default)s")
    parser.add_argument("--batch", type=int, default=BATCH, help="samples per step (default %(default)s)")
    parser.add_argument("--lr", type=float, default=LR, help="peak Adam learning rate (default %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default: one pass, train-samples // batch)")
    parser.add_argument("--eval-every", type=int, default=250,
                        help="steps between held-out measurements (default %(default)s)")
    parser.add_argument("--out", type=Path, default=ctr_data.CHECKPOINT_DIR,
                        help="checkpoint directory (default examples/checkpoints/dlrm)")
    parser.add_argument("--formats", nargs="*", default=[], choices=list(_policies()),
                        help="also evaluate the student under these policies (mtia_jax.jit)")
    args = parser.parse_args(argv)
    steps = args.steps or max(1, args.train_samples // args.batch)

    start = time.perf_counter()
    cfg = ctr_data.CONFIG
    train_set = ctr_data.make_data(args.seed, args.train_samples, "train")
    heldout = ctr_data.make_data(args.seed, args.heldout_samples, "heldout")
    data_s = time.perf_counter() - start
    big = train_set.sparse[0][train_set.sparse[0] >= 0]
    counts = np.sort(np.bincount(big, minlength=cfg.table_sizes[0]))[::-1]
    print(f"data: {len(train_set):,} train / {len(heldout):,} held-out samples (seed {args.seed}, "
          f"{data_s:.1f} s); click rate {train_set.labels.mean():.2%} / {heldout.labels.mean():.2%}")
    print(f"  table 0 ({cfg.table_sizes[0]:,} rows, Zipf {ctr_data.ZIPF_EXPONENTS[0]}): the top 1% of ids "
          f"take {counts[:cfg.table_sizes[0] // 100].sum() / counts.sum():.0%} of the lookups; the most "
          f"frequent id is seen {counts[0]:,} times, the median one {int(np.median(counts)):,}, the rarest "
          f"{counts[-1]:,}")
    print(f"student: DLRM-DCNv2, {cfg.num_tables} tables of width {cfg.embed_dim}, "
          f"{dlrm.param_count(cfg):,} parameters; {steps} Adam steps of {args.batch} "
          f"({steps * args.batch / len(train_set):.2g} epochs), lr {args.lr:g}")

    t0 = time.perf_counter()
    params, history = ctr_data.train(cfg, train_set, steps=steps, seed=args.seed, batch=args.batch,
                                     lr=args.lr, eval_data=heldout, eval_every=args.eval_every,
                                     progress=True)
    train_s = time.perf_counter() - t0
    params = jax.tree.map(lambda w: np.asarray(w, np.float32), params)
    student_auc, student_ne = ctr_data.heldout_auc(params, cfg, heldout)
    teacher_auc, teacher_ne = ctr_data.teacher_metrics(heldout)

    print(f"\nheld-out ({len(heldout):,} samples, {int(heldout.labels.sum()):,} clicks):")
    print(f"  {'model':<28} {'AUC':>7} {'NE':>7}")
    print(f"  {'teacher (ceiling / floor)':<28} {teacher_auc:>7.4f} {teacher_ne:>7.4f}")
    print(f"  {'student (fp32)':<28} {student_auc:>7.4f} {student_ne:>7.4f}")
    print(f"  {'base rate only':<28} {0.5:>7.4f} {1.0:>7.4f}")
    print(f"  the student reaches {(student_auc - 0.5) / (teacher_auc - 0.5):.1%} of the teacher's AUC lift "
          f"over 0.5; trained in {train_s:.0f} s")

    formats = {}
    policies = _policies()
    for name in args.formats:
        dtype, policy = policies[name]
        a, ne = ctr_data.heldout_auc(params, cfg.replace(dtype=dtype), heldout, precision=policy)
        formats[name] = {"auc": a, "ne": ne}
        print(f"  {'student (' + name + ')':<28} {a:>7.4f} {ne:>7.4f}")

    meta = {
        "config": ctr_data.config_to_json(cfg),
        "teacher_config": ctr_data.config_to_json(ctr_data.TEACHER_CONFIG),
        "seed": args.seed, "steps": steps, "batch": args.batch, "lr": args.lr,
        "train_samples": len(train_set), "heldout_samples": len(heldout),
        "train_click_rate": float(train_set.labels.mean()),
        "heldout_click_rate": float(heldout.labels.mean()),
        "student_auc": student_auc, "student_ne": student_ne,
        "teacher_auc": teacher_auc, "teacher_ne": teacher_ne,
        "formats": formats,
        "history": history,
        "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__},
    }
    for path in ctr_data.save(params, meta, args.out):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return meta


if __name__ == "__main__":
    main()
