"""Two training processes on CPU (gloo), started by `soraflow train --nproc 2` (torchrun).

The step's randomness is drawn for the global batch, so 2 processes x batch 2 must give
the losses and weights of 1 process x batch 4. Both ranks print the digest of the full
weights they hold at the end (the trainer all-gathers them); they must be equal. FSDP2
(`fully_shard`) runs on gloo/CPU in torch 2.13 and is tested the same way, a
checkpoint written by one engine resumes under the other, and one written at one world
size resumes at another. The validation loss (its items shared out over the ranks, the sums
all-reduced) is the single process's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_train import cli_settings, latent_index, train_params  # noqa: F401  (the fixture is shared)

from soraflow.training.loop import train

STEPS = 4
# 6 clips x 3 timesteps: 9 items per rank of 2, in batches of 2 (one padded)
VALIDATION = {"every": 2, "timesteps": 3, "max_clips": 64, "sample_every": None, "sample_steps": 2,
              "sample_captions": 0, "overfit_evaluations": 3}


def launch(index, out, run_dir, params, nproc=2, python=sys.executable, env=None, args=()) -> subprocess.Popen:
    """`soraflow train --nproc` of `python`'s environment, with `env` added to ours."""
    cmd = [str(python), "-m", "soraflow.cli", "train", str(index), "--out", str(out), "--run-dir", str(run_dir),
           "--nproc", str(nproc), *cli_settings(params), *args]
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")},
           "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def finish(process: subprocess.Popen, timeout=120) -> str:
    try:
        return process.communicate(timeout=timeout)[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


def rank_digests(output: str) -> list[str]:
    found = re.findall(r"weights digest per rank: ([0-9a-f ]+)", output)
    assert found, output
    return found[-1].split()


def params_for(engine: str, batch_size: int, steps: int = STEPS, **overrides) -> dict:
    params = train_params(steps=steps, engine=engine, **overrides)
    params["stage"]["batch_size"] = batch_size
    return params


@pytest.fixture(scope="module")
def single_process(latent_index, tmp_path_factory):  # noqa: F811
    """The reference: one process, the global batch of 4, validated on its own clips."""
    root = tmp_path_factory.mktemp("single")
    params = {**params_for("ddp", batch_size=4), "validation": VALIDATION}
    train(latent_index, root / "out.safetensors", root / "run", params, params, validation_index=latent_index)
    return (load_file(str(root / "out.safetensors")), pd.read_csv(root / "run" / "loss.csv"),
            pd.read_csv(root / "run" / "validation.csv"))


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(engine, latent_index, single_process, tmp_path):  # noqa: F811
    out = tmp_path / "out.safetensors"
    process = launch(latent_index, out, tmp_path / "run", {**params_for(engine, batch_size=4), "validation": VALIDATION},
                     args=["--validation-index", str(latent_index)])
    output = finish(process)
    assert process.returncode == 0, output
    assert f"engine {engine} x2" in output

    digests = rank_digests(output)
    assert len(digests) == 2 and digests[0] == digests[1], output

    reference_weights, reference_log, reference_validation = single_process
    log = pd.read_csv(tmp_path / "run" / "loss.csv")
    assert log["step"].tolist() == reference_log["step"].tolist() == list(range(1, STEPS + 1))
    assert (log["loss"] - reference_log["loss"]).abs().max() < 1e-5, (log, reference_log)
    validation = pd.read_csv(tmp_path / "run" / "validation.csv")
    assert validation["step"].tolist() == reference_validation["step"].tolist() == [2, 4]
    for column in ("loss", "ema_loss"):
        assert (validation[column] - reference_validation[column]).abs().max() < 1e-5, (validation, reference_validation)

    weights = load_file(str(out))
    assert set(weights) == set(reference_weights)
    for key, value in weights.items():
        torch.testing.assert_close(value, reference_weights[key], rtol=1e-4, atol=1e-5, msg=key)
    # TensorBoard events beside the CSV
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_preempted_two_process_run_checkpoints_and_resumes_under_the_other_engine(latent_index, tmp_path):  # noqa: F811
    """SIGUSR1 to the launcher reaches both workers through torchrun: they agree on a step,
    checkpoint it and exit non-zero; FSDP then resumes the DDP checkpoint to the end."""
    run_dir = tmp_path / "run"
    params = params_for("ddp", batch_size=2, steps=10_000, checkpoint_every=10_000)
    process = launch(latent_index, tmp_path / "out.safetensors", run_dir, params)
    deadline = time.time() + 90
    while not (run_dir / "loss.csv").exists():
        assert process.poll() is None, finish(process)
        assert time.time() < deadline, "training never logged a step"
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)
    output = finish(process)
    assert process.returncode != 0, output
    checkpoints = sorted(run_dir.glob("step-*"))
    assert checkpoints, output
    step = json.loads((checkpoints[-1] / "state.json").read_text())["step"]
    assert 0 < step < 10_000

    params = params_for("fsdp", batch_size=2, steps=step + 2, checkpoint_every=10_000)
    process = launch(latent_index, tmp_path / "out.safetensors", run_dir, params)
    output = finish(process)
    assert process.returncode == 0, output
    assert f"from step {step}" in output and "engine fsdp x2" in output
    assert load_file(str(tmp_path / "out.safetensors"))
    assert pd.read_csv(run_dir / "loss.csv")["step"].iloc[-1] == step + 2


def test_a_checkpoint_resumes_at_another_world_size(latent_index, single_process, tmp_path):  # noqa: F811
    """Steps 1-2 on two fsdp ranks (each writes its own shards), step 3 on one process, step 4 on
    two ranks again: the one-process run of the same global batch, step for step."""
    run_dir = tmp_path / "run"
    for nproc, steps, start in ((2, 2, 0), (1, 3, 2), (2, 4, 3)):
        process = launch(latent_index, tmp_path / "out.safetensors", run_dir,
                         params_for("fsdp", batch_size=4, steps=steps, checkpoint_every=1), nproc=nproc)
        output = finish(process)
        assert process.returncode == 0, output
        assert f"from step {start}," in output
        if nproc == 2:  # each rank wrote its own shards
            written = {p.name: p.stat().st_size for p in (run_dir / f"step-{steps:07d}").glob("*.distcp")}
            assert sorted(written) == ["__0_0.distcp", "__1_0.distcp"] and min(written.values()) > 0, written
    reference_weights, reference_log, _ = single_process
    log = pd.read_csv(run_dir / "loss.csv")
    assert log["step"].tolist() == reference_log["step"].tolist()
    assert (log["loss"] - reference_log["loss"]).abs().max() < 1e-5, (log, reference_log)
    weights = load_file(str(tmp_path / "out.safetensors"))
    for key, value in weights.items():
        torch.testing.assert_close(value, reference_weights[key], rtol=1e-4, atol=1e-5, msg=key)
