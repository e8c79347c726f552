"""The trainer on a small synthetic latent cache: checkpoints, exact resume, stage chaining."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from soraflow.data import cache, table
from soraflow.models.checkpoint import load_checkpoint_file, load_for_sampling
from soraflow.training import failure
from soraflow.training.identity import identity_parts
from soraflow.training.loop import EXIT_SECONDS, Trainer, checkpoints, train
from soraflow.workflow.settings import declared_steps

NUM_CLIPS = 6


def split_settings(params: dict) -> tuple[dict, dict]:
    """(output-changing, operational) halves of train settings, by the workflow's declaration
    (schemas/affects.yaml), as the train rule passes them."""
    outputs = {section: dict(values) for section, values in params.items()}
    ops = {"train": {k: outputs["train"].pop(k) for k in list(outputs["train"]) if declared_steps(f"train.{k}") == []}}
    return outputs, ops


def cli_settings(params: dict) -> list[str]:
    outputs, ops = split_settings(params)
    return ["--params", json.dumps(outputs), "--operational", json.dumps(ops)]


def train_params(steps: int, **train_overrides) -> dict:
    return {
        "stage": {"num_frames": 2, "frame_interval": 1, "resolution": 32, "steps": steps, "batch_size": 2,
                  "lr": 1e-3, "filters": {}},
        "train": {"seed": 7, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.9, "grad_checkpointing": False,
                  "mixed_precision": "fp32", "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1,
                  "nproc_per_node": 1, "engine": "ddp", "data_workers": 1, "sp_size": 1,
                  "colossalai": {"zero_stage": 2, "overlap_communication": True}, **train_overrides},
        "stdit": {"preset": "STDiT-tiny", "space_scale": 1.0},
        "diffusion": {"num_timesteps": 1000, "sample_steps": 5, "cfg_scale": 4.0},
    }


def write_shard_cache(index_path: Path, ids: list[str], tensors: dict[str, torch.Tensor]) -> dict:
    """A shard's cache as the encode jobs write it (index + chunk files); clip id -> (chunk, row)."""
    store = cache.ChunkStore(index_path, {"test": index_path.stem})
    store.add(ids, ids, tensors)
    store.finish(ids, ids)
    return cache.locate(index_path)


@pytest.fixture(scope="module")
def latent_index(tmp_path_factory) -> Path:
    """An index over one shard: latents [4, 2, 8, 8] and text features [32, 384] per clip."""
    root = tmp_path_factory.mktemp("cache")
    g = torch.Generator().manual_seed(0)
    ids = [f"clip{i}" for i in range(NUM_CLIPS)]
    latents = write_shard_cache(root / "latents.json", ids, {"latents": torch.randn(NUM_CLIPS, 4, 2, 8, 8, generator=g)})
    mask = torch.zeros(NUM_CLIPS, 32, dtype=torch.long)
    mask[:, :5] = 1
    texts = write_shard_cache(root / "text.json", ids, cache.text_tensors(torch.randn(NUM_CLIPS, 32, 384, generator=g), mask))
    index = pd.DataFrame({
        "id": ids, "latent_path": [latents[i][0] for i in ids], "latent_index": [latents[i][1] for i in ids],
        "text_emb_path": [texts[i][0] for i in ids], "text_emb_index": [texts[i][1] for i in ids],
    })
    table.write(index, root / "index.parquet")
    return root / "index.parquet"


def test_training_writes_final_checkpoint_and_loss_log(latent_index, tmp_path):
    out = tmp_path / "stage.safetensors"
    train(latent_index, out, tmp_path / "run", train_params(steps=4), train_params(steps=4))
    model_state, metadata = load_checkpoint_file(out, "model")
    ema_state, _ = load_checkpoint_file(out, "ema")
    assert metadata["input_size"] == [2, 8, 8] and metadata["steps"] == 4
    assert set(model_state) == set(ema_state)
    assert not any("pos_embed" in k for k in model_state)
    # the zero-initialised final layer moved: the model did train
    assert model_state["final_layer.linear.weight"].abs().sum() > 0
    log = pd.read_csv(tmp_path / "run" / "loss.csv")
    assert log["step"].tolist() == [1, 2, 3, 4] and log["loss"].notna().all()
    model, input_size = load_for_sampling(out, use_ema=True)
    assert input_size == (2, 8, 8) and not model.training


def test_next_stage_starts_from_previous_weights(latent_index, tmp_path):
    first = tmp_path / "stage1.safetensors"
    train(latent_index, first, tmp_path / "run1", train_params(steps=2), train_params(steps=2))
    trained, _ = load_checkpoint_file(first, "model")
    params = train_params(steps=1)
    params["train"]["seed"] = 8  # a different random init, which the checkpoint must overwrite
    second = Trainer(latent_index, tmp_path / "stage2.safetensors", tmp_path / "run2", params, params, init_path=first)
    state = second.model.state_dict()
    for key, value in trained.items():
        assert torch.equal(state[key], value), key


def run_training_process(index, out, run_dir, params, env=None, args=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "soraflow.cli", "train", str(index), "--out", str(out), "--run-dir", str(run_dir),
           *cli_settings(params), *args]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, process.stdout.read().decode()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_killed_run_resumes_to_identical_weights(latent_index, tmp_path):
    params = train_params(steps=8)
    uninterrupted = tmp_path / "uninterrupted.safetensors"
    train(latent_index, uninterrupted, tmp_path / "run_a", params, params)

    resumed = tmp_path / "resumed.safetensors"
    process = run_training_process(latent_index, resumed, tmp_path / "run_b", params)
    wait_for(tmp_path / "run_b" / "step-0000004" / "state.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not resumed.exists()
    process = run_training_process(latent_index, resumed, tmp_path / "run_b", params)
    output = process.communicate(timeout=300)[0].decode()
    assert process.returncode == 0, output
    assert "from step 4" in output or "from step 6" in output

    a, b = load_file(str(uninterrupted)), load_file(str(resumed))
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def stopped_run(run_dir: Path, output: str) -> int:
    """The step a stopped run checkpointed: the last step it ran and logged (the stop's own log
    row, off the log_every grid), with no failure recorded (a retry resumes it)."""
    saved = checkpoints(run_dir)
    assert saved, output
    step = json.loads((saved[-1] / "state.json").read_text())["step"]
    assert pd.read_csv(run_dir / "loss.csv")["step"].tolist()[-1] == step, output
    assert not (run_dir / failure.RECORD).exists()
    return step


def test_sigterm_checkpoints_the_step_under_way_and_exits_for_requeue(latent_index, tmp_path):
    """The stop flag is checked after every step, not at the next log step (log_every 1000 here)."""
    params = train_params(steps=10_000, checkpoint_every=10_000, log_every=1000)
    process = run_training_process(latent_index, tmp_path / "out.safetensors", tmp_path / "run", params)
    wait_for(tmp_path / "run" / "tensorboard", process)  # made once the stop handlers are in place
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode != 0
    assert "preempted" in output
    step = stopped_run(tmp_path / "run", output)
    assert 0 < step < 1000, output


def test_a_run_stops_ahead_of_the_jobs_end_time(latent_index, tmp_path):
    """Slurm's end time of the job (here SLURM_JOB_END_TIME, as Slurm 23.02 on exports it): the run
    checkpoints and exits as a preempted job does before it, with no signal at all. A retry inside
    the same job (a workflow run inside one allocation) exits at once; the same job requeued by
    Slurm (same id, a restart count) resumes."""
    params = train_params(steps=10_000, checkpoint_every=10_000, log_every=1000)
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_END_TIME": str(int(time.time() + EXIT_SECONDS + 20))}  # ~20 s of training

    def run(env) -> str:
        process = run_training_process(latent_index, tmp_path / "out.safetensors", tmp_path / "run", params, env=env)
        output = process.communicate(timeout=300)[0].decode()
        assert process.returncode != 0, output
        return output

    stopped = run(job)
    assert "preempted" in stopped and "the job ends in" in stopped, stopped
    step = stopped_run(tmp_path / "run", stopped)
    assert 0 < step < 10_000
    retried = run(job)
    assert "not run again in this Slurm job" in retried and "from step" not in retried, retried
    requeued = run({**job, "SLURM_RESTART_COUNT": "1"})
    assert f"from step {step}," in requeued and "preempted" in requeued, requeued


def test_a_failure_a_retry_repeats_is_not_run_again(latent_index, tmp_path):
    """A setting that does not fit (sp_size 2 on one process) fails the first attempt, which records
    it; the retry (Snakemake's attempt 2) exits at once with that error, starting no training; a
    new Snakemake run (attempt 1) removes the record and runs."""
    params = train_params(steps=4, sp_size=2)
    run_dir = tmp_path / "run"
    outputs = []
    for attempt in (1, 2, 1):
        process = run_training_process(latent_index, tmp_path / "out.safetensors", run_dir, params,
                                       args=["--attempt", str(attempt)])
        outputs.append(process.communicate(timeout=120)[0].decode())
        assert process.returncode != 0
    first, retry, new_run = outputs
    assert "ValueError: train.sp_size 2 does not divide the 1 training processes" in first
    assert "not run again" in retry and "sp_size 2" in retry and "Traceback" not in retry
    assert "not run again" not in new_run and "Traceback" in new_run
    assert json.loads((run_dir / failure.RECORD).read_text())["error"].startswith("ValueError: train.sp_size")


def test_a_non_finite_loss_is_recorded_as_a_failure_a_retry_repeats(latent_index, tmp_path):
    params = train_params(steps=4)
    params["stage"]["lr"] = 1e30
    with pytest.raises(FloatingPointError, match="mean loss is"):
        train(latent_index, tmp_path / "out.safetensors", tmp_path / "run", params, params)
    assert "FloatingPointError: mean loss is" in failure.recorded(tmp_path / "run", attempt=2)
    assert failure.recorded(tmp_path / "run", attempt=1) is None  # a new Snakemake run tries again


def test_snakemake_does_not_retry_a_failure_a_retry_repeats(latent_index, tmp_path):
    """The train rule under real Snakemake, its retries (a chain's links plus two) intact: a loss
    that turns NaN fails attempt 1; attempts 2 and 3 exit at once with its error, training nothing."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((repo / "workflow_config.yaml").read_text())
    config["data"]["manifest"] = str(repo / config["data"]["manifest"])
    config["stages"] = {"stage1": {**config["stages"]["stage1"], "steps": 3, "batch_size": 2, "lr": 1e30}}
    config["stdit"] = {"preset": "STDiT-tiny"}
    config["train"].update(log_every=1, data_workers=0, mixed_precision="fp32")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    index = tmp_path / "data" / "train" / "stage1" / "index.parquet"
    index.parent.mkdir(parents=True)
    shutil.copyfile(latent_index, index)
    table.write(table.read(index).iloc[:0], index.with_name("validation.parquet"))  # the dataset step's: none held out
    cmd = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "results/checkpoints/stage1.safetensors",
           "--configfile", "config.yaml", "--cores", "1", "--allowed-rules", "train_stage1"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert result.stderr.count("Trying to restart job") == 2, result.stderr[-3000:]  # retries: 2
    log = (tmp_path / "logs" / "train" / "stage1.log").read_text()  # the last attempt's
    assert "not run again" in log and "FloatingPointError: mean loss is nan" in log and "training" not in log, log


def test_the_identity_digests_shard_cache_indexes_once(tmp_path):
    """The identity reads each shard cache's index (the encode job's output), never its chunks,
    and remembers every digest in the run folder by size, time and inode: the next link of a
    chain reads no file again, and a file that changes is read again."""
    ids = ["a", "b", "c"]
    where = write_shard_cache(tmp_path / "latents" / "00000.json", ids, {"latents": torch.zeros(3, 4)})
    table.write(pd.DataFrame({"id": ids, "latent_path": [where[i][0] for i in ids], "latent_index": [where[i][1] for i in ids],
                              "text_emb_path": [where[i][0] for i in ids], "text_emb_index": [where[i][1] for i in ids]}),
                tmp_path / "index.parquet")
    init = tmp_path / "init.safetensors"
    init.write_bytes(b"weights")
    memo = tmp_path / "run" / "digests.json"
    memo.parent.mkdir()
    parts = identity_parts({"stage": {"lr": 1}}, tmp_path / "index.parquet", init, memo)
    shard_index = tmp_path / "latents" / "00000.json"
    assert parts["caches"] == {str(shard_index): hashlib.sha256(shard_index.read_bytes()).hexdigest()}
    assert parts["init"] == hashlib.sha256(b"weights").hexdigest()

    stat = init.stat()
    init.write_bytes(b"WEIGHTS")  # same size, its time put back by hand: not read again
    os.utime(init, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert identity_parts({"stage": {"lr": 1}}, tmp_path / "index.parquet", init, memo) == parts
    os.utime(init)  # a new time: read again
    assert identity_parts({"stage": {"lr": 1}}, tmp_path / "index.parquet", init, memo)["init"] == \
        hashlib.sha256(b"WEIGHTS").hexdigest()


def test_changed_settings_start_afresh_but_more_steps_resume(latent_index, tmp_path):
    run_dir = tmp_path / "run"
    train(latent_index, tmp_path / "a.safetensors", run_dir, train_params(steps=4), train_params(steps=4))
    longer = Trainer(latent_index, tmp_path / "b.safetensors", run_dir, train_params(steps=6), train_params(steps=6))
    longer.resume()
    assert longer.step == 4  # training longer continues the same run

    other_lr = train_params(steps=6)
    other_lr["stage"]["lr"] = 5e-4
    changed = Trainer(latent_index, tmp_path / "c.safetensors", run_dir, other_lr, other_lr)
    changed.resume()
    assert changed.step == 0 and not list(run_dir.glob("step-*"))  # the other run's checkpoints left the run
    assert not (run_dir / "loss.csv").exists()
    # ... but were moved aside whole, never deleted
    aside = run_dir / "superseded" / longer.identity
    assert sorted(p.name for p in aside.iterdir()) == ["loss.csv", "step-0000002", "step-0000004", "tensorboard"]
    state = json.loads((aside / "step-0000004" / "state.json").read_text())
    assert state["step"] == 4 and state["run"] == longer.identity


def test_operational_changes_resume_a_run_as_the_workflow_passes_them(latent_index, tmp_path):
    """After a preemption a user raises the stage's Slurm runtime and nodes, turns on grad
    checkpointing, switches engine and logs at another pace: the train rule's params (what the
    run's identity hashes) are unchanged, so the checkpoints are kept and resumed."""
    import yaml

    from soraflow.workflow.layout import Layout
    from soraflow.workflow.settings import merged, with_defaults

    repo = Path(__file__).resolve().parents[1]
    config = with_defaults(yaml.safe_load((repo / "workflow_config.yaml").read_text()))
    config["data"]["manifest"] = str(repo / "demo" / "manifest.csv")
    config["stages"]["stage1"].update(steps=4, batch_size=2)
    config["stdit"]["preset"] = "STDiT-tiny"
    config["train"].update(checkpoint_every=2, mixed_precision="fp32")

    def settings(config):
        layout = Layout(config)
        outputs = json.loads(layout.params("train", "stage1"))
        return merged(outputs, json.loads(layout.operational("train", "stage1"))), outputs

    params, outputs = settings(config)
    train(latent_index, tmp_path / "a.safetensors", tmp_path / "run", params, outputs)

    changed = yaml.safe_load(yaml.safe_dump(config))
    changed["stages"]["stage1"]["resources"] = {"runtime": 4320, "nodes": 2}
    changed["train"].update(grad_checkpointing=True, engine="fsdp", log_every=7, checkpoint_every=3,
                            keep_checkpoints=5, nproc_per_node=4)
    changed["stages"]["stage1"]["steps"] = 6  # and trains longer
    params, outputs = settings(changed)
    resumed = Trainer(latent_index, tmp_path / "b.safetensors", tmp_path / "run", params, outputs)
    resumed.resume()
    assert resumed.step == 4 and not (tmp_path / "run" / "superseded").exists()
