"""Train the small byte-level Llama of ``models.tiny_llm`` on the Python
standard library's own source, offline, and save the checkpoint.

    python examples/train_tiny_llm.py                      # the committed checkpoint
    python examples/train_tiny_llm.py --steps 50 --out /tmp/tiny_llm

The corpus is the top-level ``*.py`` modules of the running interpreter's
standard library, split into train and held-out by a hash of each file name
(``models.tiny_llm.load_corpus``); tokens are bytes (vocabulary 256). A tqdm
bar (stderr) shows the train loss and the held-out perplexity of the
evaluation slice (the first 32 KiB of the held-out stream), measured every
``--eval-every`` steps. At the end the script prints the per-byte perplexity
on the whole held-out split next to the unigram baseline (the train split's
byte frequencies), and writes under ``--out``: ``model.safetensors`` +
``config.json`` (``models.checkpoint.save_hf``, weights in bfloat16),
``meta.json`` (config, seed, steps, corpus sizes, perplexities, wall time)
and ``eval_slice.bin.gz``. Every figure is of the weights as stored
(rounded to bfloat16), so a reload reproduces them. Deterministic given
``--seed`` (on one machine; XLA's float sums may differ across CPUs).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

from models import tiny_llm  # noqa: E402
from models import transformer as tf  # noqa: E402

DEFAULT_STEPS = 500
BATCH = 16
SEQ_LEN = 256


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="initialization and batch order (default %(default)s)")
    parser.add_argument("--out", type=Path, default=tiny_llm.CHECKPOINT_DIR,
                        help="checkpoint directory (default examples/checkpoints/tiny_llm)")
    parser.add_argument("--batch", type=int, default=BATCH, help="windows per step (default %(default)s)")
    parser.add_argument("--eval-every", type=int, default=100,
                        help="steps between held-out measurements (default %(default)s)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cfg = tiny_llm.CONFIG
    corpus = tiny_llm.load_corpus()
    train_data, heldout = corpus["train"], corpus["heldout"]
    eval_bytes = heldout[:tiny_llm.EVAL_SLICE_BYTES]
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(tf.param_shapes(cfg)))
    print(f"corpus: {len(corpus['train_files'])} train files ({len(train_data):,} bytes), "
          f"{len(corpus['heldout_files'])} held-out files ({len(heldout):,} bytes)")
    print(f"model: d_model {cfg.d_model}, {cfg.layers} layers, {cfg.heads} heads / {cfg.kv_heads} KV, "
          f"ffn {cfg.ffn}, vocab {cfg.vocab}: {n_params:,} parameters; {args.steps} steps of "
          f"{args.batch} x {SEQ_LEN} bytes, seed {args.seed}")

    params, history = tiny_llm.train(cfg, train_data, steps=args.steps, seed=args.seed,
                                     batch=args.batch, seq_len=SEQ_LEN, eval_data=eval_bytes,
                                     eval_every=args.eval_every, progress=True)

    # the figures of the weights as stored: bfloat16, exact in float32 on reload
    stored = jax.tree.map(lambda w: w.astype(jnp.bfloat16).astype(jnp.float32), params)
    heldout_ppl = tiny_llm.heldout_perplexity(cfg, stored, heldout, seq_len=SEQ_LEN)
    slice_ppl = tiny_llm.heldout_perplexity(cfg, stored, eval_bytes, seq_len=SEQ_LEN)
    unigram = tiny_llm.unigram_perplexity(train_data, heldout)
    slice_unigram = tiny_llm.unigram_perplexity(train_data, eval_bytes)
    wall = time.perf_counter() - start

    meta = {
        "config": dataclasses.asdict(cfg),
        "parameters": n_params,
        "seed": args.seed, "steps": args.steps, "batch": args.batch, "seq_len": SEQ_LEN,
        "train_files": len(corpus["train_files"]), "train_bytes": int(len(train_data)),
        "heldout_files": len(corpus["heldout_files"]), "heldout_bytes": int(len(heldout)),
        "heldout_file_names": corpus["heldout_files"],
        "heldout_ppl": heldout_ppl, "unigram_ppl": unigram,
        "eval_slice_bytes": int(len(eval_bytes)), "eval_slice_ppl": slice_ppl,
        "eval_slice_unigram_ppl": slice_unigram,
        "stored_dtype": "bfloat16",
        "wall_time_s": round(wall, 1),
        "python": platform.python_version(), "jax": jax.__version__, "machine": platform.machine(),
        "history": history,
    }
    tiny_llm.save(params, meta, eval_bytes, args.out, cfg)
    reloaded_cfg, reloaded = tiny_llm.load(args.out)
    assert reloaded_cfg == cfg and all(jax.tree.leaves(jax.tree.map(np.array_equal, reloaded, stored)))

    print(f"held-out perplexity (bytes): {heldout_ppl:.3f}   unigram baseline: {unigram:.3f}")
    print(f"evaluation slice ({len(eval_bytes):,} bytes): {slice_ppl:.3f}   unigram: {slice_unigram:.3f}")
    print(f"wall time {wall:.0f} s; checkpoint in {args.out}")
    return meta


if __name__ == "__main__":
    main()
