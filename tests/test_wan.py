"""The Wan family on a tiny random-weight Wan 2.1 pipeline built locally (soraflow.demo.models):
its parts, parity with diffusers' WanPipeline, the flow-matching objective against diffusers'
scheduler, and a LoRA that loads into WanPipeline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from workflow_run import REPO

from soraflow.models import wan, wan_config
from soraflow.models.encoders import TextEncoder, WanAutoencoder
from soraflow.models.family import load_family

PRESET = "wan2.1-t2v-1.3b-lora.yaml"
PROMPTS = ["a rabbit in a green meadow", "a red car drives down a mountain road"]


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    from soraflow.demo.models import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="module")
def text_encoder(tiny_wan):
    return TextEncoder({"model": str(tiny_wan), "subfolder": "text_encoder", "max_length": 16})


def model_config(tiny_wan, lora=None) -> dict:
    params = {"wan": {"model": str(tiny_wan), "flow_shift": 3.0, "finetune": "lora" if lora else "full",
                      "lora": lora or {"rank": 4, "alpha": 4, "target_modules": list(wan_config.LORA_TARGETS)}}}
    return load_family("wan").model_config(params, {"finetune": None}, 16, 32, grad_checkpointing=False)


def test_parameter_counts_in_closed_form_equal_diffusers_models():
    """The plan's closed-form counts against the diffusers model built from the same config (on
    the meta device: no memory), for the released 1.3B and 14B configs and a tiny one."""
    from diffusers import WanTransformer3DModel

    tiny = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=48, num_layers=2, text_dim=32, freq_dim=32,
                in_channels=16, out_channels=16)
    for config in (tiny, *wan_config.TRANSFORMERS.values()):
        with torch.device("meta"):
            model = WanTransformer3DModel(**config)
        assert wan_config.parameter_count(config) == sum(p.numel() for p in model.parameters())
        with torch.device("meta"):
            model.add_adapter(wan.lora_config({"rank": 8, "alpha": 8, "target_modules": wan_config.LORA_TARGETS}))
        lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
        assert wan_config.lora_parameter_count(config, 8) == lora


def test_stage_sizes_wan_cannot_take_are_errors_naming_the_key():
    wan_config.check_stage("s1", {"num_frames": 9, "resolution": 32})
    with pytest.raises(ValueError, match=r"stages\.s1\.num_frames: 8; .*4k\+1.* 5 or 9"):
        wan_config.check_stage("s1", {"num_frames": 8, "resolution": 32})
    with pytest.raises(ValueError, match=r"stages\.s1\.resolution: 40; .*multiple of 16"):
        wan_config.check_stage("s1", {"num_frames": 9, "resolution": 40})


def test_autoencoder_encodes_clips_4x_in_time_8x_in_space(tiny_wan):
    autoencoder = WanAutoencoder({"model": str(tiny_wan), "subfolder": "vae"})
    pixels = torch.rand(2, 9, 3, 32, 32) * 2 - 1
    latents = autoencoder.encode_clips(pixels)
    assert latents.shape == (2, 16, 3, 4, 4)
    # each clip on its own: batching clips changes nothing
    torch.testing.assert_close(autoencoder.encode_clips(pixels[1:]), latents[1:])
    assert autoencoder.decode_clip(latents[0]).shape == (9, 3, 32, 32)


def test_training_prediction_equals_diffusers_transformer_called_as_wan_pipeline_calls_it(tiny_wan, text_encoder):
    """Our step's prediction (the cached text features through WanDenoiser) equals
    WanTransformer3DModel called as WanPipeline.__call__ calls it (diffusers 0.42,
    pipeline_wan.py: hidden_states = latents, timestep = t.expand(batch), encoder_hidden_states
    = encode_prompt's prompt_embeds, return_dict=False), on the same latents and timestep."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    family = load_family("wan")
    model, _ = family.build(model_config(tiny_wan), None, None, initial=True)
    y, mask = text_encoder.encode_batch(PROMPTS)
    latents = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(700.0)
    ours = model(latents, t.expand(2), y, mask)
    prompt_embeds, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=16)
    theirs = pipe.transformer(hidden_states=latents, timestep=t.expand(2), encoder_hidden_states=prompt_embeds,
                              return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_flow_matching_target_and_shift_equal_diffusers_scheduler():
    """Reference (Wan paper arXiv:2503.20314 sec. 3.2, rectified flow; diffusers'
    FlowMatchEulerDiscreteScheduler): x_sigma = (1 - sigma) x_0 + sigma noise (scale_noise), the
    model is called at timestep 1000 sigma, its target is the velocity noise - x_0, which an Euler
    step (scheduler.step) follows exactly along the path; the shift maps the scheduler's unshifted
    sigmas s to shift s / (1 + (shift - 1) s)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    shift = 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    # its 1000 training sigmas: the steps 1000 .. 1 over 1000, shifted
    training = torch.arange(1000, 0, -1) / 1000
    torch.testing.assert_close(wan.shifted_sigma(training, shift), scheduler.sigmas.float(), rtol=0, atol=1e-6)
    # and sampling's (set_timesteps): evenly spaced between the training sigmas' ends, then shifted
    scheduler.set_timesteps(10)
    unshifted = torch.linspace(1.0, float(scheduler.sigma_min), 10)
    torch.testing.assert_close(wan.shifted_sigma(unshifted, shift), scheduler.sigmas[:-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(scheduler.sigmas[:-1] * 1000, scheduler.timesteps, rtol=0, atol=1e-3)

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 3, 4, 4, generator=g), torch.randn(1, 16, 3, 4, 4, generator=g)
    seen = {}

    def model_fn(x_t, timestep, **_):
        seen.update(x_t=x_t, timestep=timestep)
        return torch.zeros_like(x_t)

    for step in (2, 7):  # our u = the scheduler's unshifted sigma there
        losses = wan.FlowMatching(shift).training_losses(model_fn, x0, unshifted[step : step + 1], noise=noise)
        timestep = scheduler.timesteps[step]
        scheduler._step_index = None  # scale_noise and step at this step of the schedule
        scheduler.set_begin_index(step)
        torch.testing.assert_close(seen["x_t"], scheduler.scale_noise(x0, timestep[None], noise), rtol=0, atol=1e-6)
        torch.testing.assert_close(seen["timestep"], timestep[None], rtol=0, atol=1e-3)
        # the target velocity: an Euler step with it lands on the path at the next sigma
        following = scheduler.step(noise - x0, timestep, seen["x_t"], return_dict=False)[0]
        next_sigma = scheduler.sigmas[step + 1]
        torch.testing.assert_close(following, (1 - next_sigma) * x0 + next_sigma * noise, rtol=0, atol=1e-5)
        # a zero prediction's loss is the target's mean square
        torch.testing.assert_close(losses["loss"], ((noise - x0) ** 2).mean(dim=(1, 2, 3, 4)))


def test_lora_exported_loads_into_wan_pipeline_with_equal_outputs(tiny_wan, tmp_path):
    """A LoRA with alpha != rank (the scale only the adapter metadata carries), trained a few
    steps so it is not peft's identity init, exported in the diffusers format and loaded into a
    WanPipeline built from the same parts: the transformer's outputs agree within 1e-5."""
    from diffusers import WanPipeline

    lora = {"rank": 4, "alpha": 8, "target_modules": list(wan_config.LORA_TARGETS)}
    config = model_config(tiny_wan, lora)
    model, _ = load_family("wan").build(config, None, None, initial=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trained, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    y, mask = torch.randn(2, 16, 32, generator=g), torch.ones(2, 16, dtype=torch.long)
    objective = wan.FlowMatching(config["flow_shift"])
    for _ in range(3):
        x0 = torch.randn(2, 16, 3, 4, 4, generator=g)
        loss = objective.training_losses(model, x0, torch.rand(2, generator=g), {"y": y, "mask": mask},
                                         noise=torch.randn(x0.shape, generator=g))["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    wan.export_lora(model, lora, tmp_path / "lora")

    pipe = WanPipeline.from_pretrained(str(tiny_wan))
    latents, t = torch.randn(2, 16, 3, 4, 4, generator=g), torch.tensor([300.0, 900.0])
    before = pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=y, return_dict=False)[0]
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=y, return_dict=False)[0]
        ours = model.eval()(latents, t, y, mask)
    assert (ours - before).abs().max() > 1e-3  # the LoRA changes the output
    assert (ours - theirs).abs().max() < 1e-5


def preset_config(**wan) -> dict:
    """The Wan preset over the Open-Sora preset, as `soraflow plan --configfile` assembles them."""
    from snakemake.utils import update_config

    from soraflow.workflow.settings import stages_as_listed, with_defaults

    files = [REPO / "workflow_config.yaml", REPO / "presets" / "opensora-1.0.yaml", REPO / "presets" / PRESET]
    config = {}
    for path in files:
        update_config(config, yaml.safe_load(path.read_text()))
    stages_as_listed(config, files[1:])
    update_config(config, {"wan": wan})
    return with_defaults(config)


def test_the_wan_preset_trains_at_the_sizes_wan_generates():
    """WanPipeline's default size first (the one the stage samples at), then its portrait: Wan 2.1's
    generate.py offers the 1.3B model '832*480' and '480*832' (width*height), nothing else."""
    import inspect

    from diffusers import WanPipeline

    frames, height, width = (inspect.signature(WanPipeline.__call__).parameters[key].default
                             for key in ("num_frames", "height", "width"))
    stage, = preset_config()["stages"].values()
    assert stage["buckets"] == [[frames, height, width], [frames, width, height]]


def test_the_wan_presets_plan_counts_wans_tokens_and_a_loras_trained_weights():
    from soraflow.workflow import plan

    lora, = plan.make_plan(preset_config())[0]
    full, = plan.make_plan(preset_config(finetune="full"))[0]
    # 81 frames of 480x832: 1 + 80 / 4 latent frames, 480 / 8 x 832 / 8 latent pixels, 2x2 of them a token
    assert lora.latent == full.latent == (16, 21, 60, 104) and lora.tokens == 21 * 30 * 52
    assert lora.parameters == full.parameters == wan_config.parameter_count(wan_config.TRANSFORMERS["Wan2.1-T2V-1.3B"])
    # AdamW's two fp32 moments of what trains: the LoRA's 23.6M weights, or all of them
    assert lora.memory["optimizer"] == 8 * wan_config.lora_parameter_count(wan_config.TRANSFORMERS["Wan2.1-T2V-1.3B"], 32)
    assert full.memory["optimizer"] == 8 * full.parameters
    assert lora.step_flops < full.step_flops  # no weight gradients for the frozen base
    with pytest.raises(plan.PlanError, match="lora_480: needs"):  # 14B in fp32 beside its bf16 copy, per GPU
        plan.check(preset_config(model="Wan-AI/Wan2.1-T2V-14B-Diffusers"))


def test_readme_wan_plan_table_holds_the_plans_figures():
    """The README's table of the preset's plan, row by row, against the plan of the config each row
    names (model, fine-tune, engine): a change to the preset or to the plan shows here."""
    from soraflow.workflow import plan

    table = (REPO / "README.md").read_text().split("<!-- wan-plan:start -->")[1].split("<!-- wan-plan:end -->")[0]
    rows = [[cell.strip() for cell in line.strip("| ").split(" | ")] for line in table.strip().splitlines()[2:]]
    assert len(rows) == 4
    for model, finetune, engine, params, *figures in rows:
        config = preset_config(model=f"Wan-AI/Wan2.1-T2V-{model}-Diffusers",
                               finetune="lora" if finetune.startswith("LoRA") else "full")
        config["train"]["engine"] = engine
        stage, = plan.make_plan(config)[0]
        memory = [plan.gib(stage.memory[part]) for part in ("weights", "gradients", "optimizer", "ema", "activations")]
        assert params.startswith(f"{stage.parameters / 1e6:,.1f}M")
        assert figures == [plan.flop(stage.step_flops), *memory, f"**{plan.gib(stage.total)}**",
                           plan.count(stage.gpu_hours)], (model, finetune, engine)


@pytest.fixture(scope="module")
def wan_index(tmp_path_factory) -> Path:
    """A shard cache as the Wan family's encode jobs write it: latents [16, 2, 4, 4] (5 frames of
    32 px), UMT5 features 32 wide of 16 tokens."""
    from test_train import write_shard_cache

    from soraflow.data import cache, table

    root = tmp_path_factory.mktemp("wan_cache")
    g = torch.Generator().manual_seed(0)
    ids = [f"clip{i}" for i in range(4)]
    latents = write_shard_cache(root / "latents.json", ids, {"latents": torch.randn(4, 16, 2, 4, 4, generator=g)})
    mask = torch.zeros(4, 16, dtype=torch.long)
    mask[:, :6] = 1
    texts = write_shard_cache(root / "text.json", ids, cache.text_tensors(torch.randn(4, 16, 32, generator=g), mask))
    index = pd.DataFrame({
        "id": ids, "latent_path": [latents[i][0] for i in ids], "latent_index": [latents[i][1] for i in ids],
        "text_emb_path": [texts[i][0] for i in ids], "text_emb_index": [texts[i][1] for i in ids],
    })  # fmt: skip
    table.write(index, root / "index.parquet")
    return root / "index.parquet"


def test_a_wan_lora_stage_trains_and_resumes_to_identical_weights(tiny_wan, wan_index, tmp_path, capsys):
    """The trainer with the Wan family: only the LoRA trains (and the EMA follows only it), the
    final checkpoint says its family, and a run stopped at step 2 and resumed ends bit-identical
    to one that ran its 4 steps at once, which also validated and drew a sample grid at its end
    through WanPipeline (EMA LoRA over the frozen base). Its checkpoints leave the base out, so a
    base changed in place under a stopped run makes a new run, not a resume over another base."""
    from conftest import bare_section
    from PIL import Image
    from test_train import split_settings, train_params

    from soraflow.models.checkpoint import load_checkpoint_file
    from soraflow.training.loop import train

    def params(steps: int, base) -> dict:
        lora = {"rank": 4, "alpha": 8, "target_modules": list(wan_config.LORA_TARGETS)}
        return {**train_params(steps, data_workers=0), "model": {"family": "wan"},
                "wan": {"model": str(base), "flow_shift": 3.0, "finetune": "lora", "lora": lora}}

    def run(name: str, steps: int, base=tiny_wan, **checks):
        outputs, ops = split_settings(params(steps, base))
        merged = {section: {**values, **ops.get(section, {})} for section, values in outputs.items()}
        sampling = {"sample": {"prompts": PROMPTS[:1], "seed": 0, "use_ema": True},
                    "text_encoder": bare_section("text_encoder", model=str(tiny_wan), subfolder="text_encoder",
                                                 max_length=16),
                    "vae": bare_section("vae", kind="wan", model=str(tiny_wan), subfolder="vae", scaling_factor=None),
                    "diffusion": {"num_timesteps": 1000, "cfg_scale": 4.0}} if checks else None  # fmt: skip
        train(wan_index, tmp_path / name / "final.safetensors", tmp_path / name,
              {**merged, "validation": checks or None}, outputs, validation_index=checks and wan_index, sampling=sampling)
        return tmp_path / name / "final.safetensors"

    whole = run("whole", 4, every=4, timesteps=2, max_clips=1, sample_every=4, sample_steps=2, sample_captions=1,
                overfit_evaluations=3)
    # a row for the prompt, one for a validation caption's sample beside its clip: 4 of 5 frames, 32 px
    (grid,) = (tmp_path / "whole" / "samples").glob("*")
    assert grid.name == "step-0000004.png" and Image.open(grid).size == (2 * 4 * 32, 2 * 32)
    run("resumed", 2)
    resumed = run("resumed", 4)
    for group in ("model", "ema"):
        a, metadata = load_checkpoint_file(whole, group)
        b, _ = load_checkpoint_file(resumed, group)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metadata["family"] == "wan" and metadata["steps"] == 4
    ema, _ = load_checkpoint_file(whole, "ema")
    assert ema and all("lora_" in name for name in ema)  # the frozen base has no EMA
    base = wan.pretrained_transformer(str(tiny_wan)).state_dict()
    model, _ = load_checkpoint_file(whole, "model")
    frozen = {k.removeprefix("transformer.").replace(".base_layer", ""): v for k, v in model.items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], base[k]) for k in base)  # the base did not move

    moved = shutil.copytree(tiny_wan, tmp_path / "base")
    run("moved", 2, base=moved)
    weights = moved / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["proj_out.weight"] += 0.01  # the same path, other weights
    save_file(state, weights, metadata={"format": "pt"})
    capsys.readouterr()
    run("moved", 4, base=moved)
    out = capsys.readouterr().out
    assert "belong to another run" in out and "the frozen base's files" in out, out
    assert "from step 0," in out
