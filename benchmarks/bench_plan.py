"""`soraflow plan`'s memory per GPU vs the measured peak of real training steps on the CPU (issue 15).

    .venv/bin/python benchmarks/bench_plan.py [--steps 3] [--threads 1]

Each case trains `--steps` steps of the real Trainer (AdamW, EMA, grad clip; one process, so
the `single` engine, float32) on a synthetic latent cache, in a process of its own. Measured:
peak RSS of that process minus its RSS just before the Trainer is built (torch, the cache
and TensorBoard already loaded), with glibc returning freed blocks of 128 KiB and more to the
system at once (MALLOC_MMAP_THRESHOLD_), so RSS follows the tensors that are alive. Planned:
`soraflow.workflow.plan.stage_plan` for the same config (weights, gradients, AdamW, EMA,
activations). Goal: within 20% for two model sizes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from tables import print_table

REPO = Path(__file__).resolve().parents[1]
# (name, stdit preset, stage frames and size in pixels (pixel_pack, factor 2), batch, checkpointing)
CASES = [
    ("STDiT-demo 8f x 64px b4", "STDiT-demo", 8, 64, 4, False),
    ("STDiT-demo 8f x 64px b4 ckpt", "STDiT-demo", 8, 64, 4, True),
    ("STDiT-S/2 4f x 32px b2", "STDiT-S/2", 4, 32, 2, False),
]


def case_config(preset: str, frames: int, resolution: int, batch: int, checkpointing: bool) -> dict:
    from soraflow.workflow.settings import with_defaults

    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["data"]["manifest"] = str(REPO / config["data"]["manifest"])
    config["stdit"] = {"preset": preset}
    config["stages"] = {"stage1": {"num_frames": frames, "frame_interval": 1, "resolution": resolution, "steps": 10**6,
                                   "batch_size": batch, "lr": 1e-4, "filters": {}}}
    config["train"].update(mixed_precision="fp32", grad_checkpointing=checkpointing, nproc_per_node=1,
                           checkpoint_every=10**6, log_every=10**6, data_workers=0)
    return with_defaults(config)


def measure(config: dict, steps: int) -> dict:
    """Runs in the child process: peak RSS of `steps` training steps above the RSS before them."""
    import resource

    import pandas as pd
    import torch
    import torch.utils.tensorboard  # noqa: F401  (loaded before the baseline, as a run has it)

    from soraflow.data import cache, table
    from soraflow.training.loop import Trainer
    from soraflow.workflow import plan

    d, latent = plan.stage_dims(config, config["stages"]["stage1"])
    width, tokens = d["caption"], d["L"]
    root = Path(tempfile.mkdtemp())
    ids = [f"clip{i}" for i in range(8)]
    g = torch.Generator().manual_seed(0)
    cache.write_cache({"latents": torch.randn(len(ids), *latent, generator=g)}, ids, {}, root / "latents.safetensors")
    mask = torch.ones(len(ids), tokens, dtype=torch.bool)
    cache.write_cache(cache.text_tensors(torch.randn(len(ids), tokens, width, generator=g), mask), ids, {},
                      root / "text.safetensors")
    table.write(pd.DataFrame({"id": ids, "latent_path": str(root / "latents.safetensors"), "latent_index": range(8),
                              "text_emb_path": str(root / "text.safetensors"), "text_emb_index": range(8)}),
                root / "index.parquet")
    del g
    params = {"stage": config["stages"]["stage1"], **{k: config[k] for k in ("train", "stdit", "diffusion")}}
    baseline = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    trainer = Trainer(root / "index.parquet", root / "out.safetensors", root / "run", params, params)
    batches = trainer.batches(steps)
    for _ in range(steps):
        trainer.train_step(next(batches))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline": baseline, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(json.loads(args.child), args.steps)))
        return

    from soraflow.workflow import plan

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for name, preset, frames, resolution, batch, checkpointing in CASES:
        config = case_config(preset, frames, resolution, batch, checkpointing)
        planned = plan.stage_plan(copy.deepcopy(config), "stage1")
        result = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                                 "--child", json.dumps(config)], capture_output=True, text=True, env=env, check=True)
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        used = measured["peak"] - measured["baseline"]
        mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
        rows.append((name, f"{planned.parameters / 1e6:.1f}M", f"{planned.tokens:,}",
                     mib(planned.total - planned.memory["activations"]), mib(planned.memory["activations"]),
                     mib(planned.total), mib(used), f"{planned.total / used:.2f}"))
        print(f"{name}: planned {mib(planned.total)} MiB, measured {mib(used)} MiB", file=sys.stderr, flush=True)
    print_table(("case", "params", "tokens/sample", "planned states MiB", "planned activations MiB",
                 "planned MiB", "measured MiB", "planned / measured"), rows)
    print("\ngoal: planned within 20% of measured (0.80 - 1.20)")


if __name__ == "__main__":
    main()
