"""STDiT training on the latent cache, one process per device under torchrun.

Every random draw of step k (batch rows, timesteps, noise, caption dropout) comes from
a generator seeded by (seed, k) and is drawn for the global batch, each rank taking its
slice. So the step number is the whole data position: a resumed run, or a run on a
different number of processes with the same global batch, sees exactly the same
samples. Checkpoints are safetensors (weights, EMA, optimizer) plus a JSON state file;
nothing is unpickled.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from soraflow.dataset import LatentDataset
from soraflow.diffusion import IDDPM
from soraflow.stdit import build_model, load_pixart_checkpoint

# position embeddings are recomputed for each input size, so they never travel in checkpoints
NOT_SAVED = ("pos_embed",)


class Preempted(Exception):
    """Raised after a checkpoint when Slurm (or a user) asks the job to stop."""


def weights_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if not any(n in k for n in NOT_SAVED)}


def save_checkpoint_file(path: Path, groups: dict[str, dict[str, torch.Tensor]], metadata: dict) -> None:
    """One safetensors file holding several named state dicts as `<group>.<key>` tensors."""
    tensors = {f"{group}.{k}": v.contiguous() for group, state in groups.items() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    tmp.replace(path)


def load_checkpoint_file(path, group: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A named state dict and the metadata from a file written by save_checkpoint_file."""
    with safe_open(str(path), "pt") as f:
        metadata = {k: json.loads(v) for k, v in f.metadata().items()}
        prefix = group + "."
        state = {k[len(prefix) :]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no '{group}' weights in this checkpoint")
    return state, metadata


def initialise(model: torch.nn.Module, init_path: str | None) -> dict:
    """Start from a previous stage's checkpoint (its raw weights) or a PixArt-α .pth."""
    if not init_path:
        return {}
    if str(init_path).endswith((".pth", ".pt")):
        missing, unexpected = load_pixart_checkpoint(model, init_path)
        return {"missing": missing, "unexpected": unexpected}
    state, _ = load_checkpoint_file(init_path, "model")
    initialise_from_state(model, state, init_path)
    return {}


def initialise_from_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source) -> None:
    """Load our own weights: everything but the recomputed position embeddings must fit."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(n in k for n in NOT_SAVED)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: does not fit this model (missing {missing}, unexpected {result.unexpected_keys})")


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {f"{i}.{name}": value for i, s in state["state"].items() for name, value in s.items()}
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in run_dir.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


class Trainer:
    def __init__(self, index_path, out_path, run_dir, params: dict, init_path=None):
        self.stage, self.opts = params["stage"], params["train"]
        self.out_path, self.run_dir = Path(out_path), Path(run_dir)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
        use_bf16 = self.opts["mixed_precision"] == "bf16" or (self.opts["mixed_precision"] == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

        self.data = LatentDataset(index_path)
        latents, y, _ = self.data[0]
        channels, frames, height, width = latents.shape
        self.model_config = {
            **params["stdit"],
            "in_channels": channels,
            "caption_channels": y.shape[-1],
            "grad_checkpointing": self.opts["grad_checkpointing"],
        }
        self.input_size = (frames, height, width)
        torch.manual_seed(self.opts["seed"])  # same initial weights on every rank
        self.model = build_model(self.model_config, input_size=self.input_size)
        self.init_report = initialise(self.model, init_path)
        self.model.to(self.device)
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.ddp = DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.stage["lr"], weight_decay=self.opts["weight_decay"]
        )
        self.diffusion = IDDPM(num_timesteps=params["diffusion"]["num_timesteps"])
        self.step = 0
        self.stop_requested = False

    # --- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        if self.rank == 0:
            final = self.run_dir / f"step-{self.step:07d}"
            tmp = self.run_dir / f".tmp-step-{self.step:07d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            optim, groups = optimizer_tensors(self.optimizer)
            save_checkpoint_file(
                tmp / "weights.safetensors",
                {"model": weights_to_save(self.model), "ema": self._ema_to_save(), "optim": optim},
                {"param_groups": groups["param_groups"]},
            )
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "seed": self.opts["seed"]}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.run_dir.glob("step-*"))[:-2]:  # keep the last two
                shutil.rmtree(old)
        if self.world > 1:
            dist.barrier()

    def _ema_to_save(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.ema.items() if not any(n in k for n in NOT_SAVED)}

    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            return
        weights = checkpoint / "weights.safetensors"
        model_state, metadata = load_checkpoint_file(weights, "model")
        initialise_from_state(self.model, model_state, weights)
        ema_state, _ = load_checkpoint_file(weights, "ema")
        self.ema.update({k: v.to(self.device) for k, v in ema_state.items()})
        optim_state, _ = load_checkpoint_file(weights, "optim")
        restore_optimizer(self.optimizer, optim_state, metadata["param_groups"])
        self.step = json.loads((checkpoint / "state.json").read_text())["step"]

    def write_final(self) -> None:
        if self.rank != 0:
            return
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint_file(
            self.out_path,
            {"model": weights_to_save(self.model), "ema": self._ema_to_save()},
            {"model_config": self.model_config, "input_size": list(self.input_size), "steps": self.step},
        )

    # --- one step ----------------------------------------------------------------------
    def draw(self, step: int) -> dict[str, torch.Tensor]:
        """All randomness of one step for the global batch, then this rank's slice."""
        g = torch.Generator().manual_seed(self.opts["seed"] * 1_000_003 + step)
        global_batch = self.stage["batch_size"] * self.world
        rows = torch.randint(len(self.data), (global_batch,), generator=g)
        t = torch.randint(self.diffusion.num_timesteps, (global_batch,), generator=g)
        latents, y, mask = self.data.batch(rows.tolist())
        noise = torch.randn(latents.shape, generator=g)
        drop = torch.rand(global_batch, generator=g) < self.model.y_embedder.uncond_prob
        mine = slice(self.rank * self.stage["batch_size"], (self.rank + 1) * self.stage["batch_size"])
        batch = {"x": latents, "y": y, "mask": mask, "t": t, "noise": noise, "drop": drop}
        return {k: v[mine].to(self.device) for k, v in batch.items()}

    def train_step(self) -> float:
        b = self.draw(self.step)
        with self.autocast:
            losses = self.diffusion.training_losses(
                self.ddp, b["x"], b["t"], model_kwargs={"y": b["y"], "mask": b["mask"], "force_drop_ids": b["drop"]},
                noise=b["noise"],
            )
        loss = losses["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts["grad_clip"])
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        if self.world > 1:  # the mean loss over ranks is the global batch's loss
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= self.world
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        decay = self.opts["ema_decay"]
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                self.ema[name].mul_(decay).add_(value.float(), alpha=1 - decay)

    # --- the loop ----------------------------------------------------------------------
    def request_stop(self, signum, _frame) -> None:
        self.stop_requested = True
        print(f"signal {signum}: checkpointing after this step, then exiting", flush=True)

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.request_stop)
        self.resume()
        total = self.stage["steps"]
        log_path = self.run_dir / "loss.csv"
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            print(f"training {len(self.data)} clips, input {self.input_size}, from step {self.step}, "
                  f"{sum(p.numel() for p in self.model.parameters()):,} parameters, init {self.init_report}", flush=True)
        progress = tqdm(total=total, initial=self.step, disable=self.rank != 0, desc="train", mininterval=5)
        started = time.time()
        while self.step < total:
            loss = self.train_step()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}; lower the learning rate ({self.stage['lr']})")
            progress.update(1)
            if self.rank == 0 and (self.step % self.opts["log_every"] == 0 or self.step == total):
                self.log(log_path, loss, time.time() - started)
                progress.set_postfix(loss=f"{loss:.4f}")
            if self.step % self.opts["checkpoint_every"] == 0 or self.stop_requested:
                self.save()
            if self.stop_requested and self.step < total:
                raise Preempted(f"stopped at step {self.step} of {total}; the checkpoint resumes it")
        progress.close()
        self.write_final()

    def log(self, path: Path, loss: float, seconds: float) -> None:
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "loss", "seconds"])
            writer.writerow([self.step, f"{loss:.6f}", f"{seconds:.2f}"])


def train(index_path, out_path, run_dir, params: dict, init_path=None) -> None:
    trainer = Trainer(index_path, out_path, run_dir, params, init_path)
    try:
        trainer.run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def load_for_sampling(path, use_ema: bool) -> tuple[torch.nn.Module, tuple[int, int, int]]:
    """The model stored in a final checkpoint, ready for inference, and its latent (T, H, W)."""
    weights, metadata = load_checkpoint_file(path, "ema" if use_ema else "model")
    config = {**metadata["model_config"], "grad_checkpointing": False}
    model = build_model(config, input_size=tuple(metadata["input_size"]))
    initialise_from_state(model, weights, path)
    return model.eval(), tuple(metadata["input_size"])
