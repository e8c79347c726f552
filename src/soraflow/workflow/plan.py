"""`soraflow plan`: what a config asks of each GPU, before any job is submitted.

For every training stage: tokens per sample, FLOPs per step, memory per GPU under the
chosen engine (weights, gradients, optimizer, EMA, activations with and without gradient
checkpointing), the stage's latent cache on disk, and GPU-hours at the stated MFU of the
named GPU (`plan` section of the config). For caption and encode: each model's memory and
clips per GPU-hour at a stated throughput; for caption also how its job places the model on
its GPUs (a replica per GPU, or its layers spread over them) and why: weights plus the KV cache
of a batch of clips' frames (soraflow.scoring.captioner_memory, which the caption job uses too). A stage or model that does not fit the GPU is
an error naming it and its numbers; the workflow runs this check when a run starts (the
Snakefile's onstart), so a config that cannot fit never reaches the queue.

Shapes and parameter counts follow from the STDiT's settings in closed form (checked against
the built model in tests/test_plan.py); encoder sizes from the headers of local weight files
or, for the recipe's hub models, from parameter counts taken on the meta device from their
published configs. Nothing heavy loads and torch is not imported: the workflow sizes its
jobs by this plan each time it parses the Snakefile.

The memory model counts what autograd keeps per block (checked against
torch.autograd.graph.saved_tensors_hooks in tests/test_plan.py, and against measured peaks in
benchmarks/bench_plan.py), with B micro-batch, N tokens per sample (on this rank), D hidden,
F MLP hidden, L caption tokens:

    residual stream (float32 even under autocast): block input, norm1 output, norm2 input
        and output: 4 x N*D, 4 bytes each
    linear inputs and outputs (bf16 under autocast, else float32): modulated input, qkv
        (3), attention output, projection output (spatial, 6 N*D); the same for temporal
        attention with its transposed input and output; cross-attention query input, query,
        output (3 N*D) and key/value (2 L*D); MLP input, fc1 output and GELU output (2 N*F),
        fc2 output (1 N*D)

so per block 4*4 + a*(17 + 2F/D) bytes per N*D element (a = 2 or 4): 116 in float32, 66 under
bf16 autocast. With checkpointing a block keeps only its input; one block's activations
are recomputed at a time. The backward adds its gradient buffers (about 2 N*F + 2 N*D).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from soraflow.core.hub import resolve_model_ref
from soraflow.data import buckets
from soraflow.data.manifest import count_rows
from soraflow.models import wan_config
from soraflow.models.stdit_config import patch_grid, stdit_kwargs
from soraflow.scoring.captioner_memory import HUB_CONFIGS, RESERVED, captioner_memory, placement
from soraflow.workflow.settings import processes_per_node

MIB, GIB = 2**20, 2**30
# memory as nvidia-smi reports it, and dense bf16 peak FLOP/s (vendor datasheets, SXM parts)
GPUS: dict[str, tuple[int, float]] = {
    "A100-40GB": (40_960 * MIB, 312e12),
    "A100-80GB": (81_920 * MIB, 312e12),
    "H100-80GB": (81_559 * MIB, 989e12),
    "H800-80GB": (81_559 * MIB, 989e12),
    "H200-141GB": (143_771 * MIB, 989e12),
}
# parameters of the recipe's hub models, counted on the meta device from their published
# configs (diffusers AutoencoderKL; transformers T5EncoderModel and LlavaNextForConditionalGeneration)
HUB_PARAMETERS = {
    "stabilityai/sd-vae-ft-ema": 83_653_863,
    "DeepFloyd/t5-v1_1-xxl": 4_762_310_656,  # the encoder only, as TextEncoder loads it
    "llava-hf/llava-v1.6-34b-hf": 34_752_083_968,
}
SD_VAE_LATENT = (4, 8)  # latent channels and downsampling of SD-VAE (AutoencoderKL's defaults)
INFERENCE_BYTES = 2  # encoders and the captioner run in bf16 on a GPU (soraflow.core.devices)


class PlanError(ValueError):
    """A config that cannot run on the planned GPU: the message names the stage and numbers."""


@dataclass
class StagePlan:
    stage: str
    latent: tuple[int, int, int, int]  # C, T, h, w
    tokens: int  # per sample
    per_gpu_batch: int
    gpus: int
    parameters: int
    forward_flops: float  # per sample
    step_flops: float  # per step of the global batch (forward + backward, + recompute)
    memory: dict[str, float]  # bytes per GPU by part
    checkpointing: bool
    other_activations: float  # activations per GPU with the other checkpointing choice
    cache_bytes_per_clip: int
    gpu_hours: float

    @property
    def total(self) -> float:
        return sum(self.memory.values())


@dataclass
class ModelPlan:
    step: str
    model: str
    parameters: int | None
    clips_per_gpu_hour: float
    placement: tuple[str, str] | None = None  # caption: (replicas | device_map | none, why)


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------


def latent_layout(vae: dict) -> tuple[int, int]:
    """(latent channels, downsampling) of the configured autoencoder, without loading it."""
    if vae["kind"] == "pixel_pack":
        return 3 * vae["factor"] ** 2, vae["factor"]
    if vae["kind"] == "wan":
        return wan_config.LATENT_CHANNELS, wan_config.VAE_SPACE
    config = local_model_dir(vae["model"])
    if config is not None and (config / "config.json").exists():
        values = json.loads((config / "config.json").read_text())
        return values["latent_channels"], 2 ** (len(values["block_out_channels"]) - 1)
    return SD_VAE_LATENT


def local_model_dir(ref: str) -> Path | None:
    """The model's folder, or None for a hub id or a package not installed here (the job that
    loads it says so; planning only loses its size)."""
    try:
        path = Path(resolve_model_ref(ref))
    except ValueError:
        return None
    return path if path.is_dir() else None


def weight_parameters(ref: str) -> int | None:
    """Parameters of a model from its safetensors headers (local folder), or the recipe's table."""
    folder = local_model_dir(ref)
    if folder is None:
        return HUB_PARAMETERS.get(ref)
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def stage_dims(config: dict, stage: dict) -> tuple[dict, tuple[int, int, int, int]]:
    """The sizes of the stage's STDiT or Wan transformer (see dims) and its latent (C, T, h, w), at its
    largest bucket (the one that needs the most memory)."""
    if config["model"]["family"] == "wan":
        return wan_dims(config, stage)
    channels, factor = latent_layout(config["vae"])
    frames, height, width = buckets.largest(stage)
    for side in (height, width):
        if side % factor:
            raise PlanError(f"size {side} is not a multiple of the autoencoder's factor {factor}")
    latent = (channels, frames, height // factor, width // factor)
    return dims(stdit_kwargs({**config["stdit"], "in_channels": channels}), latent), latent


def checkpointing(config: dict, stage: dict) -> bool:
    """The stage's own grad_checkpointing, else train's (as the trainer takes it)."""
    own = stage.get("grad_checkpointing")
    return config["train"]["grad_checkpointing"] if own is None else own


def dims(stdit: dict, latent: tuple[int, int, int, int]) -> dict:
    """The sizes the parameter, FLOP and memory counts need, from the STDiT's arguments
    (stdit_config.stdit_kwargs) and its latent (C, T, H, W)."""
    D, patch = stdit["hidden_size"], stdit["patch_size"]
    t, h, w = patch_grid(latent[1:], patch)
    patch_in = math.prod(patch) * stdit["in_channels"]
    return {
        "D": D, "F": int(D * stdit["mlp_ratio"]), "H": stdit["num_heads"], "L": stdit["model_max_length"],
        "caption": stdit["caption_channels"], "depth": stdit["depth"], "temporal": stdit["attention"] == "spatial_temporal",
        "t": t, "s": h * w, "N": t * h * w,
        "patch_values": 2 * patch_in,  # eps and the variance interpolation
        "patch_in": patch_in, "latent_elements": math.prod(latent),
    }


def wan_transformer(ref: str) -> dict:
    """The Wan transformer's config: a local pipeline's transformer/config.json, else the released one's;
    a pipeline not built yet (the demo's, before its rule runs) or not known here is planned as 1.3B."""
    folder = local_model_dir(ref)
    if folder is not None and (folder / "transformer" / "config.json").exists():
        return json.loads((folder / "transformer" / "config.json").read_text())
    return wan_config.TRANSFORMERS[wan_config.HUB_IDS.get(ref, "Wan2.1-T2V-1.3B")]


def wan_dims(config: dict, stage: dict) -> tuple[dict, tuple[int, int, int, int]]:
    """The dims of a Wan stage: one full attention over all N tokens (no temporal blocks), cross-attention
    to the text encoder's tokens, its FFN; the latent 4x smaller in time and 8x in space."""
    cfg = wan_transformer(config["wan"]["model"])
    latent = (cfg["in_channels"], *wan_config.latent_size(*buckets.largest(stage)))
    t, h, w = patch_grid(latent[1:], wan_config.PATCH)
    patch = math.prod(wan_config.PATCH)
    finetune = stage.get("finetune") or config["wan"]["finetune"]
    return {
        "D": cfg["num_attention_heads"] * cfg["attention_head_dim"], "F": cfg["ffn_dim"], "H": cfg["num_attention_heads"],
        "L": config["text_encoder"]["max_length"], "caption": cfg["text_dim"], "depth": cfg["num_layers"],
        "temporal": False, "t": t, "s": h * w, "N": t * h * w, "patch_values": cfg["out_channels"] * patch,
        "patch_in": cfg["in_channels"] * patch, "latent_elements": math.prod(latent), "wan": cfg,
        "lora_rank": config["wan"]["lora"]["rank"] if finetune == "lora" else None,
        "lora_targets": config["wan"]["lora"]["target_modules"],
    }, latent


def trainable_parameters(d: dict, parameters: int) -> int:
    """What the optimizer steps: every parameter, or a Wan stage's LoRA (rank x (in + out) per targeted
    attention projection of every block)."""
    if d.get("lora_rank") is None:
        return parameters
    return wan_config.lora_parameter_count(d["wan"], d["lora_rank"], d["lora_targets"])


def parameter_counts(d: dict) -> tuple[int, int, int]:
    """(parameters, parameters of one block, persistent buffers) of the STDiT. Every Linear has
    a bias; the buffer is the null caption (L x caption width); the position embeddings are
    recomputed buffers, never saved. A Wan transformer: wan_config's counts, no buffers."""
    if "wan" in d:
        return wan_config.parameter_count(d["wan"]), wan_config.block_parameter_count(d["wan"]), 0
    D, F, caption, patch_values = d["D"], d["F"], d["caption"], d["patch_values"]
    attention = 4 * D * D + 4 * D  # qkv and proj, or cross-attention's q, kv and proj
    block = attention * (3 if d["temporal"] else 2) + (2 * D * F + F + D) + 6 * D  # + MLP, scale_shift_table
    outer = (
        d["patch_in"] * D + D  # patch embedding (Conv3d, kernel = stride = patch)
        + 256 * D + D + D * D + D  # timestep MLP from its 256 frequencies
        + 6 * D * D + 6 * D  # t_block: adaLN-single's shared modulation
        + caption * D + D + D * D + D  # caption MLP
        + D * patch_values + patch_values + 2 * D  # final layer and its scale_shift_table
    )
    return d["depth"] * block + outer, block, d["L"] * caption


# --------------------------------------------------------------------------------------
# FLOPs (as torch.utils.flop_counter counts them: matmuls, convolutions and attention)
# --------------------------------------------------------------------------------------


def block_forward_flops(d: dict) -> float:
    N, D, F, L, t, s = d["N"], d["D"], d["F"], d["L"], d["t"], d["s"]
    linear = 2 * N * D * (3 * D + D) + 2 * N * D * (D + D) + 2 * L * D * 2 * D + 2 * N * D * F * 2  # attn, cross q/proj, kv, mlp
    attention = 4 * t * s * s * D + 4 * N * L * D  # spatial (per frame) and cross
    if d["temporal"]:
        linear += 2 * N * D * 4 * D
        attention += 4 * s * t * t * D
    else:  # full attention over all N tokens instead of per frame
        attention += 4 * N * N * D - 4 * t * s * s * D
    return linear + attention


def outer_forward_flops(d: dict) -> float:
    """Patch embedding, timestep and caption embedders, final layer (per sample)."""
    D, L = d["D"], d["L"]
    return 2 * (d["N"] * d["patch_in"] * D + 256 * D + D * D + D * 6 * D + L * d["caption"] * D + L * D * D
                + d["N"] * D * d["patch_values"])


def forward_flops(d: dict) -> float:
    return d["depth"] * block_forward_flops(d) + outer_forward_flops(d)


def training_flops(d: dict, checkpointing: bool) -> float:
    """Forward + backward per sample. The backward costs two forwards, except that layers fed
    by inputs that need no gradient (patch embedding, the first timestep and caption layers)
    compute only weight gradients, and attention's backward recomputes its scores (2.5 forwards);
    checkpointing adds one forward of every block."""
    N, D, L, t, s = d["N"], d["D"], d["L"], d["t"], d["s"]
    attention = 4 * t * s * s * D + 4 * N * L * D + (4 * s * t * t * D if d["temporal"] else 4 * N * N * D - 4 * t * s * s * D)
    blocks = d["depth"] * block_forward_flops(d)
    first_layers = 2 * (N * d["patch_in"] * D + 256 * D + L * d["caption"] * D)  # weight gradients only
    outer = outer_forward_flops(d)
    total = 3 * (blocks + outer) + d["depth"] * 0.5 * attention - first_layers
    if d.get("lora_rank") is not None:  # a frozen base: no weight gradients, its linears' backward halves
        total -= d["depth"] * (block_forward_flops(d) - attention) + outer
    return total + (blocks if checkpointing else 0)


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def block_activation_bytes(d: dict, linear_bytes: int, residual_bytes: int = 4) -> float:
    """What autograd keeps for one block of one sample (see the module docstring)."""
    N, D, F, L, H = d["N"], d["D"], d["F"], d["L"], d["H"]
    per_token = 4 * residual_bytes * D + linear_bytes * (11 * D + 2 * F + (6 * D if d["temporal"] else 0))
    # attention log-sum-exps, layer-norm statistics, caption input and keys/values, modulation
    small = 4 * N * H * (3 if d["temporal"] else 2) + 4 * 4 * N + 3 * linear_bytes * L * D + 4 * 6 * D
    return N * per_token + small


def outer_activation_bytes(d: dict, linear_bytes: int) -> float:
    """Patch embedding, caption MLP, final layer and the diffusion loss, per sample."""
    N, D, L = d["N"], d["D"], d["L"]
    embed = linear_bytes * (d["latent_elements"] + N * D + L * d["caption"] + 3 * L * D)
    final = 4 * 2 * N * D + linear_bytes * (N * D + N * d["patch_values"])
    loss = 4 * 8 * d["latent_elements"]  # model output halves, noise, target and loss terms in float32
    return embed + final + loss


def activation_bytes(d: dict, linear_bytes: int, residual_bytes: int, checkpointing: bool) -> float:
    """Per sample at the peak, in the backward: what the blocks keep, the outer layers, and the
    backward's own gradient buffers (the MLP hidden pair and two residual-sized ones)."""
    block = block_activation_bytes(d, linear_bytes, residual_bytes)
    gradients = d["N"] * (2 * linear_bytes * d["F"] + 2 * 4 * d["D"])
    kept = d["depth"] * residual_bytes * d["N"] * d["D"] + block if checkpointing else d["depth"] * block
    return kept + gradients + outer_activation_bytes(d, linear_bytes)


def state_bytes(engine: str, parameters: int, block_parameters: int, buffers: int, world: int, bf16: bool,
                zero_stage: int) -> dict[str, float]:
    """Weights, gradients, AdamW state and EMA per GPU (float32 master weights throughout)."""
    P = parameters
    if engine == "colossalai":  # ZeRO: full working weights, fp32 masters + Adam + EMA sharded
        working = 2 if bf16 else 4
        grads = (working + 4) * P / world if zero_stage == 2 else working * P + 4 * P / world
        return {"weights": working * P + 4 * P / world + 4 * buffers, "gradients": grads,
                "optimizer": 8 * P / world, "ema": 4 * (P / world + buffers)}
    if engine == "fsdp" and world > 1:  # sharded, plus two blocks' full weights and gradients in flight
        in_flight = 2 * 4 * block_parameters
        casts = 2 * 2 * block_parameters if bf16 else 0  # autocast's bf16 copies of the blocks in flight
        return {"weights": 4 * P / world + in_flight + casts + 4 * buffers,
                "gradients": 4 * P / world + in_flight, "optimizer": 8 * P / world,
                "ema": 4 * (P / world + buffers)}
    weights = 4 * P + 4 * buffers + (2 * P if bf16 else 0)  # + autocast's bf16 copies
    gradients = 4 * P * (2 if engine == "ddp" and world > 1 else 1)  # + DDP's gradient buckets
    return {"weights": weights, "gradients": gradients, "optimizer": 8 * P, "ema": 4 * (P + buffers)}


# --------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------


def stage_plan(config: dict, name: str) -> StagePlan:
    stage, train, assumptions = config["stages"][name], config["train"], config["plan"]
    d, latent = stage_dims(config, stage)
    nodes, per_node = stage["resources"]["nodes"], processes_per_node(config, name)
    gpus = nodes * per_node  # one GPU per training process
    sp = train["sp_size"]
    data_parallel = gpus // sp if gpus % sp == 0 else 0
    if not data_parallel or stage["batch_size"] % data_parallel:
        raise PlanError(f"{name}: batch_size {stage['batch_size']} does not split over {gpus} GPUs "
                        f"({nodes} nodes x {per_node} processes, train.sp_size {sp})")
    per_gpu = stage["batch_size"] // data_parallel
    local = {**d, "N": d["N"] // sp, "s": d["s"] // sp}  # sequence parallelism splits every frame's tokens
    bf16 = train["mixed_precision"] in ("bf16", "auto")  # auto is bf16 on a GPU
    engine = train["engine"] if gpus > 1 else "single"
    colossal = engine == "colossalai"
    linear_bytes = 2 if bf16 else 4
    residual_bytes = 2 if (colossal and bf16) else 4  # ZeRO's bf16 module keeps even the residual in bf16
    parameters, block_parameters, buffers = parameter_counts(d)
    memory = state_bytes(engine, parameters, block_parameters, buffers, gpus, bf16,
                         train["colossalai"]["zero_stage"] if colossal else 0)
    share = trainable_parameters(d, parameters) / parameters  # a LoRA: gradients, AdamW and EMA of its own weights
    memory.update({part: memory[part] * share for part in ("gradients", "optimizer", "ema")})
    checkpoints = checkpointing(config, stage)
    acts = {ckpt: per_gpu * activation_bytes(local, linear_bytes, residual_bytes, ckpt) for ckpt in (True, False)}
    memory["activations"] = acts[checkpoints]
    model_flops = training_flops(d, checkpointing=False)  # MFU counts model FLOPs, not recompute
    _, peak = GPUS[assumptions["gpu"]]
    samples = stage["steps"] * stage["batch_size"]
    return StagePlan(
        stage=name, latent=latent, tokens=d["N"], per_gpu_batch=per_gpu, gpus=gpus, parameters=parameters,
        forward_flops=forward_flops(d), step_flops=stage["batch_size"] * training_flops(d, checkpoints),
        memory=memory, checkpointing=checkpoints, other_activations=acts[not checkpoints],
        cache_bytes_per_clip=math.prod(latent) * (2 if config["vae"]["cache_dtype"] == "bf16" else 4),
        gpu_hours=samples * model_flops / (peak * assumptions["mfu"]) / 3600,
    )


def text_cache_bytes_per_clip(config: dict) -> int | None:
    width = text_width(config)
    if width is None:
        return None
    per_value = 2 if config["text_encoder"]["cache_dtype"] == "bf16" else 4
    return config["text_encoder"]["max_length"] * width * per_value + 4  # + the token count


def text_width(config: dict) -> int | None:
    """The text encoder's feature width: its config.json, else the STDiT's caption width."""
    folder = local_model_dir(config["text_encoder"]["model"])
    if folder is not None and (folder / "config.json").exists():
        values = json.loads((folder / "config.json").read_text())
        return values.get("d_model", values.get("hidden_size"))
    return stdit_kwargs(config["stdit"])["caption_channels"]


def captioner_config(ref: str) -> dict | None:
    """The captioner's config.json (a local folder), else the recipe's record of its hub config."""
    folder = local_model_dir(ref)
    if folder is not None and (folder / "config.json").exists():
        return json.loads((folder / "config.json").read_text())
    return HUB_CONFIGS.get(ref)


def caption_placement(config: dict, parameters: int | None) -> tuple[str, str] | None:
    """How the caption job places its model on the plan's GPUs, and why (None: sizes unknown)."""
    model_config = captioner_config(config["caption"]["model"])
    if parameters is None or model_config is None:
        return None
    gpus = config["resources"]["caption"]["gpus"]
    memory, _ = GPUS[config["plan"]["gpu"]]
    return placement(captioner_memory(parameters, model_config, config["caption"]), memory, 1 if gpus is None else gpus)


def model_plans(config: dict) -> list[ModelPlan]:
    a = config["plan"]
    captioner = weight_parameters(config["caption"]["model"])
    plans = [ModelPlan("caption", config["caption"]["model"], captioner, 3600 * a["caption_clips_per_s"],
                       caption_placement(config, captioner)),
             ModelPlan("encode_text", config["text_encoder"]["model"], weight_parameters(config["text_encoder"]["model"]),
                       3600 * a["text_clips_per_s"])]
    vae = config["vae"]
    parameters = 0 if vae["kind"] == "pixel_pack" else weight_parameters(vae["model"])
    for name, stage in config["stages"].items():
        pixels = math.prod(buckets.largest(stage))  # an upper bound: clips may sit in smaller buckets
        plans.append(ModelPlan(f"encode_video {name}", vae.get("model") or "pixel_pack", parameters,
                               3600 * a["vae_frames_per_s"] * 256**2 / pixels))
    return plans


def clips_planned(config: dict) -> float | None:
    try:
        return count_rows(config["data"]["manifest"]) * config["plan"]["clips_per_video"]
    except ValueError:  # no manifest yet: sizes per clip only
        return None


def make_plan(config: dict) -> tuple[list[StagePlan], list[ModelPlan]]:
    if config["plan"]["gpu"] not in GPUS:
        raise PlanError(f"plan.gpu: unknown GPU {config['plan']['gpu']!r} (choose from {sorted(GPUS)})")
    return [stage_plan(config, name) for name in config["stages"]], model_plans(config)


def check(config: dict) -> str:
    """The plan's tables; raises PlanError naming every stage or model that does not fit."""
    stages, models = make_plan(config)
    memory, _ = GPUS[config["plan"]["gpu"]]
    usable = memory - RESERVED
    report = render(config, stages, models)
    problems = [
        f"{s.stage}: needs {gib(s.total)} per GPU ({', '.join(f'{k} {gib(v)}' for k, v in s.memory.items())}; "
        f"{s.per_gpu_batch} samples of {s.tokens:,} tokens per GPU) but {config['plan']['gpu']} has {gib(usable)} "
        f"usable: lower the stage's batch_size or add GPUs"
        + ("" if s.checkpointing else f", set grad_checkpointing (activations {gib(s.other_activations)})")
        + ", or shard with train.engine fsdp or train.sp_size"
        for s in stages if s.total > usable
    ]
    problems += [
        f"{m.step}: {m.model} needs {gib(m.parameters * INFERENCE_BYTES)} for its weights alone but "
        f"{config['plan']['gpu']} has {gib(usable)} usable"
        for m in models if m.placement is None and m.parameters and m.parameters * INFERENCE_BYTES > usable
    ]
    problems += [f"{m.step}: {m.model}: {m.placement[1]} (resources.caption.gpus, caption.batch_size)"
                 for m in models if m.placement is not None and m.placement[0] == "none"]
    if problems:
        raise PlanError(report + "\n\ndoes not fit:\n  " + "\n  ".join(problems))
    return report


# --------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= GIB else f"{value / MIB:.1f} MiB"


def flop(value: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value / 1e6:,.1f} MFLOP"


def count(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2g}"


def size(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def markdown(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(cell) for cell in row) + " |" for row in rows
    ]


def render(config: dict, stages: list[StagePlan], models: list[ModelPlan]) -> str:
    a = config["plan"]
    memory, peak = GPUS[a["gpu"]]
    clips = clips_planned(config)
    counted = "no manifest yet" if clips is None else f"{clips:,.0f} clips ({a['clips_per_video']:g} per video)"
    lines = [f"plan for {a['gpu']} ({gib(memory)}, {RESERVED // GIB} GiB reserved; {peak / 1e12:.0f} TFLOP/s bf16 "
             f"at MFU {a['mfu']:.0%}), engine {config['train']['engine']}, {counted}", ""]
    rows = []
    for s in stages:
        c, t, h, w = s.latent
        ckpt, other = ("on", "off") if s.checkpointing else ("off", "on")
        rows.append([
            s.stage, f"{c}x{t}x{h}x{w}", f"{s.tokens:,}", f"{s.per_gpu_batch} x {s.gpus}",
            f"{s.parameters / 1e6:,.1f}M", flop(s.forward_flops), flop(s.step_flops),
            gib(s.memory["weights"]), gib(s.memory["gradients"]), gib(s.memory["optimizer"]), gib(s.memory["ema"]),
            f"{gib(s.memory['activations'])} ({ckpt}); {gib(s.other_activations)} ({other})", f"**{gib(s.total)}**",
            size(s.cache_bytes_per_clip) + ("" if clips is None else f"; {size(s.cache_bytes_per_clip * clips)}"),
            count(s.gpu_hours),
        ])
    lines += markdown(["stage", "latent", "tokens", "batch/GPU x GPUs", "params", "forward/sample",
                       "train step", "weights", "grads", "AdamW", "EMA", "activations (checkpointing)",
                       "total/GPU", "latent cache/clip; total", "GPU-hours"], rows)
    text_bytes = text_cache_bytes_per_clip(config)
    rows = []
    for m in models:
        weights = "?" if m.parameters is None else ("none" if m.parameters == 0 else gib(m.parameters * INFERENCE_BYTES))
        hours = "?" if clips is None else count(clips / m.clips_per_gpu_hour)
        cache = size(text_bytes) if m.step == "encode_text" and text_bytes else ""
        params = "?" if m.parameters is None else ("none" if m.parameters == 0 else f"{m.parameters / 1e6:,.1f}M")
        rows.append([m.step, m.model, params, weights,
                     f"{m.clips_per_gpu_hour:,.0f}", hours, cache])
    lines += ["", *markdown(["step", "model", "params", "weights (bf16)", "clips/GPU-hour (stated)", "GPU-hours",
                             "cache/clip"], rows)]
    lines += [f"\n{m.step} on {a['gpu']}: {m.placement[1]}" for m in models if m.placement is not None]
    return "\n".join(lines)
