"""Aesthetic score: a CLIP vision model and a small MLP head on its image embedding.

Open-Sora scores aesthetics with the LAION "improved aesthetic predictor": CLIP ViT-L/14
image embeddings, L2-normalised, fed to an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, dropout
between the first layers) trained on SAC+LOGOS+AVA ratings (roughly 1 to 10). Here a model
is a from_pretrained-style id or directory holding

  - a CLIP vision model with a projection (`CLIPVisionModelWithProjection`, or a full
    `CLIPModel` checkpoint such as openai/clip-vit-large-patch14, whose vision half loads
    the same way) and its image processor;
  - `aesthetic_head.safetensors` + `aesthetic_head.json`: the MLP, whose weights use the
    predictor's own key names (`layers.0.weight`, ...), so the released .pth converts with
    `safetensors.torch.save_file(torch.load(path))` and `write_head_config([1024, 128, 64, 16], 768)`.

A clip's score is the mean over a few frames (three by default, at 10/50/90% of the clip).
`soraflow.demo.models.build_tiny_aesthetic` writes a random-weight model of the same layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from soraflow.core.devices import device_and_dtype
from soraflow.core.hub import resolve_model_ref
from soraflow.data import video

HEAD_WEIGHTS = "aesthetic_head.safetensors"
HEAD_CONFIG = "aesthetic_head.json"
DEFAULT_POSITIONS = (0.1, 0.5, 0.9)
OPENSORA_HIDDEN = [1024, 128, 64, 16]  # the LAION predictor's MLP after CLIP L/14's 768-d embedding


class AestheticHead(nn.Module):
    """The LAION aesthetic MLP: Linear/Dropout pairs, then two final Linear layers.

    With hidden [1024, 128, 64, 16] its state-dict keys are those of the released predictor
    (layers.0, layers.2, layers.4, layers.6, layers.7)."""

    def __init__(self, input_size: int, hidden: list[int], dropout: list[float] | None = None):
        super().__init__()
        if not hidden:
            raise ValueError("aesthetic head: hidden needs at least one layer size")
        dropout = dropout if dropout is not None else [0.2, 0.2, 0.1][: len(hidden) - 1]
        dropout = dropout + [0.0] * (len(hidden) - 1 - len(dropout))
        modules: list[nn.Module] = []
        sizes = [input_size, *hidden]
        for k in range(len(hidden)):
            modules.append(nn.Linear(sizes[k], sizes[k + 1]))
            if k < len(hidden) - 1:
                modules.append(nn.Dropout(dropout[k]))
        modules.append(nn.Linear(hidden[-1], 1))
        self.layers = nn.Sequential(*modules)
        self.config = {"input_size": input_size, "hidden": list(hidden), "dropout": dropout}

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def write_head_config(out_dir: str | Path, hidden: list[int], input_size: int, dropout: list[float] | None = None) -> None:
    config = {"input_size": input_size, "hidden": list(hidden)}
    if dropout is not None:
        config["dropout"] = list(dropout)
    (Path(out_dir) / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def _head_file(ref: str, name: str) -> Path:
    local = Path(ref) / name
    if Path(ref).is_dir():
        if not local.is_file():
            raise FileNotFoundError(f"aesthetic model {ref!r}: no {name} (the MLP head) in the folder")
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(ref, name))


class AestheticScorer:
    """CLIP image embedding -> normalised -> MLP head -> one score per image."""

    def __init__(self, vision, processor, head: AestheticHead, device="cpu"):
        self.vision, self.processor, self.head, self.device = vision, processor, head, torch.device(device)

    @classmethod
    def from_pretrained(cls, model_ref: str, device: str | None = None) -> AestheticScorer:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoImageProcessor, CLIPConfig, CLIPVisionModelWithProjection

        path = resolve_model_ref(model_ref)
        device = device or device_and_dtype()[0]
        config = AutoConfig.from_pretrained(path)
        if isinstance(config, CLIPConfig):
            # a full CLIPModel checkpoint: take its vision tower and visual projection, whose
            # width is the top-level projection_dim (the vision config's own may differ)
            config = config.vision_config
            config.projection_dim = AutoConfig.from_pretrained(path).projection_dim
        vision, info = CLIPVisionModelWithProjection.from_pretrained(path, config=config, output_loading_info=True)
        broken = [*info.get("missing_keys", []), *(str(k) for k in info.get("mismatched_keys", []))]
        if broken:
            raise ValueError(f"aesthetic model {model_ref!r}: CLIP vision weights missing or mis-shaped: {broken[:5]}")
        vision = vision.to(device).eval()
        processor = AutoImageProcessor.from_pretrained(path)
        head_config = json.loads(_head_file(path, HEAD_CONFIG).read_text())
        head = AestheticHead(head_config["input_size"], head_config["hidden"], head_config.get("dropout"))
        expected = vision.config.projection_dim
        if head_config["input_size"] != expected:
            raise ValueError(
                f"aesthetic model {model_ref!r}: head expects {head_config['input_size']}-d embeddings, CLIP gives {expected}"
            )
        head.load_state_dict(load_file(_head_file(path, HEAD_WEIGHTS)))
        return cls(vision, processor, head.to(device).eval(), device)

    @torch.no_grad()
    def score_images(self, images) -> torch.Tensor:
        """Scores of RGB uint8 images ([N,H,W,3] tensor or a list of HxWx3 arrays)."""
        images = [np.asarray(image) for image in images]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        embeds = self.vision(pixel_values=pixels).image_embeds.float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.head(embeds).cpu()

    def score_clip(self, path: str | Path, num_frames: int | None = None, positions=DEFAULT_POSITIONS) -> float:
        """Mean score of the frames at `positions` (fractions of the clip) of a video file."""
        if num_frames is None:
            num_frames = video.count_frames(path)
        indices = sorted(set(video.at_positions(num_frames, positions)))
        return float(self.score_images(video.read_frames(path, indices)).mean())


_SCORERS: dict[str, AestheticScorer] = {}


def load_scorer(model_ref: str) -> AestheticScorer:
    """The scorer for an id or path, loaded once per process."""
    if model_ref not in _SCORERS:
        _SCORERS[model_ref] = AestheticScorer.from_pretrained(model_ref)
    return _SCORERS[model_ref]
