"""`soraflow plan`: its FLOPs against torch's flop counter, its activations against what autograd
keeps, its verdict on configs that do not fit, and the workflow running it before any job."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from soraflow.models.stdit import build_model
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


@pytest.mark.parametrize("attention", ["spatial_temporal", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_flops_are_what_torch_counts(attention, checkpointing):
    torch.manual_seed(0)
    model = build_model({"preset": "STDiT-tiny", "attention": attention, "grad_checkpointing": checkpointing},
                        input_size=LATENT[1:]).train()
    d = plan.dims(model, LATENT)
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
    model = build_model({"preset": "STDiT-tiny", "attention": attention}, input_size=(4, 16, 10)).train()
    block, D = model.blocks[0], model.hidden_size
    d = plan.dims(model, (4, 4, 16, 10))
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
