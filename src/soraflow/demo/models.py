"""Small random-weight models, saved so that `from_pretrained(dir)` loads them like a hub id.

There is no hub access here, so the captioner (LLaVA), the frame autoencoder (SD-VAE
shape) and a T5 text encoder are built locally at toy sizes. Each is written with
`save_pretrained` through the same classes the real checkpoints use, which keeps the
code paths that load real weights exercised. Tokenizers are trained with `tokenizers`
on a corpus of scene descriptions generated here. Builds are seeded and deterministic.
"""

from __future__ import annotations

import itertools
import json
import random
import string
from pathlib import Path

import torch

from soraflow.core.atomic import atomic_path

IMAGE_TOKEN = "<image>"

# LLaVA-1.5 style conversation: every image entry becomes its own <image> placeholder,
# in order, before the text of its message.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

LLAVA_DEFAULTS = {
    "seed": 0,
    "vocab_size": 2000,  # target; a corpus this small yields fewer merges
    "image_size": 64,
    "patch_size": 16,
    "vision_hidden_size": 64,
    "vision_layers": 2,
    "vision_heads": 4,
    "text_hidden_size": 256,
    "text_layers": 5,
    "text_heads": 4,
    "text_intermediate_size": 688,
    "max_position_embeddings": 1024,
}
VAE_DEFAULTS = {
    "seed": 0,
    "block_out_channels": [32, 32, 64, 64],  # 4 blocks: x8 spatial downsampling, as SD-VAE
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "scaling_factor": 0.18215,
}
AESTHETIC_DEFAULTS = {
    "seed": 0,
    "image_size": 64,
    "patch_size": 16,
    "hidden_size": 64,
    "layers": 2,
    "heads": 4,
    "projection_dim": 32,
    "head_hidden": [16, 8],
}
CLIP_DEFAULTS = {
    "seed": 0,
    "vocab_size": 2000,
    "image_size": 64,
    "patch_size": 16,
    "hidden_size": 64,
    "layers": 2,
    "heads": 4,
    "projection_dim": 32,
    "max_position_embeddings": 77,  # OpenAI CLIP's text context
}
WAN_DEFAULTS = {
    "seed": 0,
    "vocab_size": 1000,
    # UMT5 text encoder (Wan's is UMT5-XXL: 4096 wide)
    "text_d_model": 32,
    "text_d_kv": 8,
    "text_d_ff": 64,
    "text_layers": 2,
    "text_heads": 4,
    # AutoencoderKLWan: 16 latent channels, 4x in time, 8x in space, as Wan 2.1's, at a toy width
    "vae_base_dim": 4,
    "vae_dim_mult": [1, 1, 1, 1],
    "vae_res_blocks": 1,
    # WanTransformer3DModel (Wan2.1-T2V-1.3B: 12 heads of 128, ffn 8960, 30 layers)
    "heads": 2,
    "head_dim": 12,  # rotary embedding: 4 channels each for time, height and width
    "ffn_dim": 48,
    "layers": 2,
    "freq_dim": 32,
    "flow_shift": 3.0,
}
T5_DEFAULTS = {
    "seed": 0,
    "vocab_size": 1000,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
}

SUBJECTS = [
    "a man", "a woman", "a child", "two dogs", "a cat", "a red car", "a cyclist", "a flock of birds",
    "a group of friends", "an old fisherman", "a rabbit", "a horse", "a chef", "a dancer", "a train",
    "a sailing boat", "a skateboarder", "a herd of cattle", "a street musician", "a robot",
]
ACTIONS = [
    "walks slowly along", "runs across", "rides through", "sits quietly in", "dances in", "jumps over a fence in",
    "looks around", "drives down", "plays with a ball in", "waves at the camera in", "cooks dinner in",
    "crosses", "rests under a tree in", "flies over", "moves through",
]
SETTINGS = [
    "a busy city street", "a green meadow", "a snowy forest", "a sandy beach at sunset", "a quiet kitchen",
    "a crowded market", "a mountain road", "a dark room lit by candles", "a park in autumn", "a rainy harbour",
    "a desert under a clear sky", "a colourful test pattern", "a small village", "an empty stadium",
]
CAMERA = [
    "The camera pans slowly to the left.", "The camera zooms in on the subject.", "The camera stays still.",
    "The shot is handheld and shaky.", "The camera follows from behind.", "The scene is filmed from above.",
    "The camera tilts up towards the sky.", "The light is warm and soft.", "Colours are bright and saturated.",
    "The footage is in slow motion.",
]


def scene_corpus(num_sentences: int = 600, seed: int = 0) -> list[str]:
    """Video-description sentences made from word lists (the tokenizers' training text)."""
    rng = random.Random(seed)
    combos = list(itertools.product(SUBJECTS, ACTIONS, SETTINGS))
    rng.shuffle(combos)
    sentences = []
    for subject, action, setting in combos[:num_sentences]:
        opening = rng.choice(["", "The video shows ", "In this clip, ", "Here, "])
        line = f"{opening}{subject} {action} {setting}. {rng.choice(CAMERA)}"
        sentences.append(line[0].upper() + line[1:])
    return sentences


def _atomic_build(out_dir: str | Path, build) -> Path:
    """Build into a temp dir that is renamed into place, so a present dir is a complete model."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        build(tmp)
    return Path(out_dir)


def _merged(defaults: dict, params: dict | None, what: str) -> dict:
    unknown = sorted(set(params or {}) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: unknown parameters {unknown} (known: {sorted(defaults)})")
    return {**defaults, **(params or {})}


def train_tokenizer(out_dir: str | Path | None, kind: str, vocab_size: int = 2000):
    """Train a tokenizer on `scene_corpus()` and save it to `out_dir` (if given).

    kind "llama": byte-level BPE over printable ASCII with <unk> <s> </s> <pad> and the
    <image> placeholder, prepending <s> like LLaMA. kind "t5": Unigram with T5's layout
    (<pad>=0, </s>=1, <unk>=2, </s> appended), wrapped in transformers' T5Tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = scene_corpus()
    if kind == "llama":
        from transformers import PreTrainedTokenizerFast

        specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = byte_level
        backend.decoder = decoders.ByteLevel()
        # printable ASCII only (other bytes are <unk>): a random model then cannot emit
        # control bytes or broken UTF-8, so its captions are always readable characters
        printable = [byte_level.pre_tokenize_str(char)[0][0] for char in string.printable if char not in "\r\x0b\x0c"]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=printable, show_progress=False
        )
        backend.train_from_iterator(corpus, trainer)
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            extra_special_tokens={"image_token": IMAGE_TOKEN},
        )
    elif kind == "t5":
        from transformers import T5Tokenizer

        backend = Tokenizer(models.Unigram())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>", "</s>", "<unk>"],
            unk_token="<unk>",
            initial_alphabet=list(string.printable.strip()),  # punctuation the corpus lacks is not <unk>
            show_progress=False,
        )
        backend.train_from_iterator(corpus, trainer)
        vocab = [(piece, score) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
        tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    else:
        raise ValueError(f"train_tokenizer: unknown kind {kind!r} (choose 'llama' or 't5')")
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer



def tiny_clip_vision(image_size: int, patch_size: int, hidden_size: int, layers: int, heads: int, **extra):
    """A small CLIP vision config and its image processor (the tiny LLaVA's tower, the aesthetic model)."""
    # the Pil processor: the torchvision-backed CLIPImageProcessor does not import here
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig

    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        **extra,
    )
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return config, processor


def build_tiny_llava(out_dir: str | Path, params: dict | None = None) -> Path:
    """LlavaForConditionalGeneration (CLIP vision tower + LLaMA decoder, ~5M params) and its
    LlavaProcessor, loadable with AutoModelForImageTextToText / AutoProcessor."""
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    p = _merged(LLAVA_DEFAULTS, params, "build_tiny_llava")

    def build(tmp: Path) -> None:
        tokenizer = train_tokenizer(None, "llama", vocab_size=p["vocab_size"])
        vision, image_processor = tiny_clip_vision(
            p["image_size"], p["patch_size"], p["vision_hidden_size"], p["vision_layers"], p["vision_heads"]
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=p["patch_size"],
            vision_feature_select_strategy="default",
            chat_template=LLAVA_CHAT_TEMPLATE,
            # CLIP adds a CLS token that the "default" strategy then drops: the processor
            # must count it, or the <image> runs are one token short of the features
            num_additional_image_tokens=1,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=p["text_hidden_size"],
            intermediate_size=p["text_intermediate_size"],
            num_hidden_layers=p["text_layers"],
            num_attention_heads=p["text_heads"],
            num_key_value_heads=p["text_heads"],
            max_position_embeddings=p["max_position_embeddings"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=processor.image_token_id,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        torch.manual_seed(p["seed"])
        model = LlavaForConditionalGeneration(config).eval()
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, key, getattr(tokenizer, key))
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return _atomic_build(out_dir, build)


def build_tiny_vae(out_dir: str | Path, params: dict | None = None) -> Path:
    """diffusers AutoencoderKL shaped like SD-VAE (x8 down, 4 latent channels), ~1M params."""
    from diffusers import AutoencoderKL

    p = _merged(VAE_DEFAULTS, params, "build_tiny_vae")

    def build(tmp: Path) -> None:
        torch.manual_seed(p["seed"])
        blocks = len(p["block_out_channels"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=tuple(p["block_out_channels"]),
            layers_per_block=p["layers_per_block"],
            latent_channels=p["latent_channels"],
            norm_num_groups=p["norm_num_groups"],
            scaling_factor=p["scaling_factor"],
        )
        vae.save_pretrained(tmp)

    return _atomic_build(out_dir, build)


def build_tiny_t5(out_dir: str | Path, params: dict | None = None) -> Path:
    """T5EncoderModel (d_model 64) with a trained Unigram T5Tokenizer, for the T5 text path."""
    from transformers import T5Config, T5EncoderModel

    p = _merged(T5_DEFAULTS, params, "build_tiny_t5")

    def build(tmp: Path) -> None:
        tokenizer = train_tokenizer(tmp, "t5", vocab_size=p["vocab_size"])
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=p["d_model"],
            d_kv=p["d_kv"],
            d_ff=p["d_ff"],
            num_layers=p["num_layers"],
            num_heads=p["num_heads"],
            feed_forward_proj="gated-gelu",  # as t5-v1_1, which Open-Sora uses
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(p["seed"])
        T5EncoderModel(config).save_pretrained(tmp)

    return _atomic_build(out_dir, build)


def build_tiny_aesthetic(out_dir: str | Path, params: dict | None = None) -> Path:
    """A random-weight CLIPVisionModelWithProjection (64 px, ~0.1M params), its image
    processor and an MLP head, in the layout AestheticScorer.from_pretrained loads."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModelWithProjection

    from soraflow.scoring.aesthetic import HEAD_WEIGHTS, AestheticHead, write_head_config

    p = _merged(AESTHETIC_DEFAULTS, params, "build_tiny_aesthetic")

    def build(tmp: Path) -> None:
        torch.manual_seed(p["seed"])
        config, processor = tiny_clip_vision(
            p["image_size"], p["patch_size"], p["hidden_size"], p["layers"], p["heads"], projection_dim=p["projection_dim"]
        )
        CLIPVisionModelWithProjection(config).eval().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        head = AestheticHead(p["projection_dim"], p["head_hidden"])
        # random init puts every score near 0; shift the output to the predictor's 1-10 range
        with torch.no_grad():
            head.layers[-1].bias.fill_(5.0)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp / HEAD_WEIGHTS))
        write_head_config(tmp, p["head_hidden"], p["projection_dim"], head.config["dropout"])

    return _atomic_build(out_dir, build)


def build_tiny_clip(out_dir: str | Path, params: dict | None = None) -> Path:
    """A random-weight CLIPModel (64 px images, ~0.3M params) and its CLIPProcessor, which
    soraflow.scoring.match loads like openai/clip-vit-base-patch32."""
    from tokenizers import processors
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTextConfig

    p = _merged(CLIP_DEFAULTS, params, "build_tiny_clip")

    def build(tmp: Path) -> None:
        tokenizer = train_tokenizer(None, "llama", vocab_size=p["vocab_size"])
        # CLIP's text embedding is its end-of-text token's (the highest id): end every caption with one
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A <|endoftext|>",
            special_tokens=[("<s>", tokenizer.bos_token_id), ("<|endoftext|>", tokenizer.eos_token_id)],
        )
        vision, image_processor = tiny_clip_vision(p["image_size"], p["patch_size"], p["hidden_size"], p["layers"], p["heads"])
        text = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=p["hidden_size"],
            intermediate_size=4 * p["hidden_size"],
            num_hidden_layers=p["layers"],
            num_attention_heads=p["heads"],
            max_position_embeddings=p["max_position_embeddings"],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=p["projection_dim"])
        torch.manual_seed(p["seed"])
        CLIPModel(config).eval().save_pretrained(tmp)
        CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp)

    return _atomic_build(out_dir, build)


def build_tiny_wan(out_dir: str | Path, params: dict | None = None) -> Path:
    """A random-weight Wan 2.1 text-to-video pipeline saved as WanPipeline.save_pretrained writes it
    (the folder layout of Wan-AI/Wan2.1-T2V-1.3B-Diffusers: transformer, vae, text_encoder,
    tokenizer, scheduler), so the Wan family loads it as it loads the hub's."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    p = _merged(WAN_DEFAULTS, params, "build_tiny_wan")

    def build(tmp: Path) -> None:
        # T5Tokenizer(vocab=...): transformers 5 ignores a vocab_file (train_tokenizer passes the pieces)
        tokenizer = train_tokenizer(None, "t5", vocab_size=p["vocab_size"])
        torch.manual_seed(p["seed"])
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=p["text_d_model"], d_kv=p["text_d_kv"], d_ff=p["text_d_ff"],
            num_layers=p["text_layers"], num_heads=p["text_heads"], feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
        vae = AutoencoderKLWan(base_dim=p["vae_base_dim"], dim_mult=p["vae_dim_mult"], num_res_blocks=p["vae_res_blocks"])
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=p["heads"], attention_head_dim=p["head_dim"], in_channels=16,
            out_channels=16, text_dim=p["text_d_model"], freq_dim=p["freq_dim"], ffn_dim=p["ffn_dim"],
            num_layers=p["layers"])
        scheduler = FlowMatchEulerDiscreteScheduler(shift=p["flow_shift"])
        WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(), scheduler=scheduler,
                    transformer=transformer.eval()).save_pretrained(tmp)

    return _atomic_build(out_dir, build)


BUILDERS = {
    "tiny-llava": build_tiny_llava,
    "tiny-vae": build_tiny_vae,
    "tiny-t5": build_tiny_t5,
    "tiny-aesthetic": build_tiny_aesthetic,
    "tiny-clip": build_tiny_clip,
}


def build_all(out_dir: str | Path, params: dict | None = None) -> dict[str, Path]:
    """Build every tiny model under `out_dir`; a model dir already present is complete
    (builds are renamed into place) and is kept.

    `params` is the config's local_models section: its out_dir is the caller's to pass,
    and any other key names a model whose build parameters it overrides.
    """
    overrides = {key: value for key, value in (params or {}).items() if key != "out_dir"}
    unknown = sorted(set(overrides) - set(BUILDERS))
    if unknown:
        raise ValueError(f"local_models: unknown models {unknown} (known: {sorted(BUILDERS)})")
    paths = {}
    for name, builder in BUILDERS.items():
        path = Path(out_dir) / name
        paths[name] = path if path.is_dir() else builder(path, overrides.get(name))
    return paths
