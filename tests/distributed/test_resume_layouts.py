"""A checkpoint written under one parallel layout resumes under another (issue 10): Megatron's
dist_checkpointing reshards the model and optimizer; the per-rank RNG states are skipped with a notice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from train_tiny import run_trainer, tiny_experiment, write_tiny_corpus

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.slow]

LOSS_KEYS = ("lm loss", "mtp_1 loss", "mtp_2 loss", "mtp_1 acceptance", "mtp_2 acceptance", "learning rate")


def _save_worker(tmp: str, train_prefix: str, valid_prefix: str, pp: int) -> dict:
    """An uninterrupted 5-iteration run, and one saved at iteration 3, both with `pp` stages."""
    ckpt = str(Path(tmp) / "ckpt")
    full = run_trainer(tiny_experiment(train_prefix, valid_prefix, pp=pp, train_iters=5))
    run_trainer(tiny_experiment(train_prefix, valid_prefix, pp=pp, train_iters=5, save_dir=ckpt), stop_at=3)
    return full


def _resume_worker(tmp: str, train_prefix: str, valid_prefix: str, pp: int) -> dict:
    ckpt = str(Path(tmp) / "ckpt")
    return run_trainer(tiny_experiment(train_prefix, valid_prefix, pp=pp, train_iters=5, load_dir=ckpt))


@pytest.mark.parametrize(("saved_pp", "pp"), [(2, 1), (1, 2)], ids=["pp2-to-pp1", "pp1-to-pp2"])
def test_checkpoint_resumes_under_another_pipeline_layout(tmp_path, saved_pp, pp):
    """Before: `Missing key in checkpoint state_dict: rng_state/shard_0_1` (pp2 -> pp1)."""
    train, valid = write_tiny_corpus(tmp_path / "data")
    args = (str(tmp_path), train, valid)
    saved = run_distributed(_save_worker, saved_pp, *args, saved_pp, timeout=240)[-1]  # the last stage logs
    resumed = run_distributed(_resume_worker, pp, *args, pp, timeout=240)[-1]
    assert resumed["start"] == 3
    notice = [line for line in resumed["lines"] if "parallel layout changed" in line]
    assert notice == [
        f" parallel layout changed (world_size {saved_pp} -> {pp}, tensor_model_parallel_size 1 -> 1, "
        f"pipeline_model_parallel_size {saved_pp} -> {pp}, expert_model_parallel_size 1 -> 1): resharded; "
        "RNG states not loaded"
    ]
    want = {int(h["iteration"]): h for h in saved["history"]}
    got = {int(h["iteration"]): h for h in resumed["history"]}
    assert sorted(got) == [4, 5]
    for it, values in got.items():
        for key in LOSS_KEYS:  # the same weights and optimizer state; the stages sum in another order
            torch.testing.assert_close(values[key], want[it][key], rtol=1e-5, atol=1e-6, msg=f"{it} {key}")
