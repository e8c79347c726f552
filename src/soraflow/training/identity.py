"""What a run's checkpoints belong to: a resumed run must be the same run.

A run's identity covers everything its result depends on: its output-changing settings
(the train rule's params, declared in schemas/affects.yaml; `steps` left out, so raising it
extends a run), its training index (which clips, in which order), every cache chunk the index
points to with its settings key (chunks are named by a digest of what their rows were made
from, so a VAE or text encoder change, or a re-cut clip, names new ones), and the digest of
its initial weights. Resources, engine, process count,
grad checkpointing and logging or checkpoint pace are not settings the run receives in its
params, so changing them resumes the run.
"""

from __future__ import annotations

import hashlib
import json

from soraflow.data import cache, table

# settings a run may change and still resume its checkpoints: it trains longer
RESUMABLE = {"stage": {"steps"}}


def file_digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def identity_parts(output_settings: dict, index_path, init_path) -> dict:
    """The identity's components, kept in each checkpoint so a mismatch can say what changed."""
    settings = {
        section: {k: v for k, v in values.items() if k not in RESUMABLE.get(section, ())}
        for section, values in output_settings.items()
    }
    index = table.read(index_path)
    caches = sorted({*index["latent_path"], *index["text_emb_path"]})
    return {
        "settings": settings,
        "index": file_digest(index_path),
        # a chunk file is named by a digest of its rows' keys (settings + what each row was made
        # from), so its name and key stand for its content without reading a stage's terabyte
        "caches": {path: cache.chunk_key(path) for path in caches},
        "init": init_path and file_digest(init_path),
    }


def digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def what_changed(old: dict, new: dict) -> list[str]:
    """Readable differences between two identities' parts (settings key by key)."""
    changes = []
    old_settings, new_settings = old.get("settings", {}), new["settings"]
    for section in sorted({*old_settings, *new_settings}):
        before, after = old_settings.get(section, {}), new_settings.get(section, {})
        for key in sorted({*before, *after}):
            if before.get(key) != after.get(key):
                changes.append(f"{section}.{key}: {before.get(key)!r} -> {after.get(key)!r}")
    if old.get("index") != new["index"]:
        changes.append("the training index (which clips)")
    changed_caches = sorted(path for path in {*old.get("caches", {}), *new["caches"]}
                            if old.get("caches", {}).get(path) != new["caches"].get(path))  # fmt: skip
    if changed_caches:
        changes.append(f"{len(changed_caches)} cache files ({', '.join(changed_caches[:3])}{', ...' if len(changed_caches) > 3 else ''})")
    if old.get("init") != new["init"]:
        changes.append("the initial weights")
    return changes
