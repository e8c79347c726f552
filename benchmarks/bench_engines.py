"""Step time and peak memory per rank of the training engines on two CPU ranks (issue 16).

    .venv/bin/python benchmarks/bench_engines.py [--preset STDiT-B/2] [--steps 8] [--batch 4]
                                                 [--tokens 8] [--frames 2] [--engines ddp fsdp colossalai]
                                                 [--mixed-precision fp32]

Each engine trains the same model on the same synthetic latent cache with the real
`soraflow train --nproc 2` (torchrun, gloo, fp32 unless --mixed-precision bf16, one torch thread
per rank):

    ddp         DistributedDataParallel (this environment, torch 2.13)
    fsdp        FSDP2 fully_shard per STDiT block (this environment)
    colossalai  ZeRO-2 through ColossalAI's LowLevelZeroPlugin (.venv-colossalai, torch 2.5.1,
                with the CPU stand-ins of tests/colossalai_cpu; overlap_communication off)

Step time: the median of the per-step intervals of the run's loss log (log_every 1) after two
warm-up steps. Peak memory: each rank's peak RSS (VmHWM of its process, polled), which holds
the environment's libraries too, so each engine also runs STDiT-tiny for the same steps: its
peak is the footprint without model states, and "states" is the difference. The final
checkpoint gathers the full weights and EMA on rank 0, so rank 1 shows the training states
alone. "expected" is the analytic size of weights, gradients, AdamW moments and EMA per rank
(fp32; P parameters): ddp 4P + 4P + 8P + 4P = 20P; FSDP shards all four (10P at 2 ranks, plus
one block gathered at a time); ZeRO-2 keeps the full working weights and shards the fp32
master weights, gradients, moments and EMA (4P + 20P/2 = 14P at 2 ranks; its gradient buckets
come on top).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from tables import print_table

from soraflow.data import cache, table
from soraflow.models.stdit import build_model
from soraflow.workflow import settings

REPO = Path(__file__).resolve().parents[1]
COLOSSALAI_PYTHON = REPO / ".venv-colossalai" / "bin" / "python"
ENGINES = ("ddp", "fsdp", "colossalai")
CLIPS, CAPTION_DIM = 16, 384
BASE = "STDiT-tiny"  # a model with next to no states: the environment's own footprint
EXPECTED_BYTES_PER_PARAM = {"ddp": 20, "fsdp": 10, "colossalai": 14}  # at 2 ranks, see the docstring


def latent_index(root: Path, frames: int, tokens: int, caption_len: int) -> Path:
    """A cache of CLIPS random clips (latents [4, frames, 2*tokens, 2*tokens], captions of
    caption_len tokens) and its index."""
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    ids = [f"clip{i}" for i in range(CLIPS)]
    side = 2 * tokens  # patch 2: `tokens` x `tokens` tokens per frame
    cache.write_cache({"latents": torch.randn(CLIPS, 4, frames, side, side, generator=g)}, ids, {},
                      root / "latents.safetensors")
    mask = torch.ones(CLIPS, caption_len, dtype=torch.long)
    cache.write_cache(cache.text_tensors(torch.randn(CLIPS, caption_len, CAPTION_DIM, generator=g), mask), ids, {},
                      root / "text.safetensors")
    table.write(pd.DataFrame({
        "id": ids, "latent_path": str(root / "latents.safetensors"), "latent_index": range(CLIPS),
        "text_emb_path": str(root / "text.safetensors"), "text_emb_index": range(CLIPS),
    }), root / "index.parquet")
    return root / "index.parquet"


def settings_for(engine: str, preset: str, steps: int, batch: int, precision: str) -> tuple[dict, dict]:
    """(params, operational) of the default config's stage1 training step, as the train rule passes them."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["stdit"] = {"preset": preset}
    config["stages"]["stage1"].update(steps=steps, batch_size=batch, init=None)
    config["train"].update(engine=engine, nproc_per_node=2, mixed_precision=precision, log_every=1,
                           checkpoint_every=10 * steps, data_workers=0, grad_checkpointing=False,
                           colossalai={"zero_stage": 2, "overlap_communication": False})
    config = settings.with_defaults(config)
    return settings.params(config, "train", "stage1"), settings.operational(config, "train", "stage1")


def descendants(pid: int) -> list[int]:
    """Raises FileNotFoundError when a process or thread exits while it is read."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def rank_of(pid: int) -> int | None:
    environ = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
    return int(environ["RANK"]) if "RANK" in environ else None


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def train(engine: str, index: Path, root: Path, preset: str, steps: int, batch: int,
          precision: str) -> tuple[float, dict[int, float]]:
    """One 2-rank run: (median step seconds, {rank: peak RSS MB})."""
    params, operational = settings_for(engine, preset, steps, batch, precision)
    python = COLOSSALAI_PYTHON if engine == "colossalai" else Path(sys.executable)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if engine == "colossalai":
        env["PYTHONPATH"] = str(REPO / "tests" / "colossalai_cpu")
    cmd = [str(python), "-m", "soraflow.cli", "train", str(index), "--out", str(root / "out.safetensors"),
           "--run-dir", str(root / "run"), "--nproc", "2", "--params", json.dumps(params),
           "--operational", json.dumps(operational)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    peaks: dict[int, float] = {}
    while process.poll() is None:  # VmHWM only grows: the last reading of each rank is its peak
        try:
            for pid in descendants(process.pid):
                rank = rank_of(pid)
                if rank is not None:
                    peaks[rank] = max(peaks.get(rank, 0.0), peak_rss_mb(pid))
        except (FileNotFoundError, ProcessLookupError):
            pass  # a process exited while it was read: the next poll sees the rest
        time.sleep(0.05)
    output = process.stdout.read()
    if process.returncode:
        raise RuntimeError(f"{engine} run failed:\n{output[-4000:]}")
    seconds = pd.read_csv(root / "run" / "loss.csv")["seconds"].diff().dropna().tolist()[2:]
    return statistics.median(seconds), peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="STDiT-B/2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4, help="global batch (2 per rank)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens per side of a frame (S = tokens^2)")
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--mixed-precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    if "colossalai" in args.engines and not COLOSSALAI_PYTHON.exists():
        raise SystemExit("no colossalai environment: make .venv-colossalai/.installed")

    models = {preset: build_model({"preset": preset, "caption_channels": CAPTION_DIM},
                                  (args.frames, 2 * args.tokens, 2 * args.tokens)) for preset in (args.preset, BASE)}
    params = sum(p.numel() for p in models[args.preset].parameters())
    print(f"{args.preset}: {params / 1e6:.1f}M parameters; latents 4x{args.frames}x{2 * args.tokens}x"
          f"{2 * args.tokens} ({args.frames * args.tokens**2} tokens), global batch {args.batch}, "
          f"{args.steps} steps, 2 ranks, {args.mixed_precision}; load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        index = {preset: latent_index(Path(tmp, f"cache{i}"), args.frames, args.tokens, model.model_max_length)
                 for i, (preset, model) in enumerate(models.items())}
        for engine in args.engines:
            step_s, peaks = train(engine, index[args.preset], Path(tmp, engine), args.preset, args.steps, args.batch,
                                  args.mixed_precision)
            _, base = train(engine, index[BASE], Path(tmp, f"{engine}-base"), BASE, args.steps, args.batch,
                            args.mixed_precision)
            # ZeRO's working copy is bf16 under the bf16 plugin: 2P fewer bytes
            bf16_working = 2 if engine == "colossalai" and args.mixed_precision == "bf16" else 0
            expected_mb = (EXPECTED_BYTES_PER_PARAM[engine] - bf16_working) * params / 2**20
            for rank in sorted(peaks):
                rows.append((engine, rank, f"{step_s:.3f}", f"{peaks[rank]:.0f}", f"{base[rank]:.0f}",
                             f"{peaks[rank] - base[rank]:.0f}", f"{expected_mb:.0f}"))
    print_table(("engine", "rank", "step s (median)", "peak RSS MB", "base MB (STDiT-tiny)", "states MB",
                 "expected MB"), rows)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
