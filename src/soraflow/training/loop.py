"""STDiT training on the latent cache, one process per device under torchrun.

Every random draw of step k (batch rows, timesteps, noise, caption dropout) comes from
a generator seeded by (seed, k) and is drawn for the global batch, each rank taking its
slice. So the step number is the whole data position: a resumed run, or a run on a
different number of processes with the same global batch, sees exactly the same
samples. Checkpoints are in soraflow.training.checkpoint's format; the model is spread
over the processes by an engine (soraflow.training.engines); a checkpoint resumes only
under its own run identity (soraflow.training.identity). Loss goes to
`<run_dir>/loss.csv` and to TensorBoard (`<run_dir>/tensorboard`).
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
from torch.optim.swa_utils import get_ema_multi_avg_fn

from soraflow.core.atomic import atomic_path
from soraflow.core.progress import progress
from soraflow.models.diffusion import IDDPM
from soraflow.models.stdit import build_model
from soraflow.training.checkpoint import (
    initialise,
    load_checkpoint_file,
    optimizer_from_tensors,
    optimizer_tensors,
    save_checkpoint_file,
    saved,
    weights_digest,
)
from soraflow.training.dataset import LatentDataset
from soraflow.training.engines import ENGINES
from soraflow.training.identity import digest, identity_parts, what_changed


class Preempted(Exception):
    """Raised after a checkpoint when Slurm (or a user) asks the job to stop."""


def checkpoints(run_dir: Path) -> list[Path]:
    """A run's step folders, oldest first (not the temp folder of a save still being written)."""
    return sorted(p for p in run_dir.glob("step-*") if p.name.removeprefix("step-").isdigit())


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = [p for p in checkpoints(run_dir) if (p / "state.json").exists()]
    return done[-1] if done else None


class Trainer:
    def __init__(self, index_path, out_path, run_dir, params: dict, output_settings: dict, init_path=None,
                 loss_out=None):
        self.stage, self.opts = params["stage"], params["train"]
        self.out_path, self.run_dir = Path(out_path), Path(run_dir)
        self.loss_out = loss_out and Path(loss_out)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if self.stage["batch_size"] % self.world:
            raise ValueError(f"batch_size {self.stage['batch_size']} (samples per step) does not split over {self.world} processes")
        engine_name = self.opts["engine"] if self.world > 1 else "single"
        if engine_name not in ENGINES:
            raise ValueError(f"train.engine: unknown engine {engine_name!r} (choose from {sorted(ENGINES)})")
        self.engine = ENGINES[engine_name](self.rank, self.world, self.device)
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
        self.wrapped = self.engine.wrap(self.model)  # FSDP shards self.model in place
        self.ema = {k: v.detach().clone().float() for k, v in self.model.state_dict().items()}
        self.ema_update = get_ema_multi_avg_fn(self.opts["ema_decay"])  # foreach lerp over all tensors
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.stage["lr"], weight_decay=self.opts["weight_decay"]
        )
        self.diffusion = IDDPM(num_timesteps=params["diffusion"]["num_timesteps"])
        self.identity_parts = identity_parts(output_settings, index_path, init_path)
        self.identity = digest(self.identity_parts)
        self.step = 0
        self.stop_requested = False
        self.writer = None

    # --- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        # gathering full states is a collective: every rank takes part, rank 0 writes
        model_state = self.engine.model_state(self.model)
        optim_state = self.engine.optimizer_state(self.model, self.optimizer)
        ema_state = self._ema_to_save()
        if self.rank == 0:
            with atomic_path(self.run_dir / f"step-{self.step:07d}") as tmp:
                tmp.mkdir(parents=True)
                optim, param_groups = optimizer_tensors(optim_state)
                save_checkpoint_file(
                    tmp / "weights.safetensors",
                    {"model": model_state, "ema": ema_state, "optim": optim},
                    {"param_groups": param_groups, "engine": self.engine.name, "world_size": self.world},
                )
                state = {"step": self.step, "run": self.identity, "identity": self.identity_parts}
                (tmp / "state.json").write_text(json.dumps(state))
            for old in checkpoints(self.run_dir)[: -self.opts["keep_checkpoints"]]:
                shutil.rmtree(old)
        if self.world > 1:
            dist.barrier()

    def _ema_to_save(self) -> dict[str, torch.Tensor]:
        return {k: self.engine.full_tensor(v) for k, v in self.ema.items() if saved(k)}

    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        position = json.loads((checkpoint / "state.json").read_text()) if checkpoint else None
        if self.world > 1:  # every rank has looked before rank 0 may move the folder's contents
            dist.barrier()
        if position is None:
            return
        if position.get("run") != self.identity:
            if self.rank == 0:
                self.supersede(position)
            if self.world > 1:
                dist.barrier()
            return
        weights = checkpoint / "weights.safetensors"
        model_state, metadata = load_checkpoint_file(weights, "model")
        self.engine.load_model_state(self.model, {k: v.to(self.device) for k, v in model_state.items()})
        ema_state, _ = load_checkpoint_file(weights, "ema")
        for k, v in ema_state.items():
            self.ema[k] = self.engine.like(v, self.ema[k])
        optim, _ = load_checkpoint_file(weights, "optim")
        state = optimizer_from_tensors(optim, metadata["param_groups"])
        self.engine.load_optimizer_state(self.model, self.optimizer, state)
        self.step = position["step"]

    def supersede(self, position: dict) -> None:
        """Move another run's checkpoints and logs aside (never delete them), saying what changed."""
        aside = self.run_dir / "superseded" / str(position.get("run"))
        changes = what_changed(position.get("identity", {}), self.identity_parts)
        print(f"{self.run_dir}: its checkpoints (step {position['step']}) belong to another run; moved to {aside} "
              f"and starting afresh. Changed: {'; '.join(changes) or 'unknown (older checkpoint)'}", flush=True)
        aside.mkdir(parents=True, exist_ok=True)
        for old in [*checkpoints(self.run_dir), self.run_dir / "loss.csv", self.run_dir / "tensorboard"]:
            if old.exists():
                old.replace(aside / old.name)

    def write_final(self) -> None:
        model_state, ema_state = self.engine.model_state(self.model), self._ema_to_save()
        if self.rank != 0:
            return
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint_file(
            self.out_path,
            {"model": model_state, "ema": ema_state},
            {"model_config": self.model_config, "input_size": list(self.input_size), "steps": self.step},
        )
        if self.loss_out is not None:
            with atomic_path(self.loss_out) as tmp:
                shutil.copyfile(self.run_dir / "loss.csv", tmp)

    def check_replicas(self) -> list[str]:
        """Every rank's digest of the full weights; raises if they differ (a DDP replica drifted)."""
        full = {k: self.engine.full_tensor(v) for k, v in self.model.state_dict().items()}
        digest = weights_digest(full)
        digests = [digest]
        if self.world > 1:
            digests = [None] * self.world
            dist.all_gather_object(digests, digest)
        if self.rank == 0:
            print(f"weights digest per rank: {' '.join(digests)}", flush=True)
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks hold different weights after training: {digests}")
        return digests

    # --- one step ----------------------------------------------------------------------
    def draw(self, step: int) -> dict[str, torch.Tensor]:
        """All randomness of one step for the global batch, then this rank's slice."""
        g = torch.Generator().manual_seed(self.opts["seed"] * 1_000_003 + step)
        global_batch, per_rank = self.stage["batch_size"], self.stage["batch_size"] // self.world
        rows = torch.randint(len(self.data), (global_batch,), generator=g)
        t = torch.randint(self.diffusion.num_timesteps, (global_batch,), generator=g)
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        latents, y, mask = self.data.batch(rows[mine].tolist())  # read only this rank's rows
        noise = torch.randn((global_batch, *latents.shape[1:]), generator=g)
        drop = torch.rand(global_batch, generator=g) < self.model.y_embedder.uncond_prob
        batch = {"x": latents, "y": y, "mask": mask, "t": t[mine], "noise": noise[mine], "drop": drop[mine]}
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_step(self) -> float:
        b = self.draw(self.step)
        with self.autocast:
            losses = self.diffusion.training_losses(
                self.wrapped, b["x"], b["t"], model_kwargs={"y": b["y"], "mask": b["mask"], "force_drop_ids": b["drop"]},
                noise=b["noise"],
            )
        loss = losses["loss"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.engine.clip_grad_norm(self.model, self.opts["grad_clip"])
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        if self.world > 1:
            # one all-reduce: the global batch's mean loss, and whether any rank was told to stop,
            # so that all ranks checkpoint and stop after the same step
            packed = torch.tensor([loss.item(), float(self.stop_requested)], dtype=torch.float64, device=self.device)
            dist.all_reduce(packed)
            self.stop_requested = bool(packed[1].item() > 0)
            return packed[0].item() / self.world
        return loss.item()

    def update_ema(self) -> None:
        # one foreach call per tensor kind: under FSDP parameters are DTensors, buffers are not
        by_kind: dict[type, list[str]] = {}
        state = self.model.state_dict()
        for name, value in state.items():
            if value.dtype.is_floating_point:
                by_kind.setdefault(type(value), []).append(name)
        for names in by_kind.values():
            self.ema_update([self.ema[name] for name in names], [state[name] for name in names], None)

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
            drop_log_rows_after(log_path, self.step)
            self.writer = tensorboard_writer(self.run_dir / "tensorboard", self.step)
            print(f"training {len(self.data)} clips, input {self.input_size}, from step {self.step}, "
                  f"{sum(p.numel() for p in self.model.parameters()):,} parameters, engine {self.engine.name} "
                  f"x{self.world}, init {self.init_report}", flush=True)
        bar = progress(total=total, initial=self.step, disable=self.rank != 0, desc="train")
        started, start_step = time.time(), self.step
        try:
            while self.step < total:
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.step}; lower the learning rate ({self.stage['lr']})")
                bar.update(1)
                if self.rank == 0 and (self.step % self.opts["log_every"] == 0 or self.step == total):
                    seconds = time.time() - started
                    self.log(log_path, loss, seconds)
                    self.writer.add_scalar("train/loss", loss, self.step)
                    self.writer.add_scalar("train/steps_per_s", (self.step - start_step) / max(seconds, 1e-9), self.step)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % self.opts["checkpoint_every"] == 0 or self.stop_requested:
                    self.save()
                if self.stop_requested and self.step < total:
                    raise Preempted(f"stopped at step {self.step} of {total}; the checkpoint resumes it")
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
        if self.world > 1:
            self.check_replicas()
        self.write_final()

    def log(self, path: Path, loss: float, seconds: float) -> None:
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "loss", "seconds"])
            writer.writerow([self.step, f"{loss:.6f}", f"{seconds:.2f}"])


def drop_log_rows_after(path: Path, step: int) -> None:
    """After a resume from `step`, the steps logged past it are trained again: forget them."""
    if not path.exists():
        return
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
    if len(kept) != len(rows):
        with path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)


def tensorboard_writer(log_dir: Path, step: int):
    """A SummaryWriter that drops events past `step` left by an interrupted run (purge_step)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=step if step > 0 else None)


def train(index_path, out_path, run_dir, params: dict, output_settings: dict, init_path=None, loss_out=None) -> None:
    """params: the step's full settings; output_settings: those that change its result (the
    run's identity). loss_out: where the finished run's loss log is copied."""
    trainer = Trainer(index_path, out_path, run_dir, params, output_settings, init_path, loss_out)
    try:
        trainer.run()
        if dist.is_initialized():
            # rank 0 may still be writing the final checkpoint: no rank tears its gloo
            # connections down while a peer still holds them (one CI run aborted there)
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

