"""`soraflow plan`: its parameter counts against the built model, its FLOPs against torch's flop
counter, its activations against what autograd keeps, its verdict on configs that do not fit,
the workflow running it before any job, and the workflow parsed (and planned) without torch."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from conftest_caption import tiny_models  # noqa: F401 (fixture)
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from soraflow.models.stdit import build_model, count_parameters
from soraflow.models.stdit_config import PRESETS, stdit_kwargs
from soraflow.workflow import plan
from soraflow.workflow.settings import with_defaults

REPO = Path(__file__).resolve().parents[1]

LATENT = (4, 4, 8, 8)  # C, T, H, W
B = 2
aten = torch.ops.aten
# torch's counter knows the GPU attention kernels; the CPU's fused kernel gets torch's same formulas
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def inputs(model, batch: int = B):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *LATENT, generator=g)
    y = torch.randn(batch, model.model_max_length, model.y_embedder.y_proj.fc1.in_features, generator=g)
    mask = torch.ones(batch, model.model_max_length, dtype=torch.bool)
    mask[:, 5:] = False
    return x, torch.tensor([3, 700][:batch]), y, mask


# every preset, and odd shapes: other patches and latent channels, caption widths and lengths, an
# MLP ratio whose hidden size truncates, full attention (no temporal attention)
ODD_CONFIGS = [
    {"preset": "STDiT-S/2", "patch_size": [2, 2, 2]},
    {"preset": "STDiT-S/2", "patch_size": [1, 4, 4], "in_channels": 3},
    {"preset": "STDiT-tiny", "caption_channels": 1000, "model_max_length": 77},
    {"preset": "STDiT-B/2", "mlp_ratio": 2.7},
    {"preset": "STDiT-demo", "attention": "full", "hidden_size": 96, "depth": 3},
]


@pytest.mark.parametrize("cfg", [{"preset": name} for name in PRESETS] + ODD_CONFIGS, ids=str)
def test_parameter_counts_are_the_built_models(cfg):
    """The closed-form counts (planning imports no torch) against the STDiT itself on the meta device."""
    kwargs = stdit_kwargs(cfg)
    latent = (kwargs["in_channels"], 4, 8, 8)
    with torch.device("meta"):
        model = build_model(cfg, input_size=latent[1:])
    parameters, block_parameters, buffers = plan.parameter_counts(plan.dims(kwargs, latent))
    assert parameters == count_parameters(model)
    assert block_parameters == count_parameters(model.blocks[0])
    state = model.state_dict()  # what a checkpoint and the EMA hold: parameters and saved buffers
    assert buffers == sum(state[k].numel() for k in set(state) - {name for name, _ in model.named_parameters()})


@pytest.mark.parametrize("attention", ["spatial_temporal", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_are_what_torch_counts(attention, checkpointing):
    torch.manual_seed(0)
    cfg = {"preset": "STDiT-tiny", "attention": attention, "grad_checkpointing": checkpointing}
    model = build_model(cfg, input_size=LATENT[1:]).train()
    d = plan.dims(stdit_kwargs(cfg), LATENT)
    x, t, y, mask = inputs(model)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        model(x, t, y, mask)
    assert counter.get_total_flops() == B * plan.forward_flops(d)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        model(x, t, y, mask).square().mean().backward()
    assert counter.get_total_flops() == B * plan.training_flops(d, checkpointing)


@pytest.mark.parametrize("attention", ["spatial_temporal", "full"])
@pytest.mark.parametrize("bf16", [False, True])
def test_block_activations_are_what_autograd_keeps(attention, bf16):
    """Bytes of the distinct storages autograd saves in one block's forward (its weights, and
    autocast's bf16 copies of them, counted as weights), against the plan's count."""
    torch.manual_seed(0)
    # 160 tokens: no activation shares a shape with a weight, so autocast's weight copies are told apart
    cfg = {"preset": "STDiT-tiny", "attention": attention}
    model = build_model(cfg, input_size=(4, 16, 10)).train()
    block, D = model.blocks[0], model.hidden_size
    d = plan.dims(stdit_kwargs(cfg), (4, 4, 16, 10))
    x = torch.randn(1, d["N"], D, requires_grad=True)
    y, t0 = torch.randn(1, d["L"], D), torch.randn(1, 6 * D)
    mask = torch.ones(1, d["L"], dtype=torch.bool)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    weight_shapes = {shape for p in block.parameters() for shape in (tuple(p.shape), tuple(p.shape[::-1]))}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        weight_copy = tensor.dtype == torch.bfloat16 and tuple(tensor.shape) in weight_shapes
        if storage.data_ptr() not in weights and not weight_copy:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), autocast:
        block(x, y, t0, mask, d["t"])
    expected = plan.block_activation_bytes(d, linear_bytes=2 if bf16 else 4)
    assert sum(saved.values()) == pytest.approx(expected, rel=0.01)


def demo_config(**sections) -> dict:
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["data"]["manifest"] = str(REPO / config["data"]["manifest"])
    config.update(sections)
    return with_defaults(config)


def test_a_stage_that_does_not_fit_stops_naming_it_and_its_numbers():
    config = demo_config(stdit={"preset": "STDiT-XL/2"}, plan={"gpu": "A100-40GB"})
    config["stages"]["stage3"].update(num_frames=16, resolution=256, batch_size=8)
    with pytest.raises(plan.PlanError) as error:
        plan.check(config)
    message = str(error.value).split("does not fit:")[1]
    assert "stage3: needs" in message and "A100-40GB has 38.0 GiB usable" in message
    assert "stage1" not in message and "stage2" not in message  # those fit
    assert "set grad_checkpointing (activations" in message  # and what it would give


def test_the_demo_fits_and_its_table_has_every_stage_and_model():
    report = plan.check(demo_config())
    for name in ("| stage1 |", "| stage2 |", "| stage3 |", "| caption |", "| encode_text |", "| encode_video stage3 |"):
        assert name in report


def test_the_workflow_plans_before_any_job_and_stops_when_a_stage_does_not_fit(tmp_path):
    override = {"data": {"manifest": str(REPO / "demo/manifest.csv")}, "stdit": {"preset": "STDiT-XL/2"},
                "plan": {"gpu": "A100-40GB"},
                "stages": {"stage1": {"num_frames": 16, "frame_interval": 1, "resolution": 256, "steps": 1,
                                      "batch_size": 8, "lr": 1e-3, "filters": {}}}}
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(tmp_path / "override.yaml"), "--cores", "1"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
    )
    assert result.returncode != 0
    assert "stage1: needs" in result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["override.yaml"]  # no job ran


# Runs a module as `python -m` would, with any import of torch an error naming the importer.
WITHOUT_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise RuntimeError(f"{name} imported")

sys.meta_path.insert(0, NoTorch())
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def test_parsing_and_planning_the_preset_import_no_torch(tmp_path):
    """Every `snakemake -n` and every Slurm job step parses the Snakefile, which sizes the jobs
    (soraflow.workflow.resources, from the plan); the onstart check is the plan `soraflow plan`
    prints. Neither may pay for torch."""
    preset = REPO / "presets" / "opensora-1.0.yaml"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.csv").write_text("url\nhttps://example.org/v0.mp4\n")
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "pretrained_models" / "PixArt-XL-2-512x512.pth").write_bytes(b"")  # no weights load in a dry run
    without_torch = [sys.executable, "-c", WITHOUT_TORCH]
    parsed = subprocess.run(
        [*without_torch, "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
         "--configfile", str(preset), "-n", "--cores", "1"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert parsed.returncode == 0, parsed.stdout[-3000:] + parsed.stderr[-3000:]
    assert "train_hq_512" in parsed.stdout  # the training jobs were sized
    planned = subprocess.run([*without_torch, "soraflow.cli", "plan", "--configfile", str(preset)],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    assert "| hq_512 |" in planned.stdout
    assert "| split | 10,000 videos |" in planned.stdout  # every job's runtime and memory


def preset_config(**caption) -> dict:
    """The Open-Sora 1.0 preset over the default config, as `soraflow plan --configfile` reads it."""
    from snakemake.utils import update_config

    from soraflow.workflow.settings import stages_as_listed

    preset = REPO / "presets" / "opensora-1.0.yaml"
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    update_config(config, yaml.safe_load(preset.read_text()))
    stages_as_listed(config, [str(preset)])
    config["caption"].update(caption)
    return with_defaults(config)


def test_the_preset_captioner_spreads_over_its_two_gpus_for_its_kv_cache():
    """LLaVA-1.6-34B's 65 GiB of weights fit one 80 GB GPU, but not with the KV cache of 8 clips
    of 3 anyres frames: the plan says so, and that 4 clips would fit one GPU per replica."""
    report = plan.check(preset_config())
    line = next(line for line in report.splitlines() if line.startswith("caption on H800-80GB:"))
    assert "layers spread over 2 GPUs" in line and "weights 64.7 GiB" in line and "KV cache 16.8 GiB" in line
    assert "2,928 per frame" in line and "batch_size 4 would fit one" in line
    assert "one replica per GPU (2)" in plan.check(preset_config(batch_size=4))


def test_a_captioner_that_fits_no_gpus_stops_the_plan():
    config = preset_config()
    config["resources"]["caption"]["gpus"] = 1
    with pytest.raises(plan.PlanError, match=r"caption: llava-hf/llava-v1.6-34b-hf: .* exceeds 1 GPU\(s\)"):
        plan.check(config)


def test_image_tokens_per_frame_are_what_the_llava_next_processor_makes():
    """The anyres bound, against transformers' own count for the frame that takes most: one of the
    2x2 grid's size (672 px square)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    from soraflow.demo.models import train_tokenizer
    from soraflow.scoring.captioner_memory import HUB_CONFIGS, image_tokens_per_frame

    config = HUB_CONFIGS["llava-hf/llava-v1.6-34b-hf"]
    tokenizer = train_tokenizer(None, "llama")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaNextProcessor(
        LlavaNextImageProcessor(image_grid_pinpoints=config["image_grid_pinpoints"], size={"shortest_edge": 336},
                                crop_size={"height": 336, "width": 336}),
        tokenizer, patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    frame = torch.zeros(672, 672, 3, dtype=torch.uint8).numpy()
    ids = processor(images=[frame], text=["<image>"], return_tensors="pt")["input_ids"]
    assert (ids == tokenizer.convert_tokens_to_ids("<image>")).sum() == image_tokens_per_frame(config) == 2928


def test_a_tokens_keys_and_values_are_what_the_captioner_caches(tiny_models):  # noqa: F811
    """kv_bytes_per_token against the cache the tiny LLaVA's decoder keeps (bf16, as on a GPU)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from soraflow.scoring.captioner_memory import kv_bytes_per_token

    path = tiny_models["tiny-llava"]
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16)
    tokens = 37
    cache = model.model.language_model(input_ids=torch.ones(1, tokens, dtype=torch.long), use_cache=True).past_key_values
    kept = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kept == tokens * kv_bytes_per_token(AutoConfig.from_pretrained(path).to_dict())
