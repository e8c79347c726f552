"""The Wan family under the ddp and fsdp engines: two torchrun processes (gloo, CPU) train the tiny
random-weight Wan pipeline's LoRA over its frozen base, with the preset's gradient checkpointing,
on the global batch one process trains (the sampler is step-indexed: the same rows at each step),
and must match it step for step: the loss and gradient norm (before clipping, which every step
does) of each step, the validation losses (raw and EMA weights) and the final weights and EMA. A
two-process fsdp run's checkpoint (each rank's shards of the LoRA, its EMA and moments) resumes
in one process to the same end."""

from __future__ import annotations

import shutil

import pytest
import torch
from test_distributed import finish, launch, rank_digests
from test_sequence_parallel import assert_same_training, result
from test_train import split_settings, train_params
from test_wan import tiny_wan, wan_index  # noqa: F401  (the fixtures are shared)
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from soraflow.models import wan_config
from soraflow.training.loop import WRITE_BYTES_PER_S, Trainer, train

STEPS = 4
GLOBAL_BATCH = 4  # wan_index's 4 clips: 2 per rank
VALIDATION = {"every": 2, "timesteps": 2, "max_clips": 4, "sample_every": None, "sample_steps": 2,
              "sample_captions": 0, "overfit_evaluations": 3}
GRAD_CLIP = 0.02  # under the tiny LoRA's gradient norms (about 0.05): every step clips


def wan_params(tiny_wan, engine: str, steps: int = STEPS) -> dict:  # noqa: F811
    # the preset's gradient checkpointing (diffusers' own, in every transformer block)
    params = train_params(steps, engine=engine, data_workers=0, grad_clip=GRAD_CLIP, grad_checkpointing=True)
    params["stage"]["batch_size"] = GLOBAL_BATCH
    lora = {"rank": 4, "alpha": 8, "target_modules": list(wan_config.LORA_TARGETS)}
    return {**params, "model": {"family": "wan"}, "validation": VALIDATION,
            "wan": {"model": str(tiny_wan), "flow_shift": 3.0, "finetune": "lora", "lora": lora}}


def as_the_rule_passes(params: dict) -> tuple[dict, dict]:
    """(all settings, the output-changing ones: the run's identity), as the train rule passes them."""
    outputs, operational = split_settings(params)
    return {section: {**values, **operational.get(section, {})} for section, values in outputs.items()}, outputs


def one_process(root, index, params) -> tuple:
    train(index, root / "out.safetensors", root / "run", *as_the_rule_passes(params), validation_index=index)
    return result(root)


@pytest.fixture(scope="module")
def single_process(tiny_wan, wan_index, tmp_path_factory):  # noqa: F811
    return one_process(tmp_path_factory.mktemp("single"), wan_index, wan_params(tiny_wan, "ddp"))


@pytest.fixture(scope="module")
def two_processes(tiny_wan, wan_index, tmp_path_factory):  # noqa: F811
    """engine -> (the folder of its two-process run, the launcher's output), each run once."""
    runs = {}

    def run(engine: str):
        if engine not in runs:
            root = tmp_path_factory.mktemp(engine)
            process = launch(wan_index, root / "out.safetensors", root / "run", wan_params(tiny_wan, engine),
                             args=["--validation-index", str(wan_index)])
            output = finish(process, timeout=240)
            assert process.returncode == 0, output
            runs[engine] = root, output
        return runs[engine]

    return run


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_wan_lora_trains_on_two_processes_like_one(engine, two_processes, single_process):
    root, output = two_processes(engine)
    assert f"engine {engine} x2" in output
    digests = rank_digests(output)
    assert len(digests) == 2 and digests[0] == digests[1], output
    run = result(root)
    assert run[2]["step"].tolist() == [2, 4], output
    assert "ema.transformer.blocks.0.attn1.to_q.lora_B.default.weight" in run[0]
    assert_same_training(run, single_process, steps=list(range(1, STEPS + 1)))


def test_a_two_process_fsdp_wan_checkpoint_resumes_in_one_process(two_processes, single_process, tiny_wan,  # noqa: F811
                                                                   wan_index, tmp_path, capsys):  # noqa: F811
    """The fsdp run's step-2 checkpoint (its later one left out), resumed by one process to step 4."""
    root, _ = two_processes("fsdp")
    shutil.copytree(root / "run", tmp_path / "run", ignore=shutil.ignore_patterns("step-0000004"))
    resumed = one_process(tmp_path, wan_index, wan_params(tiny_wan, "fsdp"))
    assert "from step 2," in capsys.readouterr().out
    assert resumed[2]["step"].tolist() == [2, 4]
    assert_same_training(resumed, single_process, steps=list(range(1, STEPS + 1)))


def test_a_wan_loras_checkpoint_holds_what_trains_and_its_write_is_estimated(two_processes, tiny_wan,  # noqa: F811
                                                                            wan_index, tmp_path):  # noqa: F811
    """A LoRA's resumable checkpoint holds the LoRA, its EMA and moments, not the frozen base (a
    resumed run reads the base from wan.model again: the resume tests above). Before its first
    checkpoint a run estimates the write's seconds from those bytes (the job's end must leave time
    for it). The reference: the tensors torch.distributed.checkpoint recorded in the fsdp run's
    checkpoint (its .metadata), and peft's names for a LoRA's weights (lora_A, lora_B)."""
    root, _ = two_processes("fsdp")
    recorded = FileSystemReader(str(root / "run" / "step-0000004")).read_metadata().state_dict_metadata
    weights = [name for name, m in recorded.items() if name.startswith("model.") and isinstance(m, TensorStorageMetadata)]
    assert weights and all(".lora_A." in name or ".lora_B." in name for name in weights), weights
    written = sum(torch.Size(m.size).numel() * m.properties.dtype.itemsize
                  for m in recorded.values() if isinstance(m, TensorStorageMetadata))
    trainer = Trainer(wan_index, tmp_path / "out.safetensors", tmp_path / "run",
                      *as_the_rule_passes(wan_params(tiny_wan, "ddp")))
    assert trainer.write_seconds * WRITE_BYTES_PER_S == pytest.approx(written, rel=0.01)  # AdamW's step counts
