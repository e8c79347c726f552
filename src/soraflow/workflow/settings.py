"""What each step is given, split by whether it changes the step's outputs.

`schemas/affects.yaml` declares, per config key, the steps whose outputs it changes. From it
every rule gets two things: `params(step)`, exactly the output-changing settings (Snakemake
compares these to decide a re-run, and a training run's identity hashes them), and
`operational(step)`, the settings that only change how the step runs (retries, batch sizes,
logging pace, ...), which reach the job without ever re-running it. The step's function
receives both merged (`merged`). Defaults live in the schema, which validation fills in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import yaml

# What each step is given, in the shape its function takes: one section, or several by name.
# "stage" is the stage's own block of `stages`; "stage.filters" its filters.
STEP_SECTIONS: dict[str, list[str]] = {
    "demo_videos": ["demo"],
    "shard": ["data"],
    "ingest": ["ingest"],
    "split": ["split"],
    "score": ["score"],
    "match": ["score"],
    "dedup": ["dedup"],
    "models": ["local_models"],
    "caption": ["caption"],
    "encode_video": ["vae", "stage"],
    "encode_text": ["text_encoder"],
    "dataset": ["stage.filters", "validation"],
    "train": ["stage", "train", "model", "stdit", "wan", "diffusion", "validation", "tracking"],
    "sample": ["sample", "text_encoder", "vae", "diffusion"],
}
STAGE_STEPS = {"encode_video", "dataset", "train"}  # per stage: their settings depend on it
ALL = "all"


@cache
def schema() -> dict:
    return yaml.safe_load(_schema_file("config.schema.yaml"))


@cache
def affects() -> dict[str, list[str] | dict]:
    return yaml.safe_load(_schema_file("affects.yaml"))


def _schema_file(name: str) -> str:
    return resources.files("soraflow.workflow").joinpath("schemas", name).read_text()


def with_defaults(config: dict, source: str = "config") -> dict:
    """The config validated against the schema, its defaults filled in (as Snakemake's
    validate does for the workflow); an error names the key and `source`."""
    from snakemake.utils import validate

    config = copy.deepcopy(config)
    try:
        validate(config, str(resources.files("soraflow.workflow").joinpath("schemas", "config.schema.yaml")))
    except Exception as error:  # WorkflowError: the message names the key
        raise ValueError(f"{source}: {error}") from None
    return config


class ResourceError(ValueError):
    """A job that cannot run as configured; the message names the stage or step."""


def processes_per_node(config: dict, stage: str) -> int:
    resources = config["stages"][stage]["resources"]
    processes = resources["processes_per_node"] or config["train"]["nproc_per_node"]
    gpus = resources["gpus_per_node"]
    if gpus and processes > gpus:
        raise ResourceError(f"stages.{stage}: {processes} training processes per node but only {gpus} GPUs per node "
                            "(resources.gpus_per_node); each process needs a GPU of its own")
    return processes


def stages_as_listed(config: dict, configfiles, overrides: Mapping = MappingProxyType({})) -> None:
    """The stages are an ordered set, not a mapping to merge: a config file that lists stages
    (a preset given with --configfile) replaces the default config's, instead of adding its own
    beside them and overriding them key by key. The last file that lists stages wins; the
    --config values (`overrides`) then apply over its stages, as over every other key."""
    for path in configfiles:
        listed = yaml.safe_load(Path(path).read_text()) or {}
        if "stages" in listed:
            config["stages"] = listed["stages"]
    if "stages" in overrides:
        config["stages"] = merged(config["stages"], overrides["stages"])


def _declared_path(path: str) -> list[str]:
    """A config key's dotted path as affects.yaml names it (`stages.*` for every stage)."""
    parts = path.split(".")
    if parts[0] == "stages" and len(parts) > 1:
        parts[1] = "*"
    return parts


def declared_steps(path: str, config: dict | None = None) -> list[str] | None:
    """The steps a config key (dotted path, stages as `stages.<name>`) changes: its own entry or
    its nearest declared ancestor's. None where the entry's `when` does not hold in `config` (no
    step reads the key there; `config` None: wherever it holds). A key nothing declares is an
    error (the table is complete)."""
    parts = _declared_path(path)
    for end in range(len(parts), 0, -1):
        entry = affects().get(".".join(parts[:end]))
        if isinstance(entry, dict):
            holds = config is None or all(value_at(config, key) in (value if isinstance(value, list) else [value])
                                          for key, value in entry["when"].items())
            return entry["steps"] if holds else None
        if entry is not None:
            return entry
    raise KeyError(f"{path}: no entry in schemas/affects.yaml says which steps it changes")


def value_at(config: dict, path: str):
    """The config's value at a dotted path (None where it has none)."""
    for part in path.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def model_family(config: dict) -> str:
    return config.get("model", {}).get("family", "stdit")


def _section(config: dict, name: str, stage: str | None) -> tuple[str, dict]:
    """(the section's dotted path, its values) for a STEP_SECTIONS name."""
    if name.startswith("stage"):
        if stage is None:
            raise ValueError(f"{name}: a per-stage section needs the stage")
        values = config["stages"][stage]
        path = f"stages.{stage}"
        for part in name.split(".")[1:]:
            values, path = values[part], f"{path}.{part}"
        return path, values
    return name, config.get(name, {})


def _split(config: dict, step: str, stage: str | None, operational: bool) -> dict:
    names = STEP_SECTIONS[step]
    if operational and stage is None:
        names = [name for name in names if not name.startswith("stage")]
    out = {}
    for name in names:
        path, values = _section(config, name, stage)
        # a job's resources reach it as Slurm resources (soraflow.workflow.resources)
        values = {key: value for key, value in values.items() if key != "resources"}
        out[name.split(".")[0]] = _selected(config, path, values, step, operational)
    if len(STEP_SECTIONS[step]) == 1:
        return next(iter(out.values()), {})
    return {name: values for name, values in out.items() if values or not operational}


def _selected(config: dict, path: str, values: dict, step: str, operational: bool) -> dict:
    """The keys of `values` (the config's at `path`) that `step` is given, entering a mapping where
    affects.yaml declares keys inside it (a stage's filters: min_match reaches the dataset only)."""
    out = {}
    for key, value in values.items():
        child = f"{path}.{key}"
        if isinstance(value, dict) and _declared_inside(child):
            if inner := _selected(config, child, value, step, operational):
                out[key] = inner
        elif _wanted(declared_steps(child, config), step, operational):
            out[key] = value
    return out


def _declared_inside(path: str) -> bool:
    prefix = ".".join(_declared_path(path)) + "."
    return any(key.startswith(prefix) for key in affects())


def _wanted(steps: list[str] | None, step: str, operational: bool) -> bool:
    if steps is None:  # a key no step reads under this config
        return False
    return steps == [] if operational else (step in steps or ALL in steps)


def params(config: dict, step: str, stage: str | None = None) -> dict:
    """The settings of `step` that change its outputs."""
    return _split(config, step, stage, operational=False)


def operational(config: dict, step: str, stage: str | None = None) -> dict:
    """The settings of `step` that change how it runs, never what it makes."""
    return _split(config, step, stage, operational=True)


def merged(params_: dict, operational_: dict) -> dict:
    """A step's full settings: its params with its operational settings added, section by section."""
    out = copy.deepcopy(params_)
    for key, value in operational_.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out
