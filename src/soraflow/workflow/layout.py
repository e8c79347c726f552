"""Where every file of the workflow lives, and what each step is given.

The Snakefile and rules ask this class for paths and settings, so the layout is
importable and tested without Snakemake. The DAG grows with shards, not videos: every
per-video step is one job per shard of `data.shard_size` videos.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from functools import cached_property
from pathlib import Path

from soraflow.data import buckets
from soraflow.data.manifest import num_shards, shard_digests, shard_ids
from soraflow.models import stdit_config, wan_config
from soraflow.workflow import plan, resources, settings


def use_running_environment() -> None:
    """Jobs run the `soraflow` command of the environment that runs Snakemake, even when
    Snakemake was started as .venv/bin/snakemake without activating the venv."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ["PATH"]])


def as_json(value) -> str:
    return json.dumps(value, sort_keys=True)


def folder(paths, levels: int = 1) -> str:
    """The one folder `levels` up from every path (a rule's per-shard files all sit in one
    folder; rules that span shards pass it and the count, not 10k paths)."""
    folders = {str(Path(p).parents[levels - 1]) for p in paths}
    if len(folders) != 1:
        raise ValueError(f"expected one folder {levels} level(s) up, found {sorted(folders)[:3]}")
    return folders.pop()


class Layout:
    def __init__(self, config: dict):
        self.config = config
        data = config["data"]
        self.root = data["root"]
        self.manifest = data["manifest"]
        self.shards = shard_ids(num_shards(self.manifest, data["shard_size"]))
        self.stages = list(config["stages"])  # in the order they run
        self.models_dir = config["local_models"]["out_dir"]
        for position, stage in enumerate(self.stages):
            init = config["stages"][stage]["init"]
            if init in self.stages[position:]:
                raise ValueError(f"stages.{stage}.init: {init!r} is not an earlier stage (stages run in the "
                                 f"order listed: {', '.join(self.stages)})")
            buckets.check(stage, config["stages"][stage])
            if self.family == "wan":
                wan_config.check_stage(stage, config["stages"][stage])
            elif config["stages"][stage].get("buckets"):  # an STDiT stage's own sizes (without: as before)
                stdit_config.check_buckets(stage, config["stages"][stage], config["stdit"],
                                           plan.latent_layout(config["vae"])[1])

    @property
    def family(self) -> str:
        return settings.model_family(self.config)

    # --- data ----------------------------------------------------------------------------
    def shard_file(self, name: str, shard="{shard}") -> str:
        return f"{self.root}/shards/{shard}/{name}.parquet"

    def shard_files(self, name: str) -> list[str]:
        return [self.shard_file(name, s) for s in self.shards]

    def shard_digest(self, shard: str) -> str:
        """A digest of the shard's manifest rows: the shard job's params, so it re-runs when its
        rows change, never for rows added after them. The manifest is read at most once."""
        return self._shard_digests[int(shard)]

    @cached_property
    def _shard_digests(self) -> list[str]:
        return shard_digests(self.manifest, self.config["data"]["shard_size"], len(self.shards),
                             remember_in=".snakemake/soraflow/manifest_digests.json")  # in the working directory

    def raw_dir(self) -> str:
        return f"{self.root}/raw"

    def clip_dir(self, shard="{shard}") -> str:
        return f"{self.root}/clips/{shard}"

    def dedup_rejects(self) -> str:
        """Near-duplicates across the corpus: the clips every stage leaves out (soraflow dedup)."""
        return f"{self.root}/dedup/rejects.parquet"

    def exports(self) -> dict[str, str]:
        """The export rule's outputs: every captioned clip (parquet), the CSVs Open-Sora 1.0 (headerless)
        and 1.1+ (with a header) read, all rejects."""
        return {
            "table": "results/clips.parquet",
            "opensora_v1_0_csv": "results/clips_opensora-v1.0.csv",
            "opensora_v1_1_csv": "results/clips_opensora-v1.1.csv",
            "rejects": "results/rejects.parquet",
        }

    def demo_videos(self) -> list[str]:
        demo = self.config["demo"]
        return [f"{demo['out_dir']}/{v['name']}.mp4" for v in demo["videos"]]

    # --- models ----------------------------------------------------------------------------
    def local_models(self) -> dict[str, str]:
        """The tiny models the `models` rule builds, by name."""
        return {name: f"{self.models_dir}/{name}" for name in ("tiny-llava", "tiny-vae", "tiny-t5", "tiny-aesthetic", "tiny-clip")}

    def tiny_wan(self) -> str:
        """The tiny random-weight Wan pipeline (the wan_model rule's, built only when a config names it)."""
        return f"{self.models_dir}/tiny-wan"

    def model_input(self, ref: str) -> list[str]:
        """A model the `models` or `wan_model` rule builds is an input; hub ids and other paths are not."""
        return [ref] if ref and ref in [*self.local_models().values(), self.tiny_wan()] else []

    def base_model(self) -> list[str]:
        """The weights the stages fine-tune, where the workflow builds them (the Wan family's wan.model)."""
        return self.model_input(self.config["wan"]["model"]) if self.family == "wan" else []

    # --- caches and training ---------------------------------------------------------------
    def latent_cache(self, stage="{stage}", shard="{shard}") -> str:
        """A stage's latent cache index of a shard (its chunk files lie in the folder of the same name)."""
        return f"{self.root}/cache/latents/{stage}/{shard}.json"

    def text_cache(self, shard="{shard}") -> str:
        """A shard's text cache index (its chunk files lie in the folder of the same name)."""
        return f"{self.root}/cache/text/{shard}.json"

    def stage_index(self, stage="{stage}") -> str:
        return f"{self.root}/train/{stage}/index.parquet"

    def stage_rejects(self, stage="{stage}") -> str:
        return f"{self.root}/train/{stage}/rejects.parquet"

    def validation_index(self, stage="{stage}") -> str:
        """The stage's held-out clips (validation.fraction), indexed like its training clips."""
        return f"{self.root}/train/{stage}/validation.parquet"

    def checkpoint(self, stage: str) -> str:
        return f"results/checkpoints/{stage}.safetensors"

    def init_checkpoint(self, stage: str) -> list[str]:
        """The previous stage's checkpoint, a checkpoint path (e.g. PixArt-α), or nothing."""
        init = self.config["stages"][stage]["init"]
        if not init:
            return []
        return [self.checkpoint(init)] if init in self.stages else [init]

    def run_dir(self, stage: str) -> str:
        return f"results/runs/{stage}"

    def loss_log(self, stage: str) -> str:
        """The finished stage's loss log (the run folder keeps the live one)."""
        return f"results/losses/{stage}.csv"

    def validation_log(self, stage: str) -> str:
        """The finished stage's validation losses (the run folder keeps the live one)."""
        return f"results/losses/{stage}_validation.csv"

    def report_figures(self) -> dict[str, str]:
        return {name: f"results/report/{name}.{ext}" for name, ext in (("dataset", "png"), ("gallery", "html"), ("filters", "html"), ("losses", "png"), ("validation", "html"))}

    def train_job(self, stage: str) -> dict:
        """The stage's training job: Slurm resources, processes per node, retries (soraflow.workflow.resources)."""
        return resources.train_job(self.config, stage)

    def train_environment(self, workflow_dir: str) -> dict[str, str]:
        """Where the train rule runs `soraflow`: the colossalai engine pins torch 2.5.1, so its
        jobs run in an environment of their own, `.venv-colossalai` (`make` builds it) or
        envs/colossalai.yaml under --use-conda, which lacks soraflow itself: the workflow's
        src/ goes on PYTHONPATH. {"conda": env file (relative to rules/), "command": ...}."""
        if self.config["train"]["engine"] != "colossalai":
            return {"conda": "../envs/soraflow.yaml", "command": "soraflow"}
        venv_bin, src = Path(workflow_dir, ".venv-colossalai", "bin"), Path(workflow_dir, "src")
        python_path = f'{shlex.quote(str(src))}${{PYTHONPATH:+:$PYTHONPATH}}'
        command = f'PATH={shlex.quote(str(venv_bin))}:"$PATH" PYTHONPATH={python_path} python -m soraflow.cli'
        return {"conda": "../envs/colossalai.yaml", "command": command}

    def step_job(self, step: str, stage: str | None = None) -> dict:
        """A per-shard (or per-stage: sample) job's Slurm resources (caption, encode_video, ...)."""
        return {k: v for k, v in resources.step_job(self.config, step, stage).items() if k != "retries"}

    def step_retries(self, step: str, stage: str | None = None) -> int:
        """How many times the job may be resubmitted: the links of its chain, when it needs longer
        than cluster.max_runtime (each resumes the last), and FAILURE_RETRIES."""
        return resources.step_job(self.config, step, stage)["retries"]

    def samples(self, stage: str) -> list[str]:
        count = len(self.config["sample"]["prompts"])
        return [f"results/samples/{stage}/sample_{k:02d}.mp4" for k in range(count)]

    def caption_samples(self, stage: str) -> list[str]:
        """Samples from the captions of `sample.training_captions` of the stage's own clips."""
        count = self.config["sample"]["training_captions"]
        return [f"results/samples/{stage}/training_{k:02d}.mp4" for k in range(count)]

    def sample_comparison(self, stage: str) -> list[str]:
        """Figure and table of caption samples beside their training clips (none without them)."""
        if not self.caption_samples(stage):
            return []
        return [f"results/samples/{stage}/vs_training.png", f"results/samples/{stage}/vs_training.csv"]

    def sample_videos(self, stage: str) -> list[str]:
        return self.samples(stage) + self.caption_samples(stage)

    def all_samples(self) -> list[str]:
        """Every stage's sample videos and comparisons."""
        return [path for stage in self.stages for path in self.sample_videos(stage) + self.sample_comparison(stage)]

    # --- settings each step receives (soraflow.workflow.settings) ------------------------------
    def params(self, step: str, stage: str | None = None) -> str:
        """The settings that change the step's outputs, as the rule's params (JSON)."""
        return as_json(settings.params(self.config, step, stage))

    def operational(self, step: str, stage: str | None = None) -> str:
        """The settings that never change the step's outputs (JSON); rules pass them to their
        command as a resource, outside `params`, so changing one re-runs nothing."""
        return as_json(settings.operational(self.config, step, stage))

    def all_settings(self, step: str, stage: str | None = None) -> str:
        """Both, merged, as the step's function receives them (JSON): what another step (the
        sample grids during training, for `sample`) runs with, passed as a resource."""
        return as_json(settings.merged(settings.params(self.config, step, stage),
                                       settings.operational(self.config, step, stage)))
