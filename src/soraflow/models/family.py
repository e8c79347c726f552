"""Model families (`model.family`): what a stage trains, how, and how it is sampled.

    stdit  Open-Sora 1.0's STDiT with IDDPM (eps and learned variance), from random weights, a
           previous stage, or a PixArt-α / Open-Sora 1.0 .pth
    wan    Wan 2.1's WanTransformer3DModel (diffusers) with flow matching, fine-tuned in full or as
           a LoRA from a diffusers pipeline's transformer (`wan.model`) or a previous stage

A resumable checkpoint holds only the parameters that train, so a family's `build` for a resumed
run (`initial` False) still reads the weights it keeps frozen (a LoRA's base), and `frozen_files`
names their files for the run's identity: a base changed under a run is a new run, not a resume.

The trainer and the sampler reach a family only through `Family`'s methods; the autoencoder and
the text encoder are the config's `vae` and `text_encoder` (soraflow.models.encoders), which the
encode jobs cache and the sampler decodes with. The Wan family's module is imported by name, only
when chosen: the STDiT path imports no diffusers.
"""

from __future__ import annotations

import importlib

from soraflow.models import checkpoint as files
from soraflow.models.diffusion import IDDPM
from soraflow.models.stdit import build_model

DEFAULT = "stdit"


class STDiTFamily:
    name = "stdit"

    def model_config(self, params: dict, stage: dict, channels: int, caption_channels: int,
                     grad_checkpointing: bool) -> dict:
        # a stage may set its own space_scale (Open-Sora: 0.5 at 256 px, 1.0 at 512 px)
        own = {"space_scale": stage["space_scale"]} if stage.get("space_scale") is not None else {}
        return {**params["stdit"], **own, "in_channels": channels, "caption_channels": caption_channels,
                "grad_checkpointing": grad_checkpointing}

    def build(self, model_config: dict, input_size, init_path: str | None, initial: bool):
        """(the model, what its initial weights were): a previous stage's checkpoint (its raw weights),
        or a PixArt-α / Open-Sora 1.0 .pth (what does not fit is an error naming the file and the
        keys). Without `initial` (a resumed run) its checkpoint is read over the model instead."""
        model = build_model(model_config, input_size=input_size)
        report = {}
        if initial and init_path:
            if files.is_torch_checkpoint(init_path):
                report = {"left_at_init": files.load_pretrained(model, init_path)}
            else:
                files.initialise_from_state(model, files.load_checkpoint_file(init_path, "model")[0], init_path)
        return model, report

    def frozen_files(self, model_config: dict, init_path: str | None) -> list[str]:
        return []  # STDiT trains every weight

    def objective(self, params: dict, model_config: dict) -> IDDPM:
        return IDDPM(num_timesteps=params["diffusion"]["num_timesteps"])

    def uncond_prob(self, model, objective) -> float:
        return model.y_embedder.uncond_prob


# A family other than the default is a module, imported by name when a config chooses it (the
# STDiT path, and the colossalai environment, have no diffusers): module -> its family class.
FAMILY_CLASSES = {"wan": ("soraflow.models.wan", "WanFamily")}


def load_family(name: str | None):
    name = name or DEFAULT
    if name == STDiTFamily.name:
        return STDiTFamily()
    if name not in FAMILY_CLASSES:
        raise ValueError(f"model.family: unknown family {name!r} (choose from {sorted([DEFAULT, *FAMILY_CLASSES])})")
    module, cls = FAMILY_CLASSES[name]
    return getattr(importlib.import_module(module), cls)()
