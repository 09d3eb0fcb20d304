"""A checkpoint written under one parallel layout resumes under another (issue 10): Megatron's
dist_checkpointing reshards the model and optimizer; the per-rank RNG states are skipped with a notice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from train_tiny import tiny_experiment, write_tiny_corpus

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.slow]

LOSS_KEYS = ("lm loss", "mtp_1 loss", "mtp_2 loss", "mtp_1 acceptance", "mtp_2 acceptance", "learning rate")


def _run(cfg, stop_at=None) -> dict:
    from mtp_plugin.train.loop import Trainer

    lines: list[str] = []
    trainer = Trainer(cfg, print_fn=lines.append)
    trainer.setup()
    start = trainer.iteration
    result = trainer.train(stop_at=stop_at)
    trainer.close()
    return {"start": start, "history": result.train_history, "lines": lines}


def _pp2_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    ckpt = str(Path(tmp) / "ckpt")
    full = _run(tiny_experiment(train_prefix, valid_prefix, pp=2, train_iters=5))
    _run(tiny_experiment(train_prefix, valid_prefix, pp=2, train_iters=5, save_dir=ckpt), stop_at=3)
    return full


def _pp1_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    ckpt = str(Path(tmp) / "ckpt")
    return _run(tiny_experiment(train_prefix, valid_prefix, pp=1, train_iters=5, load_dir=ckpt))


def test_pp2_checkpoint_resumes_with_one_stage(tmp_path):
    """Before: `Missing key in checkpoint state_dict: rng_state/shard_0_1`."""
    train, valid = write_tiny_corpus(tmp_path / "data")
    pp2 = run_distributed(_pp2_worker, 2, str(tmp_path), train, valid, timeout=240)[-1]
    (pp1,) = run_distributed(_pp1_worker, 1, str(tmp_path), train, valid, timeout=240)
    assert pp1["start"] == 3
    notice = [line for line in pp1["lines"] if "parallel layout changed" in line]
    assert notice == [
        " parallel layout changed (world_size 2 -> 1, tensor_model_parallel_size 1 -> 1, "
        "pipeline_model_parallel_size 2 -> 1, expert_model_parallel_size 1 -> 1): resharded; RNG states not loaded"
    ]
    want = {int(h["iteration"]): h for h in pp2["history"]}
    got = {int(h["iteration"]): h for h in pp1["history"]}
    assert sorted(got) == [4, 5]
    for it, values in got.items():
        for key in LOSS_KEYS:  # the same weights and optimizer state; one stage sums in another order
            torch.testing.assert_close(values[key], want[it][key], rtol=1e-5, atol=1e-6, msg=f"{it} {key}")


def _pp1_then_save_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    ckpt = str(Path(tmp) / "ckpt1")
    full = _run(tiny_experiment(train_prefix, valid_prefix, pp=1, train_iters=5))
    _run(tiny_experiment(train_prefix, valid_prefix, pp=1, train_iters=5, save_dir=ckpt), stop_at=3)
    return full


def _pp2_resume_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    ckpt = str(Path(tmp) / "ckpt1")
    return _run(tiny_experiment(train_prefix, valid_prefix, pp=2, train_iters=5, load_dir=ckpt))


def test_pp1_checkpoint_resumes_with_two_stages(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    (pp1,) = run_distributed(_pp1_then_save_worker, 1, str(tmp_path), train, valid, timeout=240)
    pp2 = run_distributed(_pp2_resume_worker, 2, str(tmp_path), train, valid, timeout=240)[-1]
    assert pp2["start"] == 3
    assert any("pipeline_model_parallel_size 1 -> 2" in line for line in pp2["lines"]), pp2["lines"]
    want = {int(h["iteration"]): h for h in pp1["history"]}
    got = {int(h["iteration"]): h for h in pp2["history"]}
    assert sorted(got) == [4, 5]
    for it, values in got.items():
        for key in LOSS_KEYS:
            torch.testing.assert_close(values[key], want[it][key], rtol=1e-5, atol=1e-6, msg=f"{it} {key}")
