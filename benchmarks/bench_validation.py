"""What held-out validation costs a training run, as a share of its step time (issue 25).

A Trainer on a synthetic latent cache (the model, latent size and batch below), its validation
set `--clips` clips at `--timesteps` timesteps (the defaults: validation.max_clips 64,
validation.timesteps 4). It times training steps (forward, IDDPM hybrid loss, backward, AdamW,
EMA) and whole evaluations (the raw and the EMA weights, as the trainer runs them), interleaved,
medians; the share is one evaluation over `every` steps (validation.every). On one process:
data-parallel ranks split the items, so an evaluation on N ranks takes 1/N of this one's time,
as a step does with the global batch split the same way; the share stays what it is here.

    .venv/bin/python benchmarks/bench_validation.py [--preset STDiT-S/2] [--repeats 5] [--figure docs/bench_validation.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_train import write_shard_cache  # noqa: E402  (the tests' cache writer, as the encode jobs write)

from soraflow.data import cache, table  # noqa: E402
from soraflow.training.loop import Trainer  # noqa: E402


def index(root: Path, name: str, count: int, shape) -> Path:
    ids = [f"{name}{i}" for i in range(count)]
    where = write_shard_cache(root / f"{name}_l.json", ids, {"latents": torch.randn(count, *shape)})
    mask = torch.ones(count, 32, dtype=torch.long)
    texts = write_shard_cache(root / f"{name}_t.json", ids, cache.text_tensors(torch.randn(count, 32, 384), mask))
    rows = pd.DataFrame({"id": ids, "latent_path": [where[i][0] for i in ids], "latent_index": [where[i][1] for i in ids],
                         "text_emb_path": [texts[i][0] for i in ids], "text_emb_index": [texts[i][1] for i in ids]})
    table.write(rows, root / f"{name}.parquet")
    return root / f"{name}.parquet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="STDiT-S/2")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--latent", type=int, nargs=4, default=[4, 4, 16, 16], metavar=("C", "T", "H", "W"))
    parser.add_argument("--batch", type=int, default=8, help="samples per training step")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figure", default=None, help="a PNG of the share against validation.every")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_index = index(root, "train", 16, args.latent)
        held_out = index(root, "held", args.clips, args.latent)
        params = {
            "stage": {"steps": 10**6, "batch_size": args.batch, "lr": 1e-4},
            "train": {"seed": 0, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.999, "grad_checkpointing": False,
                      "mixed_precision": "fp32", "sp_size": 1, "engine": "ddp", "data_workers": 0},
            "stdit": {"preset": args.preset, "depth": args.depth, "space_scale": 1.0, "model_max_length": 32},
            "diffusion": {"num_timesteps": 1000},
            "validation": {"timesteps": args.timesteps, "max_clips": args.clips},
        }  # fmt: skip
        trainer = Trainer(train_index, root / "out.safetensors", root / "run", params, params, validation_index=held_out)
        batches = trainer.batches(10**6)
        trainer.train_step(next(batches))  # warm-up
        steps, evaluations = [], []
        for _ in range(args.repeats):
            for _ in range(3):
                batch = next(batches)
                started = time.perf_counter()
                trainer.train_step(batch)
                steps.append(time.perf_counter() - started)
            started = time.perf_counter()
            trainer.validation_loss()
            with trainer.ema_weights():
                trainer.validation_loss()
            evaluations.append(time.perf_counter() - started)
    step, evaluation = statistics.median(steps), statistics.median(evaluations)
    items = args.clips * args.timesteps
    print(f"{args.preset} depth {args.depth}, latent {'x'.join(map(str, args.latent))}, batch {args.batch}, "
          f"{args.threads} thread(s), load {Path('/proc/loadavg').read_text().split()[0]}")
    print(f"training step {step * 1e3:.0f} ms (median of {len(steps)}); evaluation of {items} items x 2 weights "
          f"{evaluation:.2f} s (median of {len(evaluations)}) = {evaluation / step:.1f} steps\n")
    print("| validation.every | evaluation / training time |")
    print("|---|---|")
    for every in args.every:
        print(f"| {every} | {evaluation / (every * step):.2%} |")
    if args.figure:
        import matplotlib.pyplot as plt

        from soraflow.core.figures import save_figure

        grid = list(range(50, 2001, 25))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for timesteps in (1, 2, 4, 8):
            scale = timesteps / args.timesteps
            ax.plot(grid, [100 * scale * evaluation / (every * step) for every in grid], label=f"{timesteps} timesteps")
        ax.axvline(500, color="grey", linestyle=":", label="default every (500)")
        ax.set(xlabel="validation.every (steps)", ylabel="% of training time", yscale="log",
               title=f"validation of {args.clips} clips, raw + EMA ({args.preset} d{args.depth}, batch {args.batch})")
        ax.legend(fontsize=8)
        save_figure(fig, args.figure)


if __name__ == "__main__":
    main()
