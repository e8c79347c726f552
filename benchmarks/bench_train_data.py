"""Share of training time spent waiting for data: DataLoader workers vs reading on the training thread (issue 15).

    .venv/bin/python benchmarks/bench_train_data.py [--steps 40] [--clips 512] [--threads 1]

The real Trainer.run (STDiT-demo, AdamW, EMA, grad clip, float32) on a bf16 latent and text
cache written by the encode jobs' ChunkStore (16 MiB chunks), at the demo's stage shapes.
Measured by the trainer itself: seconds its loop waited for the next batch (data_wait)
over the loop's wall time (loss.csv's seconds), with train.data_workers 0 (each step reads
its rows and draws its noise on the training thread) and 2 (workers prefetch two batches
each). Goal: under 5% with workers.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml
from tables import print_table

REPO = Path(__file__).resolve().parents[1]
# (name, latent C x T x h x w of the demo's stages (pixel_pack factor 2 at 16 px), batch)
CASES = [("demo stage 1 (images)", (12, 1, 8, 8), 8), ("demo stage 3 (16 frames)", (12, 16, 8, 8), 4)]
TEXT_TOKENS, TEXT_WIDTH = 32, 384


def write_cache(root: Path, latent: tuple, clips: int) -> Path:
    from soraflow.data import cache, table

    ids = [f"clip{k:05d}" for k in range(clips)]
    g = torch.Generator().manual_seed(0)
    latents = cache.ChunkStore(root / "latents.json", {"case": list(latent)})
    texts = cache.ChunkStore(root / "text.json", {"case": "text"})
    mask = torch.zeros(64, TEXT_TOKENS, dtype=torch.bool)
    mask[:, :12] = True
    for start in range(0, clips, 64):
        batch = ids[start : start + 64]
        latents.add(batch, batch, {"latents": torch.randn(len(batch), *latent, generator=g).bfloat16()})
        texts.add(batch, batch, cache.text_tensors(torch.randn(len(batch), TEXT_TOKENS, TEXT_WIDTH, generator=g),
                                                   mask[: len(batch)]))
    latents.finish(ids, ids)
    texts.finish(ids, ids)
    where_latent, where_text = cache.locate(root / "latents.json"), cache.locate(root / "text.json")
    table.write(pd.DataFrame({
        "id": ids, "latent_path": [where_latent[i][0] for i in ids], "latent_index": [where_latent[i][1] for i in ids],
        "text_emb_path": [where_text[i][0] for i in ids], "text_emb_index": [where_text[i][1] for i in ids],
    }), root / "index.parquet")
    return root / "index.parquet"


def params(latent: tuple, batch: int, steps: int, workers: int) -> dict:
    """The train step's settings: the demo config's, with this case's stage and data workers."""
    from soraflow.workflow.settings import with_defaults

    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["data"]["manifest"] = str(REPO / config["data"]["manifest"])
    config["stages"] = {"stage1": {"num_frames": latent[1], "frame_interval": 1, "resolution": 16, "steps": steps,
                                   "batch_size": batch, "lr": 1e-4, "filters": {}}}
    config["train"].update(mixed_precision="fp32", checkpoint_every=10**9, log_every=steps, nproc_per_node=1,
                           data_workers=workers)
    config = with_defaults(config)
    return {"stage": config["stages"]["stage1"], **{k: config[k] for k in ("train", "stdit", "diffusion")}}


def main() -> None:
    from soraflow.training.loop import Trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--clips", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); load average {open('/proc/loadavg').read().split()[:3]}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, latent, batch in CASES:
            root = Path(tmp) / name.split(" (")[0].replace(" ", "_")
            index = write_cache(root, latent, args.clips)
            for workers in (0, 2):
                settings = params(latent, batch, args.steps, workers)
                trainer = Trainer(index, root / f"out{workers}.safetensors", root / f"run{workers}", settings, settings)
                trainer.run()
                seconds = pd.read_csv(root / f"run{workers}" / "loss.csv")["seconds"].iloc[-1]
                rows.append((name, batch, workers, f"{args.steps / seconds:.2f}", f"{trainer.data_wait / args.steps * 1e3:.1f}",
                             f"{trainer.data_wait / seconds:.1%}"))
    print_table(("case", "batch", "data_workers", "steps/s", "wait per step ms", "share of time waiting"), rows)
    print("\ngoal: under 5% with workers")


if __name__ == "__main__":
    main()
