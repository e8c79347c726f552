"""STDiT training on the latent cache, one process per device under torchrun.

Every random draw of step k (batch rows, timesteps, noise, caption dropout) comes from
a generator seeded by (seed, k) and is drawn for the global batch, each rank taking its
slice. So the step number is the whole data position: a resumed run, or a run on a
different number of processes with the same global batch, sees exactly the same
samples. Checkpoints are safetensors (weights, EMA, optimizer) plus a JSON state file;
nothing is unpickled. Loss goes to `<run_dir>/loss.csv` and to TensorBoard
(`<run_dir>/tensorboard`).

Engines (`train.engine`): how the model is spread over the processes.

    single  one process: the module itself
    ddp     DistributedDataParallel: a full replica per rank, gradients all-reduced
    fsdp    FSDP2: `fully_shard` on every STDiT block, then on the root; parameters,
            gradients and optimizer state are sharded (DTensor) over the ranks

The trainer talks to an engine only through this interface (class `Engine`):

    wrap(model) -> module               the module to run forward/backward on; the
                                        optimizer is built on model.parameters() after it
    model_state(model) -> dict          full CPU state dict on rank 0 (a collective)
    load_model_state(model, state)      full state dict, given on every rank
    optimizer_state(model, opt) -> dict {"state": {param name: {k: tensor}},
                                        "param_groups": [... "params": [param names]]},
                                        full, CPU, on rank 0 (a collective)
    load_optimizer_state(model, opt, state)   the same format, given on every rank
    full_tensor(t) / like(full, ref)    gather one (EMA) tensor / shard a full one like ref
    clip_grad_norm(model, max_norm)

Because states cross the seam by parameter name and in full, a checkpoint written by
one engine resumes under another and the file format never depends on the engine. An
engine living in another environment (e.g. a ColossalAI booster, which pins an older
torch) implements these methods around its own wrap/save calls and registers in
`ENGINES`; nothing here imports it.
"""

from __future__ import annotations

import csv
import hashlib
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

from soraflow.atomic import atomic_path
from soraflow.dataset import LatentDataset
from soraflow.diffusion import IDDPM
from soraflow.progress import progress
from soraflow.stdit import build_model, load_pixart_checkpoint

# position embeddings are recomputed for each input size, so they never travel in checkpoints
NOT_SAVED = ("pos_embed",)


class Preempted(Exception):
    """Raised after a checkpoint when Slurm (or a user) asks the job to stop."""


def saved(name: str) -> bool:
    return not any(n in name for n in NOT_SAVED)


def weights_to_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if saved(k)}


def save_checkpoint_file(path: Path, groups: dict[str, dict[str, torch.Tensor]], metadata: dict) -> None:
    """One safetensors file holding several named state dicts as `<group>.<key>` tensors."""
    tensors = {f"{group}.{k}": v.contiguous() for group, state in groups.items() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})


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
    missing = [k for k in result.missing_keys if saved(k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: does not fit this model (missing {missing}, unexpected {result.unexpected_keys})")


# --- optimizer state by parameter name, flattened for safetensors -------------------------
def optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    """{"state": {name: {k: t}}, "param_groups"} -> ({"<name>.<k>": t}, param_groups)."""
    tensors = {f"{name}.{k}": v for name, s in state["state"].items() for k, v in s.items()}
    return tensors, state["param_groups"]


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, k = key.rsplit(".", 1)
        state.setdefault(name, {})[k] = value
    return {"state": state, "param_groups": param_groups}


def named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A plain optimizer's state dict with parameter names in place of indices."""
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, saved_group in zip(optimizer.param_groups, sd["param_groups"]):
        for p, index in zip(group["params"], saved_group["params"]):
            index_to_name[index] = names[id(p)]
    return {
        "state": {index_to_name[i]: {k: v.detach().cpu() for k, v in s.items()} for i, s in sd["state"].items()},
        "param_groups": [{**g, "params": [index_to_name[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def load_named_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    name_to_index, index = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name_to_index[names[id(p)]] = index
            index += 1
    optimizer.load_state_dict({
        "state": {name_to_index[n]: s for n, s in named["state"].items()},
        "param_groups": [{**g, "params": [name_to_index[n] for n in g["params"]]} for g in named["param_groups"]],
    })


# --- engines ------------------------------------------------------------------------------
class Engine:
    """One process, no wrapping; the base of the other engines (see the module docstring)."""

    name = "single"

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return weights_to_save(model) if self.rank == 0 else {}

    def load_model_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        initialise_from_state(model, state, "checkpoint")

    def optimizer_state(self, model, optimizer) -> dict:
        return named_optimizer_state(model, optimizer) if self.rank == 0 else {}

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        load_named_optimizer_state(model, optimizer, state)

    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().cpu()

    def like(self, full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return full.to(ref.device, ref.dtype)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


class DDPEngine(Engine):
    """A full replica per rank; DistributedDataParallel averages the gradients."""

    name = "ddp"

    def wrap(self, model):
        if self.world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)


class FSDPEngine(Engine):
    """FSDP2: each STDiT block is one shard unit (all-gathered for its forward), then the root."""

    name = "fsdp"

    def wrap(self, model):
        from torch.distributed.fsdp import fully_shard

        if self.world == 1:
            return model
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def model_state(self, model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if self.world == 1:
            return super().model_state(model)
        state = get_model_state_dict(model, options=self._options())
        return {k: v for k, v in state.items() if saved(k)} if self.rank == 0 else {}

    def load_model_state(self, model, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.world == 1:
            return super().load_model_state(model, state)
        result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        missing = [k for k in result.missing_keys if saved(k)]
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint does not fit this model (missing {missing}, unexpected {result.unexpected_keys})")

    def optimizer_state(self, model, optimizer):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        if self.world == 1:
            return super().optimizer_state(model, optimizer)
        state = get_optimizer_state_dict(model, optimizer, options=self._options())
        return state if self.rank == 0 else {}

    def load_optimizer_state(self, model, optimizer, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if self.world == 1:
            return super().load_optimizer_state(model, optimizer, state)
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def full_tensor(self, t):
        from torch.distributed.tensor import DTensor

        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()

    def like(self, full, ref):
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(ref, DTensor):
            return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
        return full.to(ref.device, ref.dtype)


ENGINES: dict[str, type[Engine]] = {"single": Engine, "ddp": DDPEngine, "fsdp": FSDPEngine}


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and bytes: equal digests, bit-identical weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# Settings a run may change and still resume its checkpoints: train longer, log or save at
# another pace, switch engine. Anything else (data, init, lr, model, seed) starts afresh.
RESUMABLE_CHANGES = {"stage": {"steps"}, "train": {"checkpoint_every", "log_every", "engine", "nproc_per_node"}}


def file_digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def run_identity(params: dict, index_path, init_path) -> str:
    """What a run's checkpoints belong to: its settings, its training index, its initial weights."""
    settings = {
        section: {k: v for k, v in params[section].items() if k not in RESUMABLE_CHANGES.get(section, ())}
        for section in ("stage", "train", "stdit", "diffusion")
    }
    identity = {"settings": settings, "index": file_digest(index_path), "init": init_path and file_digest(init_path)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = sorted(p for p in run_dir.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


class Trainer:
    def __init__(self, index_path, out_path, run_dir, params: dict, init_path=None):
        self.stage, self.opts = params["stage"], params["train"]
        self.out_path, self.run_dir = Path(out_path), Path(run_dir)
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        engine_name = self.opts.get("engine", "ddp") if self.world > 1 else "single"
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
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.stage["lr"], weight_decay=self.opts["weight_decay"]
        )
        self.diffusion = IDDPM(num_timesteps=params["diffusion"]["num_timesteps"])
        self.identity = run_identity(params, index_path, init_path)
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
            final = self.run_dir / f"step-{self.step:07d}"
            tmp = self.run_dir / f".tmp-step-{self.step:07d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            optim, param_groups = optimizer_tensors(optim_state)
            save_checkpoint_file(
                tmp / "weights.safetensors",
                {"model": model_state, "ema": ema_state, "optim": optim},
                {"param_groups": param_groups, "engine": self.engine.name, "world_size": self.world},
            )
            (tmp / "state.json").write_text(json.dumps({"step": self.step, "run": self.identity}))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(self.run_dir.glob("step-*"))[:-2]:  # keep the last two
                shutil.rmtree(old)
        if self.world > 1:
            dist.barrier()

    def _ema_to_save(self) -> dict[str, torch.Tensor]:
        return {k: self.engine.full_tensor(v) for k, v in self.ema.items() if saved(k)}

    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        position = json.loads((checkpoint / "state.json").read_text()) if checkpoint else None
        if self.world > 1:  # every rank has looked before rank 0 may clear the folder
            dist.barrier()
        if position is None:
            return
        if position.get("run") != self.identity:
            if self.rank == 0:
                print(f"{self.run_dir}: its checkpoints come from other settings, data or initial weights; "
                      "starting afresh", flush=True)
                for old in [*self.run_dir.glob("step-*"), self.run_dir / "loss.csv", self.run_dir / "tensorboard"]:
                    shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
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
        global_batch = self.stage["batch_size"] * self.world
        rows = torch.randint(len(self.data), (global_batch,), generator=g)
        t = torch.randint(self.diffusion.num_timesteps, (global_batch,), generator=g)
        mine = slice(self.rank * self.stage["batch_size"], (self.rank + 1) * self.stage["batch_size"])
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


def train(index_path, out_path, run_dir, params: dict, init_path=None) -> None:
    trainer = Trainer(index_path, out_path, run_dir, params, init_path)
    try:
        trainer.run()
        if dist.is_initialized():
            # rank 0 may still be writing the final checkpoint: no rank tears its gloo
            # connections down while a peer still holds them (one CI run aborted there)
            dist.barrier()
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
