"""Caption-video match: how well a clip's caption describes its frames, by CLIP.

The mean over a few frames of the cosine similarity between CLIP's image embedding of the frame
and its text embedding of the caption (Open-Sora 1.2 and NeMo Curator score caption alignment
this way). The model is any `CLIPModel` checkpoint with its `CLIPProcessor` (an id, a folder or
pypkg://), e.g. openai/clip-vit-large-patch14; `soraflow.demo.models.build_tiny_clip` writes a
random-weight one. The caption is cut to the text model's context (77 tokens for OpenAI's).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from soraflow.core.devices import device_and_dtype
from soraflow.core.hub import resolve_model_ref
from soraflow.data import video


class MatchScorer:
    def __init__(self, model, processor, device):
        self.model, self.processor, self.device = model, processor, torch.device(device)
        self.max_tokens = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, model_ref: str, device: str | None = None) -> MatchScorer:
        from transformers import CLIPModel, CLIPProcessor

        path = resolve_model_ref(model_ref)
        device = device or device_and_dtype()[0]
        model = CLIPModel.from_pretrained(path).to(device).eval()
        return cls(model, CLIPProcessor.from_pretrained(path), device)

    @torch.no_grad()
    def score_images(self, images, caption: str) -> torch.Tensor:
        """Cosine similarity of each RGB uint8 image ([N,H,W,3]) with the caption."""
        inputs = self.processor(text=[caption], images=[image.numpy() for image in images], return_tensors="pt",
                                padding=True, truncation=True, max_length=self.max_tokens).to(self.device)  # fmt: skip
        out = self.model(**inputs)
        images_, text = out.image_embeds.float(), out.text_embeds.float()  # both L2-normalised by CLIPModel
        return (images_ @ text.T).squeeze(-1).cpu()

    def score_clip(self, path: str | Path, num_frames: int, caption: str, frames: int = 3) -> float:
        indices = sorted(set(video.at_positions(num_frames, video.spread_positions(frames))))
        return float(self.score_images(video.read_frames(path, indices), caption).mean())


@cache
def load_scorer(model_ref: str) -> MatchScorer:
    """The scorer for an id or path, loaded once per process."""
    return MatchScorer.from_pretrained(model_ref)
