"""The colossalai engine: two gloo ranks train with ZeRO-2 through ColossalAI's booster on CPU.

Training runs in the colossalai environment (.venv-colossalai: colossalai 0.5.0, torch 2.5.1;
`make test` builds it) under torchrun, as the train rule starts it, with the CPU stand-ins of
tests/colossalai_cpu on its path (see that file: ZeRO asserts a GPU and asks for CUDA
streams). The reference is the ddp engine in the project's environment (torch 2.13) on the
same global batch: ZeRO gives the same losses, gradient norms and weights, alone and with
sequence parallelism; a killed bf16 run resumes bit for bit; a preemption signal checkpoints;
checkpoints cross between ddp and colossalai both ways; and the train rule runs its job in
this environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_distributed import finish, launch, params_for, rank_digests
from test_sequence_parallel import assert_same_training, result
from test_train import latent_index  # noqa: F401  (the fixture is shared)

from soraflow.data import table

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv-colossalai" / "bin" / "python"
CPU_STAND_INS = {"PYTHONPATH": str(REPO / "tests" / "colossalai_cpu")}
STEPS, RESUME_AT = 6, 4
# overlap_communication needs CUDA streams
ZERO2 = {"zero_stage": 2, "overlap_communication": False}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON.exists(), reason="no colossalai environment: make .venv-colossalai/.installed"),
]


def params(engine: str, **overrides) -> dict:
    return params_for(engine, **{"batch_size": 4, "steps": STEPS, "checkpoint_every": 2, "colossalai": ZERO2,
                                 **overrides})


def train_run(engine: str, index, root: Path, **overrides) -> str:
    """A 2-rank run in the engine's environment; its output."""
    environment = {"python": PYTHON, "env": CPU_STAND_INS} if engine == "colossalai" else {}
    process = launch(index, root / "out.safetensors", root / "run", params(engine, **overrides), **environment)
    output = finish(process, timeout=300)
    assert process.returncode == 0, output
    assert f"engine {engine} x2" in output
    return output


@pytest.fixture(scope="module")
def ddp_run(latent_index, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("ddp")
    train_run("ddp", latent_index, root)
    return root


@pytest.fixture(scope="module")
def zero2_run(latent_index, tmp_path_factory):  # noqa: F811
    """fp32, so that ZeRO and DDP can be compared closely."""
    root = tmp_path_factory.mktemp("zero2")
    output = train_run("colossalai", latent_index, root)
    digests = rank_digests(output)
    assert len(digests) == 2 and digests[0] == digests[1], output
    return root


def test_zero2_trains_like_ddp_on_the_same_global_batch(ddp_run, zero2_run):
    assert_same_training(result(zero2_run), result(ddp_run), steps=list(range(1, STEPS + 1)))
    # the same checkpoint file: the module's own parameter names, fp32, model and EMA
    zero_state, ddp_state = load_file(str(zero2_run / "out.safetensors")), load_file(str(ddp_run / "out.safetensors"))
    assert all(zero_state[k].dtype == ddp_state[k].dtype == torch.float32 for k in ddp_state)


def test_killed_bf16_run_resumes_to_identical_weights(latent_index, tmp_path):  # noqa: F811
    """In bf16 the plugin casts the module and ZeRO keeps fp32 master weights: the checkpoint must
    bring those back, not the rounded working copy, for the resumed run to end bit for bit where
    the uninterrupted one does. The killed run checkpoints at RESUME_AT only."""
    bf16 = {"mixed_precision": "bf16", "checkpoint_every": RESUME_AT}
    train_run("colossalai", latent_index, tmp_path / "uninterrupted", **bf16)
    killed = tmp_path / "killed"
    process = launch(latent_index, killed / "out.safetensors", killed / "run", params("colossalai", **bf16),
                     python=PYTHON, env=CPU_STAND_INS)
    checkpoint = killed / "run" / f"step-{RESUME_AT:07d}" / "state.json"
    deadline = time.time() + 300
    while not checkpoint.exists():
        assert process.poll() is None, finish(process)
        assert time.time() < deadline, f"{checkpoint} never appeared"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "out.safetensors").exists()

    assert f"from step {RESUME_AT}" in train_run("colossalai", latent_index, killed, **bf16)
    resumed, uninterrupted = (load_file(str(root / "out.safetensors")) for root in (killed, tmp_path / "uninterrupted"))
    assert set(resumed) == set(uninterrupted)
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


def test_a_preemption_signal_checkpoints_under_torch_2_5(latent_index, tmp_path):  # noqa: F811
    """torch 2.5.1's torchrun forwards SIGTERM only: the launcher passes Slurm's SIGUSR1 on as
    SIGTERM, and the workers checkpoint and exit non-zero for a requeue."""
    run_dir = tmp_path / "run"
    process = launch(latent_index, tmp_path / "out.safetensors", run_dir,
                     params("colossalai", steps=10_000, checkpoint_every=10_000), python=PYTHON, env=CPU_STAND_INS)
    deadline = time.time() + 300
    while not (run_dir / "loss.csv").exists():
        assert process.poll() is None, finish(process)
        assert time.time() < deadline, "training never logged a step"
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)
    output = finish(process)
    assert process.returncode != 0 and "--signals-to-handle" not in output, output
    step = json.loads((sorted(run_dir.glob("step-*"))[-1] / "state.json").read_text())["step"]
    assert 0 < step < 10_000


@pytest.mark.parametrize("first, then", [("ddp", "colossalai"), ("colossalai", "ddp")])
def test_a_checkpoint_resumes_under_the_other_engine(first, then, latent_index, ddp_run, zero2_run, tmp_path):  # noqa: F811
    """Steps 1-4 under one engine, 5-6 under the other: the result of either engine's whole run."""
    written_by = {"ddp": ddp_run, "colossalai": zero2_run}[first]
    shutil.copytree(written_by / "run" / f"step-{RESUME_AT:07d}", tmp_path / "run" / f"step-{RESUME_AT:07d}")
    output = train_run(then, latent_index, tmp_path)
    assert f"from step {RESUME_AT}" in output
    assert_same_training(result(tmp_path), result(written_by), steps=list(range(RESUME_AT + 1, STEPS + 1)))


def test_zero2_with_sequence_parallelism_trains_like_ddp(latent_index, ddp_run, tmp_path):  # noqa: F811
    """Both ranks share each sample (sp_size 2): the same global batch as the ddp run's two ranks."""
    train_run("colossalai", latent_index, tmp_path, sp_size=2)
    assert_same_training(result(tmp_path), result(ddp_run), steps=list(range(1, STEPS + 1)))


def test_the_train_rule_trains_in_the_colossalai_environment(latent_index, tmp_path):  # noqa: F811
    """Snakemake's train rule with train.engine colossalai, from a built stage index: the job
    runs in .venv-colossalai (the project's environment has no colossalai and would stop)."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["data"]["manifest"] = str(REPO / config["data"]["manifest"])
    config["stages"] = {"stage1": {**config["stages"]["stage1"], "steps": 2, "batch_size": 4,
                                  "resources": {"gpus_per_node": 0}}}  # CPU processes
    config["stdit"] = {"preset": "STDiT-tiny"}
    config["train"].update(engine="colossalai", nproc_per_node=2, mixed_precision="fp32", log_every=1,
                           data_workers=0, colossalai=ZERO2)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    index = tmp_path / "data" / "train" / "stage1" / "index.parquet"
    index.parent.mkdir(parents=True)
    shutil.copyfile(latent_index, index)
    table.write(table.read(index).iloc[:0], index.with_name("validation.parquet"))  # the dataset step's: none held out
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "results/checkpoints/stage1.safetensors",
           "--configfile", "config.yaml", "--cores", "2", "--allowed-rules", "train_stage1"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **CPU_STAND_INS})
    log = tmp_path / "logs" / "train" / "stage1.log"
    assert result.returncode == 0, result.stderr + (log.read_text() if log.exists() else "")
    assert "engine colossalai x2" in log.read_text()
    assert load_file(str(tmp_path / "results" / "checkpoints" / "stage1.safetensors"))
