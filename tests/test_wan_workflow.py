"""The whole DAG with the Wan family (demo/wan.yaml's settings), on a copy of the session's finished
STDiT run: switching the family keeps the curation (ingest, split, scores, captions) and runs the
encode, training, sampling and report steps again with Wan's parts, here on two buckets (the
demo's square clips and its 2.35:1 ones, each at its own aspect); the trained LoRA loads into
diffusers' WanPipeline with the trained model's outputs."""

from __future__ import annotations

import pytest
import torch
import yaml
from workflow_run import REPO, copy_run, planned_jobs, run_snakemake

from soraflow.data import table
from soraflow.data.cache import LatentDataset
from soraflow.models import wan
from soraflow.models.checkpoint import checkpoint_metadata
from soraflow.workflow.layout import Layout

CURATION = {"demo_videos", "shard", "ingest", "split", "score", "match", "caption", "export", "models"}


def wan_config(config: dict) -> dict:
    """The finished run's config with demo/wan.yaml's family, encoders and one tiny LoRA stage on
    two buckets: square, and 1:2 for the bikes clips (226 x 96 after the split)."""
    overlay = yaml.safe_load((REPO / "demo" / "wan.yaml").read_text())
    stage = {**{k: v for k, v in overlay["stages"]["stage1"].items() if k not in ("num_frames", "resolution")},
             "frame_interval": 2, "steps": 3, "batch_size": 2, "buckets": [[5, 32, 32], [5, 32, 64]]}
    return {**config, "model": overlay["model"], "wan": overlay["wan"], "vae": overlay["vae"],
            "text_encoder": {**config["text_encoder"], **overlay["text_encoder"]}, "stages": {"stage1": stage},
            "diffusion": {**config["diffusion"], "sample_steps": 2},
            # no sample grids during training: each is a process of its own, and test_wan draws Wan's
            "validation": {**config.get("validation", {}), "sample_every": None}}


@pytest.mark.slow
def test_wan_family_trains_and_samples_on_a_finished_runs_curation(finished_run, tmp_path, monkeypatch):
    workdir = copy_run(finished_run.workdir, tmp_path / "wan")
    config = wan_config(yaml.safe_load((workdir / "config.yaml").read_text()))
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    planned = {rule for rule, _ in planned_jobs(workdir)}
    assert not planned & CURATION
    assert {"wan_model", "encode_video", "encode_text", "dataset", "train_stage1", "sample_stage1",
            "report_figures"} <= planned
    run_snakemake(workdir)

    layout = Layout(config)
    assert all((workdir / path).stat().st_size > 0 for path in layout.all_samples())
    assert all((workdir / path).exists() for path in layout.report_figures().values())
    checkpoint = workdir / layout.checkpoint("stage1")
    metadata = checkpoint_metadata(checkpoint)
    assert metadata["family"] == "wan" and metadata["model_config"]["lora"]["alpha"] == 8
    assert metadata["input_size"] == [2, 4, 4]  # the first bucket's 5 frames of 32 px: (5 - 1) / 4 + 1, 8x smaller
    # each clip in the bucket of its aspect, cached at its size: the wide bikes clips at 32 x 64
    monkeypatch.chdir(workdir)  # the index names its cache files from the run's folder
    data = LatentDataset(layout.stage_index("stage1"))
    for position, clip_id in enumerate(data.index["id"]):
        wide = clip_id.startswith("bikes")
        assert data.buckets[position] == int(wide) and data[position][0].shape == (16, 2, 4, 8 if wide else 4)
    assert len(data.bucket_rows()) == 2
    held_out = table.read(workdir / layout.validation_index("stage1"))
    assert set(held_out["bucket"]) == {0}  # the square cuts_a clips

    # the stage's LoRA, exported as diffusers' file, in a WanPipeline of the same base
    from diffusers import WanPipeline

    print(wan.export_stage_lora(checkpoint, tmp_path / "lora", use_ema=False))
    model, _ = wan.load_trained(checkpoint, use_ema=False)
    pipe = WanPipeline.from_pretrained(str(workdir / "models" / "tiny-wan"))
    pipe.load_lora_weights(str(tmp_path / "lora"))
    g = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 16, 2, 4, 4, generator=g), torch.randn(2, 32, 32, generator=g)
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        ours = model(latents, t, text, torch.ones(2, 32, dtype=torch.long))
    assert (ours - theirs).abs().max() < 1e-5
