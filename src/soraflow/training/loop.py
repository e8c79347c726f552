"""Training a stage's model (its family's: soraflow.models.family) on the latent cache, one process per device under torchrun.

Every random draw of step k comes from seeded generators: the global batch's rows from
(seed, k), each sample's timestep, noise and caption dropout from (seed, k, its position
in the global batch), so each rank draws only its own share (soraflow.training.dataset).
So the step number is the whole data position: a resumed run, or a run on a different
number of processes with the same global batch, sees exactly the same samples. Samples
are read and drawn by DataLoader workers ahead of the step (pinned for the GPU), and the
host waits on the device for the loss once per log interval, not once per step. The model is
spread over the processes by an engine (soraflow.training.engines); a checkpoint resumes only
under its own run identity (soraflow.training.identity), which rank 0 works out once and shares.
Loss goes to `<run_dir>/loss.csv` (each row the mean loss and gradient norm over the steps since
the previous row) and to TensorBoard (`<run_dir>/tensorboard`); every `validation.every` steps the
loss on the stage's held-out clips, of the raw and the EMA weights, to `<run_dir>/validation.csv`
(soraflow.training.validation), and every `validation.sample_every` steps a sample grid to
`<run_dir>/samples/step-N.png`; all of it also to MLflow and W&B (soraflow.training.tracking).

Checkpoints: every `checkpoint_every` steps, and when the job must stop, each rank writes its
share of the model, EMA and optimizer state in parallel into `<run_dir>/step-N`
(torch.distributed.checkpoint; any world size and engine resumes it). A run stops after the step
in which a rank was told to (SIGTERM, SIGUSR1), or when the job's time limit (Slurm's end time of
the job) is nearer than the last step, twice the last checkpoint write and the time to exit: the
ranks agree on it after every step (one all-reduce of a flag on the CPU), checkpoint that step
and exit non-zero (Preempted) for the chain's next job to resume it. The stage's result, read by
sampling and export, is one safetensors file (soraflow.models.checkpoint).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from soraflow.core import devices
from soraflow.core.atomic import atomic_path
from soraflow.core.progress import progress
from soraflow.data.cache import LatentDataset
from soraflow.models.checkpoint import save_checkpoint_file, saved, weights_digest
from soraflow.models.family import load_family
from soraflow.training import failure
from soraflow.training.dataset import StepBatches, TrainingSamples
from soraflow.training.engines import load_engine
from soraflow.training.engines.base import compute_dtype, frozen_names
from soraflow.training.identity import digest, identity_parts, what_changed
from soraflow.training.launch import job_end_time
from soraflow.training.tracking import Trackers
from soraflow.training.validation import ValidationSet, append_row, overfitting, read_log, write_empty_log

# a step folder's layout (state.json says it): an earlier soraflow wrote one safetensors file
CHECKPOINT_FORMAT = "torch.distributed.checkpoint"
# how far ahead of the job's end time a run stops: the step under way, then the checkpoint write
# (twice the last one measured: a shared filesystem's speed varies; before the first, its bytes at
# WRITE_BYTES_PER_S), then EXIT_SECONDS for the workers, torchrun and Snakemake's job step to exit
WRITE_SAFETY, WRITE_BYTES_PER_S, EXIT_SECONDS = 2.0, 100e6, 15.0


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
                 loss_out=None, validation_index=None, validation_out=None, sampling: dict | None = None):
        """validation_index: the stage's held-out clips (evaluated with params["validation"]);
        sampling: the sample step's settings (prompts, encoders, diffusion) for the sample grids."""
        self.stage, self.opts = params["stage"], params["train"]
        self.out_path, self.run_dir = Path(out_path), Path(run_dir)
        self.loss_out = loss_out and Path(loss_out)
        self.validation_out = validation_out and Path(validation_out)
        self.checks, self.sampling = params.get("validation"), sampling
        self.tracking, self.params = params.get("tracking", {}), params
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = devices.rank_device(local_rank)
        devices.set_process_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(devices.collective_backend(self.device))
        # stop flags and start-up facts travel on the CPU, so the host never waits for the device for them
        self.cpu_group = dist.new_group(backend="gloo") if self.world > 1 else None
        if self.world > 1:  # where the ranks run, in rank order (a multi-node run names its nodes)
            hosts = [None] * self.world
            dist.all_gather_object(hosts, socket.gethostname(), group=self.cpu_group)
            if self.rank == 0:
                print(f"ranks on hosts: {' '.join(hosts)}", flush=True)
        # sequence parallelism: each group of sp_size consecutive ranks shares its samples, each
        # rank holding a share of every sample's tokens; the groups are the data-parallel ranks
        self.sp_size = self.opts["sp_size"]
        if self.world % self.sp_size:
            raise ValueError(f"train.sp_size {self.sp_size} does not divide the {self.world} training processes")
        self.dp_rank, self.dp_size = self.rank // self.sp_size, self.world // self.sp_size
        if self.stage["batch_size"] % self.dp_size:
            raise ValueError(f"batch_size {self.stage['batch_size']} (samples per step) does not split over "
                             f"{self.dp_size} data-parallel ranks ({self.world} processes / train.sp_size)")
        engine_name = self.opts["engine"] if self.world > 1 else "single"
        self.engine = load_engine(engine_name)(self.rank, self.world, self.device, self.opts)
        use_bf16 = compute_dtype(self.opts["mixed_precision"], self.device) == torch.bfloat16
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

        self.data = LatentDataset(index_path)
        self.bucket_rows = self.data.bucket_rows()
        # the model's size (and the one it samples at): its first bucket's (one with clips)
        latents, y, _ = self.data[self.bucket_rows[0][0]]
        channels, frames, height, width = latents.shape
        # the model family (model.family: stdit, wan) decides the model, its initial weights and objective
        self.family = load_family(params.get("model", {}).get("family"))
        own_checkpointing = self.stage.get("grad_checkpointing")  # null: train.grad_checkpointing
        self.model_config = self.family.model_config(
            params, self.stage, channels, y.shape[-1],
            own_checkpointing if own_checkpointing is not None else self.opts["grad_checkpointing"])
        self.input_size = (frames, height, width)
        # a LoRA's frozen base (a hub id's downloaded here by every rank, as its build would, not
        # by rank 0 while the others wait on a collective)
        frozen_files = self.family.frozen_files(self.model_config, init_path)
        # worked out by rank 0 alone and shared: the run's identity (digests of its inputs), the
        # checkpoint it resumes from (another run's moved aside) and when the job must end
        self.identity_parts, self.checkpoint, self.position, self.deadline = self.from_rank_0(
            lambda: self.find_start(output_settings, index_path, init_path, frozen_files))
        self.identity = digest(self.identity_parts)
        torch.manual_seed(self.opts["seed"])  # same initial weights on every rank
        # a resumed run reads its checkpoint instead: the initial weights are not read (but for a
        # LoRA's frozen base, which checkpoints leave out)
        self.model, self.init_report = self.family.build(self.model_config, self.input_size, init_path,
                                                         initial=self.checkpoint is None)
        if self.checkpoint:
            self.init_report = f"resuming {self.checkpoint.name}"
        self.model.to(self.device)
        if self.sp_size > 1:
            self.model.enable_sequence_parallel(sequence_parallel_group(self.rank, self.world, self.sp_size))
        self.wrapped, self.optimizer = self.engine.wrap(  # FSDP shards self.model in place
            self.model, lambda params: torch.optim.AdamW([p for p in params if p.requires_grad], lr=self.stage["lr"],
                                                         weight_decay=self.opts["weight_decay"])
        )
        # the EMA follows what trains (a LoRA: its own weights, not the frozen base) and the buffers
        frozen = frozen_names(self.model)
        self.ema = {k: v.detach().clone().float() for k, v in self.engine.weights(self.model).items() if k not in frozen}
        self.ema_update = get_ema_multi_avg_fn(self.opts["ema_decay"])  # foreach lerp over all tensors
        self.diffusion = self.family.objective(params, self.model_config)
        self.samples = TrainingSamples(self.data, self.opts["seed"], self.diffusion.draw_timestep,
                                       self.family.uncond_prob(self.model, self.diffusion))
        self.validation_index = validation_index
        self.held_out = LatentDataset(validation_index) if self.checks and validation_index else None
        self.validation = self.held_out and len(self.held_out) and ValidationSet(
            self.held_out, self.checks, self.opts["seed"], self.diffusion, self.stage["batch_size"] // self.dp_size,
            self.dp_rank, self.dp_size)
        self.tracker = None
        self.step = 0
        self.data_wait = 0.0  # seconds the loop waited for a batch (train/data_wait_share)
        self.stop_requested = False
        self.last_check = time.monotonic()  # of the stop flag: the time between two is a step's
        # seconds a checkpoint takes to write: measured by each save (and kept in the checkpoint for
        # the next job); until then estimated from the states' bytes: the weights that train (no
        # LoRA's frozen base) with the buffers, the EMA of both and AdamW's two moments
        trained = [p for p in self.model.parameters() if p.requires_grad]
        weights = [v for k, v in self.engine.weights(self.model).items() if k not in frozen]
        states_bytes = sum(t.numel() * t.element_size() for t in [*weights, *self.ema.values(), *trained, *trained])
        self.write_seconds = self.position["write_seconds"] if self.position else states_bytes / WRITE_BYTES_PER_S
        self.pending_save = None  # (Future or None, step, its folders, start) of the checkpoint being written
        self.writer = None

    # --- start-up ----------------------------------------------------------------------
    def from_rank_0(self, work):
        """work() on rank 0, its result sent to every rank (a collective)."""
        result = [work() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(result, src=0, group=self.cpu_group)
        return result[0]

    def find_start(self, output_settings: dict, index_path, init_path, frozen_files) -> tuple:
        """(identity parts, the checkpoint to resume or None, its state.json, the job's end time)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        parts = identity_parts(output_settings, index_path, init_path, self.run_dir / "digests.json", frozen_files)
        checkpoint = latest_checkpoint(self.run_dir)
        position = json.loads((checkpoint / "state.json").read_text()) if checkpoint else None
        if position and (position.get("run") != digest(parts) or position.get("format") != CHECKPOINT_FORMAT):
            self.supersede(position, parts)
            checkpoint = position = None
        return parts, checkpoint, position, job_end_time(os.environ)

    # --- checkpoints -------------------------------------------------------------------
    def save(self, background: bool = False) -> None:
        """This step's resumable checkpoint: every rank writes its share (a collective; with
        `background`, an engine that can writes it while training goes on), then rank 0 names the
        folder (step-N, complete once its state.json is in) and prunes the oldest."""
        self.finish_save(wait=True)
        started = time.perf_counter()
        folder = self.run_dir / f"step-{self.step:07d}"
        partial = folder.with_name(folder.name + ".tmp")
        if self.rank == 0 and partial.exists():
            shutil.rmtree(partial)  # left by a save that was killed
        self.barrier()
        written = self.engine.save_checkpoint(partial, self.model, self.optimizer, self.ema, background)
        self.pending_save = (written, self.step, partial, folder, started)
        if written is None:
            self.finish_save(wait=True)
            self.barrier()

    def finish_save(self, wait: bool) -> None:
        """Name the checkpoint being written once it is (rank 0; its Future completes once every
        rank's share is in); without `wait`, only if it already is."""
        if self.pending_save is None:
            return
        written, step, partial, folder, started = self.pending_save
        if written is not None and not (wait or written.done()):
            return
        if written is not None:
            written.result()
        self.pending_save = None
        self.write_seconds = time.perf_counter() - started
        if self.rank == 0:
            state = {"step": step, "run": self.identity, "identity": self.identity_parts,
                     "format": CHECKPOINT_FORMAT, "engine": self.engine.name, "world_size": self.world,
                     "write_seconds": self.write_seconds}
            (partial / "state.json").write_text(json.dumps(state))
            if folder.exists():
                shutil.rmtree(folder)
            partial.replace(folder)
            for old in checkpoints(self.run_dir)[: -self.opts["keep_checkpoints"]]:
                shutil.rmtree(old)

    def _ema_to_save(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.engine.gather(self.ema).items() if saved(k)}

    def resume(self) -> None:
        """Continue from the checkpoint found at start-up, if any: each rank reads its share into
        its model, EMA and optimizer (at any world size, from any engine)."""
        if self.checkpoint is None:
            return
        self.engine.load_checkpoint(self.checkpoint, self.model, self.optimizer, self.ema)
        self.step = self.position["step"]

    def supersede(self, position: dict, parts: dict) -> None:
        """Move another run's checkpoints and logs aside (never delete them), saying what changed."""
        aside = self.run_dir / "superseded" / str(position.get("run"))
        changes = what_changed(position.get("identity", {}), parts)
        if position.get("format") != CHECKPOINT_FORMAT:
            changes.append("the checkpoint format (an earlier soraflow's)")
        print(f"{self.run_dir}: its checkpoints (step {position['step']}) belong to another run; moved to {aside} "
              f"and starting afresh. Changed: {'; '.join(changes) or 'unknown (older checkpoint)'}", flush=True)
        aside.mkdir(parents=True, exist_ok=True)
        for old in [*checkpoints(self.run_dir), self.run_dir / "loss.csv", self.run_dir / "tensorboard",
                    self.run_dir / "validation.csv", self.run_dir / "samples"]:
            if old.exists():
                old.replace(aside / old.name)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.cpu_group)

    def write_final(self) -> None:
        model_state, ema_state = self.engine.model_state(self.model), self._ema_to_save()
        if self.rank != 0:
            return
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint_file(
            self.out_path,
            {"model": model_state, "ema": ema_state},
            {"model_config": self.model_config, "input_size": list(self.input_size), "steps": self.step,
             "family": self.family.name},
        )
        if self.loss_out is not None:
            with atomic_path(self.loss_out) as tmp:
                shutil.copyfile(self.run_dir / "loss.csv", tmp)
        if self.validation_out is not None:
            with atomic_path(self.validation_out) as tmp:
                if (self.run_dir / "validation.csv").exists():
                    shutil.copyfile(self.run_dir / "validation.csv", tmp)
                else:
                    write_empty_log(tmp)

    def check_replicas(self) -> list[str]:
        """Every rank's digest of the full weights; raises if they differ (a DDP replica drifted)."""
        full = self.engine.gather(self.engine.weights(self.model))
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
    def batches(self, stop: int):
        """This rank's batches of steps [self.step, stop), read and drawn by DataLoader workers."""
        steps = StepBatches(self.bucket_rows, self.opts["seed"], self.stage["batch_size"], self.dp_rank, self.dp_size,
                            self.step, stop)
        workers = self.opts["data_workers"]
        return iter(DataLoader(self.samples, batch_sampler=steps, num_workers=workers, worker_init_fn=leave_stops_to_trainer,
                               pin_memory=self.device.type == "cuda", prefetch_factor=2 if workers else None))

    def train_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step on this rank's batch; returns [its mean loss, the gradient norm],
        left on the device."""
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast:
            losses = self.diffusion.training_losses(
                self.wrapped, b["x"], b["t"], model_kwargs={"y": b["y"], "mask": b["mask"], "force_drop_ids": b["drop"]},
                noise=b["noise"],
            )
        loss = losses["loss"].mean()
        # the ranks of a sequence-parallel group compute the same loss, each with the gradients
        # of its own tokens; the engines average gradients over all ranks, so sp_size x that mean
        # is their sum over each group averaged over the data-parallel ranks
        grad_norm = self.engine.update(loss * self.sp_size, self.model, self.optimizer)
        self.update_ema()
        self.step += 1
        return torch.stack([loss.detach().float(), grad_norm.float()])

    def sync(self, sums: torch.Tensor, steps: int) -> tuple[float, float]:
        """The global batch's mean loss and gradient norm over the last `steps` steps (from the sums
        of train_step's results): one all-reduce, and the host's one wait on the device in the
        interval."""
        packed = sums.double() / steps
        if self.world > 1:
            dist.all_reduce(packed)
        mean_loss, grad_norm = packed.tolist()
        return mean_loss / self.world, grad_norm / self.world

    def must_stop(self) -> bool:
        """Whether any rank was told to stop, or sees the job's end nearer than the step under way,
        twice the last checkpoint write and the time to exit: one all-reduce of a flag on the CPU
        (the cpu_group), so every rank stops after the same step and the host never waits on the
        device for it."""
        now = time.monotonic()
        step_seconds, self.last_check = now - self.last_check, now
        lead = step_seconds + WRITE_SAFETY * self.write_seconds + EXIT_SECONDS
        near_end = self.deadline is not None and time.time() + lead >= self.deadline
        flag = torch.tensor([float(self.stop_requested or near_end)])
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.cpu_group)
        stop = flag.item() > 0
        if stop and self.rank == 0:
            why = (f"the job ends in {self.deadline - time.time():.0f} s ({lead:.0f} s needed)" if near_end
                   else "told to stop" if self.stop_requested else "another rank was told to stop")
            print(f"{why}: checkpointing step {self.step}, then exiting", flush=True)
        return stop

    def update_ema(self) -> None:
        # one foreach call per tensor kind: under FSDP parameters are DTensors, buffers are not
        by_kind: dict[type, list[str]] = {}
        state = self.engine.weights(self.model)
        for name, value in state.items():
            if value.dtype.is_floating_point and name in self.ema:
                by_kind.setdefault(type(value), []).append(name)
        for names in by_kind.values():
            self.ema_update([self.ema[name] for name in names], [state[name] for name in names], None)

    # --- validation, sample grids -------------------------------------------------------
    def validation_loss(self) -> float:
        """The loss on the validation items of the weights the model holds now (a collective)."""
        self.wrapped.eval()  # no caption drop, no checkpointing
        try:
            sums = self.validation.loss_sums(self.wrapped, self.diffusion, self.device, self.autocast)
        finally:
            self.wrapped.train()
            self.engine.after_forward_only(self.model)
        if self.rank % self.sp_size:
            sums.zero_()  # a sequence-parallel group's ranks computed the same items: count them once
        if self.world > 1:
            dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    @contextmanager
    def ema_weights(self):
        """The model holds the EMA weights inside the block, its own again after it (bit for bit)."""
        state = self.engine.weights(self.model)
        kept = {}
        with torch.no_grad():
            for name, value in state.items():
                if value.dtype.is_floating_point and name in self.ema:
                    kept[name] = value.clone()
                    value.copy_(self.ema[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in kept.items():
                    state[name].copy_(value)

    def validate(self, log_path: Path) -> None:
        """Log the validation loss of the raw and the EMA weights, and warn of over-fitting."""
        started = time.perf_counter()
        loss = self.validation_loss()
        ema_loss = None  # an engine whose forward does not read `weights` cannot swap the EMA in
        if self.engine.weights_are_forward:
            with self.ema_weights():
                ema_loss = self.validation_loss()
        seconds = time.perf_counter() - started
        if self.rank != 0:
            return
        append_row(log_path, self.step, loss, ema_loss, seconds)
        metrics = {"validation/loss": loss, "validation/ema_loss": ema_loss, "validation/seconds": seconds}
        for name, value in metrics.items():
            if value is not None:
                self.writer.add_scalar(name, value, self.step)
        if self.tracker is not None:
            self.tracker.log(self.step, metrics)
        warning = overfitting(read_log(log_path), read_log(self.run_dir / "loss.csv"), self.checks["overfit_evaluations"])
        if warning:
            print(f"WARNING: {self.run_dir.name}, step {self.step}: {warning}", flush=True)

    def sample_grid(self) -> None:
        """A grid of samples of the weights sample.use_ema names (soraflow.inference.grid, in a
        process of its own: the loop imports no text encoder or autoencoder), written by rank 0
        to samples/step-N.png. Gathering the weights is a collective; the other ranks go on and
        wait for rank 0 at the next one."""
        use_ema = self.sampling["sample"]["use_ema"]
        weights = self._ema_to_save() if use_ema else {}
        if not use_ema or frozen_names(self.model):
            # the raw weights, or under the EMA (which follows only what trains) a LoRA's frozen base
            weights = {**self.engine.model_state(self.model), **weights}
        if self.rank != 0:
            return
        started = time.perf_counter()
        path = self.run_dir / "samples" / f"step-{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        held = path.with_suffix(".safetensors")
        save_checkpoint_file(held, {"model": weights}, {"model_config": self.model_config, "family": self.family.name,
                                                        "input_size": list(self.input_size), "steps": self.step})
        command = [sys.executable, "-m", "soraflow.cli", "sample-grid", str(held), "--out", str(path),
                   "--settings", json.dumps(self.sampling), "--steps", str(self.checks["sample_steps"]),
                   "--captions", str(self.checks["sample_captions"])]
        if self.held_out is not None:
            command += ["--validation-index", str(self.validation_index)]
        try:
            subprocess.run(command, check=True)
        finally:
            held.unlink(missing_ok=True)
        print(f"{path}: {'EMA' if use_ema else 'raw'} weights in {time.perf_counter() - started:.1f} s", flush=True)

    # --- the loop ----------------------------------------------------------------------
    def request_stop(self, signum, _frame) -> None:
        self.stop_requested = True
        print(f"signal {signum}: checkpointing after this step, then exiting", flush=True)

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self.request_stop)
        self.resume()
        total = self.stage["steps"]
        log_path, validation_path = self.run_dir / "loss.csv", self.run_dir / "validation.csv"
        checks = self.checks or {}
        validate_every = checks.get("every") if self.validation else None
        # sample grids sample in the project's environment: the colossalai engine's own has no
        # video decoder or text encoder
        grids = self.sampling is not None
        if grids and self.opts["engine"] == "colossalai" and checks.get("sample_every"):
            grids = False
            if self.rank == 0:
                print("validation.sample_every: no sample grids under the colossalai engine (its environment "
                      "has no video decoder or text encoder); the stage's samples come after it", flush=True)
        sample_every = checks.get("sample_every") if grids else None
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            drop_log_rows_after(log_path, self.step)
            drop_log_rows_after(validation_path, self.step)
            self.writer = tensorboard_writer(self.run_dir / "tensorboard", self.step)
            self.tracker = Trackers(self.tracking, self.run_dir, self.identity, self.identity_parts, self.params)
            if self.checks:
                print(f"validation: {self.validation.size if self.validation else 0} items "
                      f"({len(self.held_out or ())} held-out clips x timesteps) every {validate_every} steps"
                      + ("" if self.engine.weights_are_forward else f"; the {self.engine.name} engine gives no EMA loss"),
                      flush=True)
            print(f"training {len(self.data)} clips, input {self.input_size}, from step {self.step}, "
                  f"{sum(p.numel() for p in self.model.parameters()):,} parameters, engine {self.engine.name} "
                  f"x{self.world}, init {self.init_report}", flush=True)
            if self.deadline is not None:
                print(f"the job ends at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.deadline))}: "
                      f"the run stops {WRITE_SAFETY * self.write_seconds + EXIT_SECONDS:.0f} s and a step ahead",
                      flush=True)
        bar = progress(total=total, initial=self.step, disable=self.rank != 0, desc="train")
        started, start_step = time.time(), self.step
        batches = self.batches(total)
        sums, interval_steps = torch.zeros(2, device=self.device), 0
        try:
            while self.step < total:
                waiting = time.perf_counter()
                batch = next(batches)
                self.data_wait += time.perf_counter() - waiting
                sums += self.train_step(batch)
                interval_steps += 1
                bar.update(1)
                stop = self.step < total and self.must_stop()  # the same on every rank
                if self.step % self.opts["log_every"] == 0 or self.step == total or stop:
                    loss, grad_norm = self.sync(sums, interval_steps)
                    sums.zero_()
                    interval_steps = 0
                    if not math.isfinite(loss):
                        raise FloatingPointError(f"mean loss is {loss} in the steps up to {self.step}; "
                                                 f"lower the learning rate ({self.stage['lr']})")
                    if self.rank == 0:
                        seconds = time.time() - started
                        self.log(log_path, loss, grad_norm, seconds)
                        self.writer.add_scalar("train/loss", loss, self.step)
                        self.writer.add_scalar("train/grad_norm", grad_norm, self.step)
                        self.writer.add_scalar("train/steps_per_s", (self.step - start_step) / max(seconds, 1e-9), self.step)
                        self.writer.add_scalar("train/data_wait_share", self.data_wait / max(seconds, 1e-9), self.step)
                        bar.set_postfix(loss=f"{loss:.4f}")
                        if self.tracker is not None:
                            self.tracker.log(self.step, {"train/loss": loss, "train/grad_norm": grad_norm})
                if validate_every and (self.step % validate_every == 0 or self.step == total):
                    self.validate(validation_path)
                if sample_every and (self.step % sample_every == 0 or self.step == total):
                    self.sample_grid()
                if self.step % self.opts["checkpoint_every"] == 0 or stop:
                    self.save(background=not stop)  # a stop waits for its checkpoint
                if stop and self.step < total:
                    if self.rank == 0:
                        failure.record_stop(self.run_dir, os.environ)
                        if self.tracker is not None:
                            self.tracker.finish("KILLED")
                    raise Preempted(f"stopped at step {self.step} of {total}; the checkpoint resumes it")
                self.finish_save(wait=False)
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
            # its workers stop when the iterator goes; a library that keeps an exception it caught
            # (its traceback holds this frame) would keep it to the exit, which joins the workers,
            # and they ignore the SIGTERM meant for the trainer: the process never ends
            del batches
        self.finish_save(wait=True)
        if self.world > 1:
            self.check_replicas()
        self.write_final()
        if self.tracker is not None:
            self.tracker.finish("FINISHED")

    def log(self, path: Path, loss: float, grad_norm: float, seconds: float) -> None:
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "loss", "grad_norm", "seconds"])
            writer.writerow([self.step, f"{loss:.6f}", f"{grad_norm:.6f}", f"{seconds:.2f}"])


def leave_stops_to_trainer(_worker_id: int) -> None:
    """DataLoader workers ignore the stop signals: torchrun (and Slurm) signal the whole process
    group, and a worker killed by SIGTERM fails the step before the trainer can checkpoint. A
    worker exits when its loader is done or the training process is gone."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def sequence_parallel_group(rank: int, world: int, sp_size: int):
    """This rank's group of sp_size consecutive ranks (every rank creates every group, as
    torch.distributed.new_group requires)."""
    groups = [dist.new_group(list(range(first, first + sp_size))) for first in range(0, world, sp_size)]
    return groups[rank // sp_size]


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


def train(index_path, out_path, run_dir, params: dict, output_settings: dict, init_path=None, loss_out=None,
          validation_index=None, validation_out=None, sampling: dict | None = None) -> None:
    """params: the step's full settings; output_settings: those that change its result (the
    run's identity). loss_out, validation_out: where the finished run's loss and validation logs
    are copied; validation_index, sampling: see Trainer. A failure that a retry would repeat is
    recorded in the run folder (soraflow.training.failure)."""
    try:
        trainer = Trainer(index_path, out_path, run_dir, params, output_settings, init_path, loss_out,
                          validation_index, validation_out, sampling)
        trainer.run()
    except failure.DETERMINISTIC as error:
        failure.record(run_dir, error, int(os.environ.get("RANK", 0)))
        raise  # without tearing the group down: peers may wait in a collective this rank left, and
        # destroy_process_group would wait with them; torchrun stops them when this process exits
    if dist.is_initialized():
        # rank 0 may still be writing the final checkpoint: no rank tears its gloo
        # connections down while a peer still holds them (one CI run aborted there)
        dist.barrier()
        dist.destroy_process_group()

