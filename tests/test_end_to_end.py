"""The whole workflow, run by real Snakemake on real footage, in a temporary directory.

The tests share one finished tiny run (tests/workflow_run.py: two real videos plus one broken
file, one shard per video, a handful of training steps); the ones that change a setting and
re-run work on a copy of it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from workflow_run import copy_run, planned_jobs, run_snakemake

from soraflow.data import table, video
from soraflow.models.checkpoint import load_for_sampling
from soraflow.workflow.layout import Layout

pytestmark = pytest.mark.slow


# --- what a config change re-runs, against the declaration (schemas/affects.yaml) ------------
# Keys that only move files: what is planned depends on what else points at the new folder.
MOVES_FILES = {"data.root", "demo.out_dir", "local_models.out_dir"}
# Keys that change the shape of the DAG (shard count, wildcards): closure taken on the new DAG.
RESHAPES_DAG = {"data.shard_size", "data.manifest", "sample.prompts", "sample.training_captions"}
# Keys that need others changed with them: the Wan family needs Wan's VAE, text encoder and stage
# sizes (tests/test_wan_workflow.py switches them together and checks what re-runs)
CHANGED_TOGETHER = {"model.family"}


def downstream(dag: dict[tuple, dict], start: set[tuple]) -> set[tuple]:
    """`start` and every job that reads, directly or not, a file one of them writes."""
    readers = {}
    for job, files in dag.items():
        for path in files["input"]:
            readers.setdefault(path, set()).add(job)
    seen, todo = set(start), list(start)
    while todo:
        for path in dag[todo.pop()]["output"]:
            for reader in readers.get(path, ()):
                if reader not in seen:
                    seen.add(reader)
                    todo.append(reader)
    return seen


def step_of(job: tuple) -> tuple[str, str | None]:
    """A job's step and stage: train_stage2 -> (train, stage2); encode_video stage=stage1 -> ..."""
    rule, wildcards = job
    for family in ("train", "sample"):
        if rule.startswith(family + "_"):
            return family, rule.removeprefix(family + "_")
    stage = re.search(r"stage=(\w+)", wildcards)
    return rule, stage and stage.group(1)


def leaves(config: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Every settable value of a config: (dotted path, value); lists and empty objects are values."""
    out = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += leaves(value, path + ".")
        else:
            out.append((path, value))
    return out


NON_NULL = {"split.fps": 12.0, "split.shorter_side": 64, "score.aesthetic_model": "models/tiny-aesthetic",
            "stdit.hidden_size": 96, "stdit.depth": 2, "stdit.num_heads": 2, "stdit.patch_size": [1, 2, 2],
            "stdit.attention": "full", "stdit.class_dropout_prob": 0.2, "vae.scaling_factor": 0.5,
            "vae.subfolder": "vae", "text_encoder.subfolder": "text_encoder"}  # fmt: skip


def another_value(path: str, value, schema: dict):
    """A valid value different from `value` for the key at `path`."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "init":
        return None  # a later stage from scratch (a first one: see the caller)
    if value is None:
        if ".filters." in path:
            return 0.0
        if "resources." in path or path.startswith("cluster."):
            return 1
        return NON_NULL.get(path, {"space_scale": 0.5, "grad_checkpointing": True, "finetune": "full",
                                   "buckets": [[1, 32, 32], [1, 32, 64]]}.get(leaf))
    if isinstance(value, bool):
        return not value
    enum = schema.get("enum")
    if enum:
        return next(choice for choice in enum if choice not in (value, None))
    if isinstance(value, int):
        return value * 2 if leaf == "resolution" else value + 1  # a size stays a multiple of the latent grid
    if isinstance(value, float):
        return value / 2 if value > 0 else 0.25
    if isinstance(value, str):
        return {"stdit.preset": "STDiT-tiny"}.get(path, value + "-b")
    if isinstance(value, dict):
        return {"runtime": 99}
    if path == "demo.videos":
        return [{**value[0], "fps": value[0]["fps"] + 1}]
    if path == "caption.positions":
        return [0.25, 0.5, 0.75]
    return value[:-1] if len(value) > 1 else [value[0] + " at dusk"]


def schema_node(schema: dict, path: str) -> dict:
    node = schema
    for part in path.split("."):
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
        node = node.get("properties", {}).get(part, node.get("additionalProperties", {}))
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node if isinstance(node, dict) else {}


def test_every_config_key_re_runs_exactly_what_it_declares(finished_run):
    """Change each key of a finished run in turn; Snakemake must plan exactly the jobs of the
    steps schemas/affects.yaml names for it (for a stage key, that stage's) and every job
    downstream of them in the DAG, and nothing for an operational key."""
    from soraflow.workflow.settings import ALL, declared_steps, schema, with_defaults

    workdir = finished_run.workdir
    base = yaml.safe_load((workdir / "config.yaml").read_text())
    assert planned_jobs(workdir) == {}, "the finished run is not up to date"
    base_dag = planned_jobs(workdir, forceall=True)
    checked, mismatches = [], []
    for path, value in leaves(with_defaults(base)):
        if path in MOVES_FILES or path in CHANGED_TOGETHER:
            continue
        config = yaml.safe_load(yaml.safe_dump(base))
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = another_value(path, value, schema_node(schema(), path))
        if path in ("train.nproc_per_node", "train.sp_size"):
            # sequence parallelism needs as many processes, and each process a GPU (operational too)
            config.setdefault("train", {})["nproc_per_node"] = node[leaf]
            for stage in config["stages"].values():
                stage.setdefault("resources", {})["gpus_per_node"] = node[leaf]
        if leaf == "buckets":  # which then set the stage's sizes in place of these
            del node["num_frames"], node["resolution"]
        if leaf == "init" and value is None:  # a first stage starts from a PixArt-style .pth instead
            node[leaf] = str(workdir / "pixart.pth")
            (workdir / "pixart.pth").touch()
        if path == "data.manifest":
            node[leaf] = str(workdir / "manifest_copy.csv")
            (workdir / "manifest_copy.csv").write_text(Path(value).read_text())
        (workdir / "config_key.yaml").write_text(yaml.safe_dump(config))
        planned = set(planned_jobs(workdir, "config_key.yaml"))
        dag = planned_jobs(workdir, "config_key.yaml", forceall=True) if path in RESHAPES_DAG else base_dag
        steps = declared_steps(path, with_defaults(config)) or []
        stage = path.split(".")[1] if path.startswith("stages.") else None
        declared = {job for job in dag if (ALL in steps or step_of(job)[0] in steps)
                    and (stage is None or step_of(job)[1] == stage)}  # fmt: skip
        expected = downstream(dag, declared)
        checked.append((path, sorted({step_of(job)[0] for job in planned})))
        if planned != expected:
            mismatches.append(f"{path}: planned {sorted(planned - expected)} beyond, {sorted(expected - planned)} short")
    print("\n".join(f"{path}: {steps}" for path, steps in checked))
    assert not mismatches, "\n".join(mismatches)
    assert len(checked) >= 80 and sum(not steps for _, steps in checked) >= 10  # operational keys plan nothing


def test_every_clip_decodes_with_the_frames_the_table_says(finished_run):
    workdir, layout = finished_run.workdir, finished_run.layout
    clips = table.concat([workdir / p for p in layout.shard_files("clips")])
    assert set(clips["video_id"]) == {"bikes", "cuts_a"}
    assert len(clips[clips["video_id"] == "cuts_a"]) == 3  # the three synthetic scenes
    for row in clips.itertuples():
        assert video.count_frames(workdir / row.path) == row.num_frames, row.id
        assert row.end_frame - row.start_frame == row.num_frames


def test_bad_input_is_a_reject_and_the_rest_goes_on(finished_run):
    workdir, layout = finished_run.workdir, finished_run.layout
    rejects = table.concat([workdir / p for p in layout.shard_files("rejects_ingest")])
    assert rejects["id"].tolist() == ["broken"]
    assert rejects["reason"].str.len().gt(0).all()


def test_captions_are_non_empty_strings(finished_run):
    workdir, layout = finished_run.workdir, finished_run.layout
    captioned = table.concat([workdir / p for p in layout.shard_files("captioned")])
    assert len(captioned) > 0
    assert captioned["text"].map(lambda t: isinstance(t, str) and t.strip() != "").all()


def test_checkpoints_load_and_samples_decode(finished_run):
    workdir, layout = finished_run.workdir, finished_run.layout
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


def planned_rules_for(workdir: Path, config: str) -> set[str]:
    return {rule for rule, _ in planned_jobs(workdir, config)}


@pytest.fixture(scope="module")
def rerun(finished_run, tmp_path_factory) -> tuple[Path, Layout]:
    """A copy of the finished run for the tests that change settings and run again, in turn."""
    return copy_run(finished_run.workdir, tmp_path_factory.mktemp("rerun") / "run"), finished_run.layout


def remove_final_checkpoints(workdir: Path, layout: Layout) -> None:
    """What a user does to retrain: final checkpoints are written read-only (protected()), and
    Snakemake refuses to re-run a job over a file its user cannot write, so the user removes
    them deliberately. (Root can write anything, so as root Snakemake does not refuse.)"""
    for stage in layout.stages:
        checkpoint = workdir / layout.checkpoint(stage)
        assert checkpoint.stat().st_mode & 0o222 == 0, f"{checkpoint} is writable"
        checkpoint.unlink()


def changed(workdir: Path, section: str, key: str, value) -> str:
    """A config file beside the run's, `section.key` set to `value`; its name."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config[section][key] = value
    name = f"config_{section}_{key}.yaml"
    (workdir / name).write_text(yaml.safe_dump(config))
    return name


def test_changing_the_vae_and_a_caption_setting_reruns_what_each_declares_and_retrains_from_step_0(rerun):
    """Each change alone plans its own steps; both together run once. A VAE setting keeps the
    latents' shape, so only the run identity's cache digests can tell the old checkpoints are
    stale, and new captions are new training data: every stage retrains from step 0, its old run
    kept under superseded/, and ends with other weights; what neither change touches stays."""
    workdir, layout = rerun
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    vae_only = planned_rules_for(workdir, changed(workdir, "vae", "scaling_factor", 0.5))
    assert {"encode_video", "dataset", "train_stage1", "sample_stage3"} <= vae_only
    assert not vae_only & {"split", "caption", "encode_text", "models"}
    caption_only = planned_rules_for(workdir, changed(workdir, "caption", "max_new_tokens",
                                                      config["caption"]["max_new_tokens"] + 4))  # fmt: skip
    assert {"caption", "encode_text", "dataset", "train_stage1", "train_stage3", "sample_stage3"} <= caption_only
    assert not caption_only & {"demo_videos", "shard", "ingest", "split", "models", "encode_video"}

    config["vae"]["scaling_factor"] = 0.5
    config["caption"]["max_new_tokens"] += 4
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    upstream = [workdir / p for p in layout.shard_files("clips") + layout.shard_files("scored")]
    downstream = [workdir / p for p in layout.shard_files("captioned") + [layout.latent_cache("stage1", s) for s in layout.shards]]
    before = {p: p.stat().st_mtime_ns for p in upstream + downstream}
    weights = {stage: load_for_sampling(workdir / layout.checkpoint(stage), use_ema=False)[0].state_dict()
               for stage in layout.stages}  # fmt: skip
    remove_final_checkpoints(workdir, layout)
    run_snakemake(workdir)
    assert all(p.stat().st_mtime_ns == before[p] for p in upstream)
    assert all(p.stat().st_mtime_ns > before[p] for p in downstream)
    for stage in layout.stages:
        log = (workdir / f"logs/train/{stage}.log").read_text()
        assert "from step 0," in log and "cache files" in log and "superseded" in log, log[-2000:]
        assert list((workdir / layout.run_dir(stage) / "superseded").glob("*/step-*"))  # kept, not deleted
        after = load_for_sampling(workdir / layout.checkpoint(stage), use_ema=False)[0].state_dict()
        assert any(not torch.equal(after[k], weights[stage][k]) for k in after), stage


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

    workdir, layout = finished_run.workdir, finished_run.layout
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
