"""Sequence parallelism in training (`train.sp_size`), on CPU (gloo) under torchrun.

Two ranks with sp_size 2 hold half of every frame's tokens of the same samples; their losses
and gradients must be those of one process training the same global batch: the loss log's
per-step loss and gradient norm (before clipping) and the final weights are compared with a
single-process run. Four ranks with sp_size 2 are two data-parallel ranks of two sequence
ranks each: the same again, so gradients are summed over each sequence group and averaged
over the data-parallel ranks. The validation loss (raw and EMA weights) is the single
process's too: a sequence group's ranks evaluate the same items, counted once.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import VALIDATION, finish, launch, params_for, rank_digests
from test_train import latent_index  # noqa: F401  (the fixture is shared)

from soraflow.training.loop import Trainer, train

STEPS, GLOBAL_BATCH = 4, 2


def result(root) -> tuple[dict[str, torch.Tensor], pd.DataFrame, pd.DataFrame | None]:
    validation = root / "run" / "validation.csv"
    return (load_file(str(root / "out.safetensors")), pd.read_csv(root / "run" / "loss.csv"),
            pd.read_csv(validation) if validation.exists() else None)


def assert_same_training(a: tuple, b: tuple, steps: list[int]) -> None:
    """Two runs' (weights, loss log, validation log): the same loss and gradient norm at each
    step, the same validation losses where both validated, and weights."""
    (weights_a, log_a, validation_a), (weights_b, log_b, validation_b) = a, b
    log_a, log_b = log_a.set_index("step").loc[steps], log_b.set_index("step").loc[steps]
    for column in ("loss", "grad_norm"):
        assert (log_a[column] - log_b[column]).abs().max() < 1e-5, (column, log_a, log_b)
    if validation_a is not None and validation_b is not None:
        assert validation_a["step"].tolist() == validation_b["step"].tolist()
        for column in ("loss", "ema_loss"):
            assert (validation_a[column] - validation_b[column]).abs().max() < 1e-5, (validation_a, validation_b)
    assert set(weights_a) == set(weights_b)
    for key, value in weights_a.items():
        torch.testing.assert_close(value, weights_b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def single_process(latent_index, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("single")
    params = {**params_for("ddp", batch_size=GLOBAL_BATCH), "validation": VALIDATION}
    train(latent_index, root / "out.safetensors", root / "run", params, params, validation_index=latent_index)
    return result(root)


@pytest.mark.parametrize("engine, nproc", [("ddp", 2), ("fsdp", 2), ("ddp", 4)])
def test_sequence_parallel_trains_like_one_process(engine, nproc, latent_index, single_process, tmp_path):  # noqa: F811
    process = launch(latent_index, tmp_path / "out.safetensors", tmp_path / "run",
                     {**params_for(engine, batch_size=GLOBAL_BATCH, sp_size=2), "validation": VALIDATION},
                     nproc=nproc, args=["--validation-index", str(latent_index)])
    output = finish(process, timeout=240)
    assert process.returncode == 0, output
    assert f"engine {engine} x{nproc}" in output
    assert len(set(rank_digests(output))) == 1, output
    run = result(tmp_path)
    assert run[2] is not None and run[2]["step"].tolist() == [2, 4], output
    assert_same_training(run, single_process, steps=list(range(1, STEPS + 1)))


def test_sp_size_must_divide_the_processes(latent_index, tmp_path):  # noqa: F811
    params = params_for("ddp", batch_size=GLOBAL_BATCH, sp_size=2)
    with pytest.raises(ValueError, match="train.sp_size 2 does not divide the 1 training processes"):
        Trainer(latent_index, tmp_path / "out.safetensors", tmp_path / "run", params, params)
