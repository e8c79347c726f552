"""What a captioner needs of a GPU, and so how a caption job places it: one replica per GPU
where the model and a batch's generation fit one, the model's layers spread over the job's GPUs
(a device_map) where they do not. Torch-free: `soraflow plan` (run whenever the workflow parses)
and the caption job decide with the same numbers.

A LLaVA-family model needs, besides its weights, the keys and values of every token of the
batch while it generates (the KV cache), and at the prompt's forward the MLP's widest
intermediate tensors. Its prompt holds, per frame, the image's tokens: for LLaVA-1.5 one
grid of patches (576 at 336 px, patch 14); for LLaVA-NeXT (1.6, "anyres") the base image plus
the tiles of the grid it picks from `image_grid_pinpoints`, with one newline token per row of
patches: at most 576 + 4 x 576 + 48 = 2,928 per frame for LLaVA-1.6 (the 2x2 grid; a wide
frame drops its padding rows and needs fewer). With LLaVA-1.6-34B's Yi-34B decoder (60 layers,
8 key-value heads of 128) a token's keys and values take 240 KiB in bf16, so the preset's 8
clips of 3 frames and 300 new tokens hold 17 GiB of KV cache beside 65 GiB of weights: more
than an 80 GB GPU, so it spreads over two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 2**30
RESERVED = 2 * GIB  # per GPU: CUDA context, allocator slack
BYTES = 2  # captioners run in bf16 on a GPU (soraflow.core.devices)
# what the recipe's hub captioner's config.json holds of these sizes, for planning without it
# (llava-hf/llava-v1.6-34b-hf: CLIP ViT-L/14-336 and Nous-Hermes-2-Yi-34B)
HUB_CONFIGS = {
    "llava-hf/llava-v1.6-34b-hf": {
        "model_type": "llava_next",
        "vision_feature_select_strategy": "default",
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "vision_config": {"image_size": 336, "patch_size": 14},
        "text_config": {"hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
                        "num_attention_heads": 56, "num_key_value_heads": 8},
    },
}


@dataclass
class CaptionerMemory:
    weights: float
    kv_cache: float  # the batch's keys and values at the last new token
    prefill: float  # the MLP's intermediate tensors at the prompt's forward
    batch: int
    tokens_per_clip: int
    image_tokens_per_frame: int

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.prefill


def image_tokens_per_frame(config: dict) -> int:
    """The most image tokens one frame can take in the prompt (see the module docstring)."""
    vision = config["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    base = side * side + (1 if config.get("vision_feature_select_strategy", "default") == "full" else 0)
    pinpoints = config.get("image_grid_pinpoints")
    if config.get("model_type") == "llava" or not pinpoints:
        return base
    size = vision["image_size"]
    return base + max((h // size) * (w // size) * side * side + (h // size) * side for h, w in pinpoints)


def kv_bytes_per_token(config: dict) -> int:
    """A token's keys and values in every layer of the decoder, in bf16."""
    text = config["text_config"]
    heads = text["num_attention_heads"]
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return 2 * text["num_hidden_layers"] * (text.get("num_key_value_heads") or heads) * head_dim * BYTES


def prompt_text_tokens(prompt: str) -> int:
    """The request's tokens: about four characters a token, and the chat template's few dozen."""
    return len(prompt) // 4 + 32


def captioner_memory(parameters: int, config: dict, params: dict) -> CaptionerMemory:
    """Bytes a captioner of `parameters` weights and this config.json needs on GPU for a batch
    of `params["batch_size"]` clips (the caption section's num_frames, prompt, max_new_tokens)."""
    text = config["text_config"]
    per_token = kv_bytes_per_token(config)
    image = image_tokens_per_frame(config)
    prompt = params["num_frames"] * image + prompt_text_tokens(params["prompt"])
    tokens = prompt + params["max_new_tokens"]
    batch = params["batch_size"]
    # gate and up projections and their product, for every prompt token of the batch
    intermediate = text.get("intermediate_size") or 4 * text["hidden_size"]
    return CaptionerMemory(weights=parameters * BYTES, kv_cache=batch * tokens * per_token,
                           prefill=3 * batch * prompt * intermediate * BYTES, batch=batch, tokens_per_clip=tokens,
                           image_tokens_per_frame=image)


def placement(memory: CaptionerMemory, gpu_bytes: float | None, gpus: int) -> tuple[str, str]:
    """("replicas", why) where the weights and a batch's generation fit one GPU (one replica per
    GPU, the shard's batches shared between them); ("device_map", why) where they fit only
    spread over the job's GPUs; ("none", why) where not even that. gpu_bytes None: a device
    whose size torch does not tell (the CPU), taken to fit."""
    need = (f"weights {gib(memory.weights)} + KV cache {gib(memory.kv_cache)} ({memory.batch} clips x "
            f"{memory.tokens_per_clip:,} tokens, {memory.image_tokens_per_frame:,} per frame) + prefill "
            f"{gib(memory.prefill)} = {gib(memory.total)}")
    if gpu_bytes is None:
        return "replicas", f"one replica per device ({gpus}): {need}"
    usable = gpu_bytes - RESERVED
    if memory.total <= usable:
        return "replicas", f"one replica per GPU ({gpus}): {need} fits one GPU's {gib(usable)} usable"
    largest = fitting_batch(memory, usable)
    hint = f"; batch_size {largest} would fit one" if largest else ""
    if gpus > 1 and memory.total <= gpus * usable:
        return "device_map", f"layers spread over {gpus} GPUs: {need} exceeds one GPU's {gib(usable)} usable{hint}"
    return "none", f"{need} exceeds {gpus} GPU(s) of {gib(usable)} usable{hint}"


def fitting_batch(memory: CaptionerMemory, usable: float) -> int:
    """The largest batch whose generation fits one GPU beside the weights (0: none)."""
    per_clip = (memory.kv_cache + memory.prefill) / memory.batch
    return max(0, math.floor((usable - memory.weights) / per_clip))


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"
