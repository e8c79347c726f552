"""Every shard job resumes inside itself: killed part way, its retry continues from what is done
and finishes with the bytes an uninterrupted run writes.

Each job runs as the rules run it (`soraflow <step>`, a real process) three times in one folder:
once uninterrupted, for the reference bytes; once killed with SIGKILL right as it renames its
(N+1)-th part into place (tests/kill_hook: N parts are done, the next is whole under its temp
name); then, after removing the job's declared outputs as Snakemake does before a retry, once
more, allowed to write only the parts that were missing (a retry that started over would be
killed again). Its outputs must equal the reference byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import section
from conftest_caption import tiny_models  # noqa: F401 (a fixture)

from soraflow.core.resume import JobProgress, progress_folder
from soraflow.data import table
from soraflow.data.ingest import ingest_shard
from soraflow.data.split import split_shard

HOOK = Path(__file__).parent / "kill_hook"
PARTS = "*.progress/*.part.json"  # core.resume's part files
CHUNKS = "*/*.safetensors"  # the encode jobs' cache chunks, in the folder beside the index


def soraflow(argv: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`soraflow ARGV` as a rule runs it; kill_at="PATTERN:N" kills it at its (N+1)-th rename into PATTERN."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HOOK), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env.pop("SORAFLOW_TEST_KILL_AT", None)
    if kill_at:
        env["SORAFLOW_TEST_KILL_AT"] = kill_at
    command = [str(Path(sys.executable).with_name("soraflow")), *argv]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def contents(paths: list[Path]) -> dict[str, bytes]:
    """Every file of `paths` (files, or folders and all they hold) by path."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): f.read_bytes() for f in files}


def remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def assert_resumes(argv: list[str], cwd: Path, declared: list[Path], kept: list[Path], pattern: str, total: int,
                   done: int) -> dict[str, bytes]:
    """Run, kill after `done` of `total` parts, retry; the outputs (the declared ones, and `kept`,
    files the job writes that no rule declares) equal the uninterrupted run's. Returns them."""
    reference = soraflow(argv, cwd)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = contents(declared + kept)
    assert all(str(p) in expected or p.is_dir() for p in declared), "an output is missing"
    remove(declared + kept)

    killed = soraflow(argv, cwd, kill_at=f"{cwd}/{pattern}:{done}")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert len(list(cwd.glob(pattern))) == done
    remove(declared)  # as Snakemake does before it runs the job again

    # the retry may write only the parts the killed job had not: one it wrote again would kill it
    retry = soraflow(argv, cwd, kill_at=f"{cwd}/{pattern}:{total - done}")
    assert retry.returncode == 0, retry.stderr[-3000:]
    assert contents(declared + kept) == expected
    assert not list(cwd.glob("*.progress")), "the progress folder outlived the job"
    return expected


@pytest.fixture(scope="module")
def shard(tmp_path_factory, synthetic_cut_video) -> Path:
    """A shard of three 3-scene videos: its manifest table, ingest table and clip table (9 clips)."""
    root = tmp_path_factory.mktemp("shard")
    ids = ["v0", "v1", "v2"]
    manifest = pd.DataFrame({"id": ids, "video_id": ids, "url": [str(synthetic_cut_video["path"])] * 3})
    table.write(manifest, root / "manifest.parquet")
    ingest_shard(root / "manifest.parquet", root / "raw", root / "videos.parquet", root / "rejects_ingest.parquet",
                 section("ingest"))
    split_shard(root / "videos.parquet", root / "clips", root / "clips.parquet", root / "rejects_split.parquet",
                section("split", threads=1, detector="content", threshold=27.0))  # the cheaper detector
    assert len(table.read(root / "clips.parquet")) == 9
    return root


def params(values: dict) -> list[str]:
    return ["--params", json.dumps(values)]


def test_ingest_resumes(shard, synthetic_cut_video, tmp_path):
    ids = ["a", "b", "c", "d", "e"]
    urls = [str(synthetic_cut_video["path"])] * 4 + [str(tmp_path / "missing.mp4")]  # and one reject
    table.write(pd.DataFrame({"id": ids, "video_id": ids, "url": urls}), tmp_path / "manifest.parquet")
    out = [tmp_path / "videos.parquet", tmp_path / "rejects.parquet"]
    argv = ["ingest", "manifest.parquet", "--raw-dir", "raw", "--out", str(out[0]), "--rejects", str(out[1]),
            *params(section("ingest", concurrency=1))]
    assert_resumes(argv, tmp_path, out, [], PARTS, total=5, done=2)


def test_split_resumes(shard, tmp_path):
    shutil.copy(shard / "videos.parquet", tmp_path)
    out = [tmp_path / "clips.parquet", tmp_path / "rejects.parquet", tmp_path / "clips"]
    argv = ["split", "videos.parquet", "--clip-dir", str(out[2]), "--out", str(out[0]), "--rejects", str(out[1]),
            "--threads", "1", *params(section("split", detector="content", threshold=27.0))]
    files = assert_resumes(argv, tmp_path, out, [], PARTS, total=3, done=1)
    assert sum(name.endswith(".mp4") for name in files) == 9  # every clip, the killed job's and the retry's


def test_score_resumes(shard, tmp_path):
    out = tmp_path / "scored.parquet"  # motion only, as the preset scores (and no torch to start)
    argv = ["score", str(shard / "clips.parquet"), "--out", str(out), *params(section("score", aesthetic_model=None))]
    assert_resumes(argv, tmp_path, [out], [], PARTS, total=9, done=4)


def test_caption_resumes(shard, tiny_models, tmp_path):  # noqa: F811
    out = [tmp_path / "captioned.parquet", tmp_path / "rejects.parquet"]
    settings = section("caption", model=str(tiny_models["tiny-llava"]), batch_size=2, max_new_tokens=8)
    argv = ["caption", str(shard / "clips.parquet"), "--out", str(out[0]), "--rejects", str(out[1]), *params(settings)]
    assert_resumes(argv, tmp_path, out, [], PARTS, total=5, done=2)  # 9 clips in batches of 2


def test_match_resumes(shard, tiny_models, tmp_path):  # noqa: F811
    clips = table.read(shard / "clips.parquet")
    table.write(clips.assign(text=[f"scene {i} of a test video" for i in range(len(clips))]), tmp_path / "captioned.parquet")
    out = tmp_path / "matched.parquet"
    settings = section("score", match={"model": str(tiny_models["tiny-clip"]), "frames": 2})
    argv = ["match", "captioned.parquet", "--out", str(out), *params(settings)]
    assert_resumes(argv, tmp_path, [out], [], PARTS, total=9, done=4)


def test_encode_video_resumes(shard, tmp_path):
    # 16 frames of 256 x 256 in bf16, packed: 6 MiB a clip, so two clips (micro_batch 16: one a
    # batch) fill a chunk and the shard's 9 clips make 5
    stage = {"num_frames": 16, "frame_interval": 1, "resolution": 256, "filters": {}}
    out = tmp_path / "latents.json"
    argv = ["encode-video", str(shard / "clips.parquet"), "--out", str(out),
            *params({"vae": section("vae", micro_batch=16), "stage": stage})]
    assert_resumes(argv, tmp_path, [out], [tmp_path / "latents"], CHUNKS, total=5, done=2)


def test_encode_text_resumes(tiny_models, tmp_path):  # noqa: F811
    # the tiny T5 at 32 tokens: 4 kB a caption, so a chunk fills at 4,096 captions (64 batches)
    texts = [f"clip number {i} shows scene {i % 7} from a camera {i % 3} metres away" for i in range(8500)]
    table.write(pd.DataFrame({"id": [f"c{i}" for i in range(8500)], "text": texts}), tmp_path / "captioned.parquet")
    out = tmp_path / "text.json"
    settings = section("text_encoder", model=str(tiny_models["tiny-t5"]), max_length=32)
    argv = ["encode-text", "captioned.parquet", "--out", str(out), *params(settings)]
    assert_resumes(argv, tmp_path, [out], [tmp_path / "text"], CHUNKS, total=3, done=1)


def test_progress_of_other_settings_or_inputs_is_never_reused(tmp_path):
    folder = progress_folder(tmp_path / "out.parquet")
    first = JobProgress(folder, {"settings": 1, "table": "digest-a"})
    first.add("v0", {"rows": [1.5, None]})
    assert JobProgress(folder, {"settings": 1, "table": "digest-a"}).parts() == {"v0": {"rows": [1.5, None]}}
    assert JobProgress(folder, {"settings": 2, "table": "digest-a"}).parts() == {}  # a settings change
    first = JobProgress(folder, {"settings": 2, "table": "digest-a"})
    first.add("v0", {"rows": []})
    assert JobProgress(folder, {"settings": 2, "table": "digest-b"}).parts() == {}  # an input change


def test_progress_keys_leave_out_exactly_the_operational_settings():
    """A step keys its progress by its settings less the operational ones it lists, which must
    be the ones schemas/affects.yaml declares (changing one, e.g. a smaller caption batch after
    an out-of-memory kill, keeps the work done)."""
    import yaml
    from conftest import REPO

    from soraflow.data import ingest, split
    from soraflow.scoring import caption
    from soraflow.training import encode
    from soraflow.workflow.settings import operational, with_defaults

    config = with_defaults(yaml.safe_load((REPO / "workflow_config.yaml").read_text()))
    stage = next(iter(config["stages"]))
    assert set(ingest.OPERATIONAL) == set(operational(config, "ingest"))
    assert set(split.OPERATIONAL) == set(operational(config, "split"))
    assert set(caption.OPERATIONAL) == set(operational(config, "caption"))
    assert operational(config, "score") == {}
    assert set(encode.OPERATIONAL) == set(operational(config, "encode_video", stage)["vae"])
