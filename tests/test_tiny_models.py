"""The tiny random-weight models load back through the classes real checkpoints use."""

from __future__ import annotations

import pytest
import torch
from conftest_caption import tiny_models  # noqa: F401  (session fixture)

from soraflow.demo.models import IMAGE_TOKEN, build_all, build_tiny_vae, train_tokenizer


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tiny_llava_loads_through_auto_classes(tiny_models):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

    model = AutoModelForImageTextToText.from_pretrained(tiny_models["tiny-llava"])
    processor = AutoProcessor.from_pretrained(tiny_models["tiny-llava"])
    assert isinstance(model, LlavaForConditionalGeneration)
    assert type(processor).__name__ == "LlavaProcessor"
    assert 3_000_000 < parameter_count(model) < 7_000_000
    assert processor.num_additional_image_tokens == 1
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert model.config.image_token_id == processor.image_token_id == image_token_id
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert processor.chat_template


def test_tiny_vae_and_t5_round_trip(tiny_models):
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel, T5Tokenizer

    vae = AutoencoderKL.from_pretrained(tiny_models["tiny-vae"])
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert 500_000 < parameter_count(vae) < 2_000_000
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)  # x8 down, 4 channels: SD-VAE's shapes

    encoder = T5EncoderModel.from_pretrained(tiny_models["tiny-t5"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tiny-t5"])
    assert isinstance(tokenizer, T5Tokenizer)
    batch = tokenizer(["a rabbit in a green meadow", "a red car"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    assert hidden.shape == (2, batch["input_ids"].shape[1], 64)


def test_build_all_keeps_complete_dirs_and_names_unknown_models(tiny_models):
    out_dir = tiny_models["tiny-llava"].parent
    weights = tiny_models["tiny-llava"] / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_all(out_dir, {"out_dir": str(out_dir)}) == tiny_models
    assert weights.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="tiny-gpt"):
        build_all(out_dir, {"tiny-gpt": {}})


def test_builds_are_deterministic_and_reject_unknown_params(tmp_path):
    first = build_tiny_vae(tmp_path / "a", {"block_out_channels": [16, 16, 16, 16]})
    second = build_tiny_vae(tmp_path / "b", {"block_out_channels": [16, 16, 16, 16]})
    name = "diffusion_pytorch_model.safetensors"
    assert (first / name).read_bytes() == (second / name).read_bytes()
    assert not (tmp_path / "a.tmp").exists()
    with pytest.raises(ValueError, match="build_tiny_vae.*channels"):
        build_tiny_vae(tmp_path / "c", {"channels": 8})


def test_trained_tokenizers(tmp_path):
    from transformers import AutoTokenizer

    llama = train_tokenizer(tmp_path / "llama", "llama")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "llama")
    assert reloaded.get_vocab() == llama.get_vocab()
    ids = reloaded(f"{IMAGE_TOKEN} A rabbit runs, zebra-like!")["input_ids"]
    assert ids[0] == reloaded.bos_token_id
    assert ids[1] == reloaded.convert_tokens_to_ids(IMAGE_TOKEN)  # one token, never split
    assert reloaded.decode(ids, skip_special_tokens=True) == " A rabbit runs, zebra-like!"
    assert {reloaded.pad_token, reloaded.eos_token, reloaded.unk_token} == {"<pad>", "</s>", "<unk>"}

    t5 = train_tokenizer(tmp_path / "t5", "t5")
    assert (t5.pad_token_id, t5.eos_token_id, t5.unk_token_id) == (0, 1, 2)
    ids = t5("a red car!")["input_ids"]
    assert ids[-1] == t5.eos_token_id and t5.unk_token_id not in ids
    assert t5.decode(ids, skip_special_tokens=True) == "a red car!"
    with pytest.raises(ValueError, match="bert"):
        train_tokenizer(tmp_path, "bert")
