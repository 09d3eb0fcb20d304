"""The training loop (mtp_plugin.train.loop) on real Megatron-Core over gloo: exact resume with pp=2,
atomic checkpoints under an interrupted save, and the non-finite-loss stop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from train_tiny import tiny_experiment, write_tiny_corpus

pytestmark = [pytest.mark.megatron]

LOSS_KEYS = (
    "lm loss",
    "mtp_1 loss",
    "mtp_2 loss",
    "mtp_1 acceptance",
    "mtp_2 acceptance",
    "grad norm",
    "mtp lambda",
)


def _quiet(_line: str) -> None:
    pass


def _resume_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    import dataclasses

    import torch

    from mtp_plugin.train.loop import Trainer

    def run(cfg, stop_at=None):
        trainer = Trainer(cfg, print_fn=_quiet)
        trainer.setup()
        start = trainer.iteration
        result = trainer.train(stop_at=stop_at)
        trainer.close()
        return start, result.train_history

    full = tiny_experiment(train_prefix, valid_prefix, pp=2, train_iters=6)
    ckpt = str(Path(tmp) / "ckpt")
    split = tiny_experiment(train_prefix, valid_prefix, pp=2, train_iters=6, save_dir=ckpt, load_dir=ckpt)
    # Dropout on both stages: the resumed masks are the uninterrupted run's only if each rank's RNG
    # state came back from the checkpoint.
    for cfg in (full, split):
        cfg.model = dataclasses.replace(cfg.model, hidden_dropout=0.1, attention_dropout=0.1)
    _, uninterrupted = run(full)
    _, first_half = run(split, stop_at=3)
    # Whatever this process's RNG now holds, the resumed run must take its state from the checkpoint.
    torch.manual_seed(987654)
    resumed_at, second_half = run(split)
    return {
        "uninterrupted": uninterrupted,
        "first_half": first_half,
        "second_half": second_half,
        "resumed_at": resumed_at,
    }


@pytest.mark.distributed
@pytest.mark.slow
def test_resume_with_pp2_is_bit_exact(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    results = run_distributed(_resume_worker, 2, str(tmp_path), train, valid, timeout=240)
    last = results[-1]  # the last pipeline stage logs the losses
    assert last["resumed_at"] == 3
    assert [h["iteration"] for h in last["uninterrupted"]] == [1, 2, 3, 4, 5, 6]
    assert [h["iteration"] for h in last["second_half"]] == [4, 5, 6]
    for got, want in zip(last["first_half"] + last["second_half"], last["uninterrupted"], strict=True):
        for key in LOSS_KEYS:
            assert got[key] == want[key], (
                f"iteration {want['iteration']}: {key} {got[key]!r} != {want[key]!r}"
            )
    # λ switched from 0.3 to 0.1 at 384 tokens (after iteration 3): the resume crossed the switch.
    assert [h["mtp lambda"] for h in last["uninterrupted"]] == [0.3, 0.3, 0.3, 0.1, 0.1, 0.1]
    assert last["uninterrupted"][-1]["lm loss"] < last["uninterrupted"][0]["lm loss"]


def _interrupted_save_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    from megatron.core import dist_checkpointing

    from mtp_plugin.train import checkpoint
    from mtp_plugin.train.loop import Trainer

    ckpt = Path(tmp) / "ckpt"
    cfg = tiny_experiment(train_prefix, valid_prefix, train_iters=4, save_dir=str(ckpt), load_dir=str(ckpt))
    trainer = Trainer(cfg, print_fn=_quiet)
    trainer.setup()
    trainer.train(stop_at=2)  # finished checkpoint iter_0000002
    step3 = trainer.train_step()

    real_save = dist_checkpointing.save

    def dies_after_writing(state, directory, **kwargs):
        real_save(state, directory, **kwargs)  # every shard and metadata.json are on disk...
        raise RuntimeError("injected: process killed before the checkpoint was published")

    dist_checkpointing.save = dies_after_writing
    try:
        trainer.save()
        raised = False
    except RuntimeError:
        raised = True
    finally:
        dist_checkpointing.save = real_save
    trainer.close()
    after_failure = {
        "raised": raised,
        "latest": (ckpt / checkpoint.LATEST).read_text().strip(),
        "dirs": sorted(p.name for p in ckpt.iterdir()),
    }
    resumed = Trainer(cfg, print_fn=_quiet)
    resumed.setup()
    resumed_at = resumed.iteration
    again3 = resumed.train_step()
    killed = ckpt / "iter_0000003.tmp"  # what a save killed by a signal leaves: a partial directory
    killed.mkdir()
    (killed / "partial.distcp").write_bytes(b"\0" * 16)
    resumed.save()
    resumed.close()
    return {
        "after_failure": after_failure,
        "resumed_at": resumed_at,
        "step3": step3,
        "again3": again3,
        "after_resave": sorted(p.name for p in ckpt.iterdir()),
        "latest_after_resave": (ckpt / checkpoint.LATEST).read_text().strip(),
    }


@pytest.mark.slow
def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    (out,) = run_distributed(_interrupted_save_worker, 1, str(tmp_path), train, valid, timeout=180)
    failure = out["after_failure"]
    assert failure["raised"]
    assert failure["latest"] == "iter_0000002"
    # The failed save removed its partial directory and left `latest` alone.
    assert failure["dirs"] == ["iter_0000002", "latest"]
    assert out["resumed_at"] == 2
    for key in LOSS_KEYS:  # the resumed iteration 3 is the same step as before the failed save
        assert out["again3"][key] == out["step3"][key], key
    # A save killed outright leaves its .tmp; the next save of that iteration still succeeds.
    assert out["after_resave"] == ["iter_0000002", "iter_0000003", "latest"]
    assert out["latest_after_resave"] == "iter_0000003"


def _nan_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    import torch

    from mtp_plugin.train import checkpoint
    from mtp_plugin.train.loop import NonFiniteLossError, Trainer

    ckpt = Path(tmp) / "ckpt"
    cfg = tiny_experiment(train_prefix, valid_prefix, train_iters=4, save_dir=str(ckpt), load_dir=str(ckpt))
    trainer = Trainer(cfg, print_fn=_quiet)
    trainer.setup()
    trainer.train(stop_at=2)
    saved = {p.name: p.stat().st_mtime_ns for p in (ckpt / "iter_0000002").iterdir()}
    # Depth 2's projection goes bad: only mtp_2's loss can be non-finite; the trunk and depth 1 are fine.
    with torch.no_grad():
        trainer.model.mtp_stack.depths[1].eh_proj.linear.weight.fill_(float("nan"))
    before = trainer.model.output_layer.weight.detach().clone()
    try:
        trainer.train()
        message = None
    except NonFiniteLossError as err:
        message = str(err)
    unchanged = torch.equal(before, trainer.model.output_layer.weight.detach())
    trainer.close()
    return {
        "message": message,
        "weights_unchanged": unchanged,
        "latest": (ckpt / checkpoint.LATEST).read_text().strip(),
        "dirs": sorted(p.name for p in ckpt.iterdir()),
        "files_untouched": saved == {p.name: p.stat().st_mtime_ns for p in (ckpt / "iter_0000002").iterdir()},
        "iteration": trainer.iteration,
    }


@pytest.mark.slow
def test_nan_in_one_depth_stops_naming_step_rank_depth(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    (out,) = run_distributed(_nan_worker, 1, str(tmp_path), train, valid, timeout=180)
    message = out["message"]
    assert message is not None, "the run did not stop"
    assert "iteration 3" in message and "rank 0" in message and "mtp_2 loss" in message
    assert "lm loss" not in message and "mtp_1" not in message
    assert out["iteration"] == 2 and out["weights_unchanged"], "the bad step must not be applied"
    assert out["latest"] == "iter_0000002" and out["dirs"] == ["iter_0000002", "latest"]
    assert out["files_untouched"]


def _device_guard_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    from device_checks import CollectiveDeviceGuard

    from mtp_plugin.train.loop import Trainer

    ckpt = str(Path(tmp) / "ckpt")
    cfg = tiny_experiment(
        train_prefix, valid_prefix, train_iters=3, eval_interval=2, save_dir=ckpt, load_dir=ckpt
    )
    with CollectiveDeviceGuard() as guard:
        trainer = Trainer(cfg, print_fn=_quiet)
        trainer.setup()
        trainer.train(stop_at=2)  # steps, the NaN check, metrics and ρ reductions, evaluation, a save
        trainer.close()
        resumed = Trainer(cfg, print_fn=_quiet)
        resumed.setup()  # a load
        resumed.train()
        resumed.close()
    return guard.calls


@pytest.mark.distributed
@pytest.mark.slow
def test_collectives_only_get_tensors_made_on_the_run_device(tmp_path):
    """On a GPU run NCCL rejects CPU tensors; on CPU, gloo takes them: the guard (tests/device_checks.py)
    fails any collective given a tensor made without naming its device, as the first GPU step did."""
    train, valid = write_tiny_corpus(tmp_path / "data")
    calls = run_distributed(_device_guard_worker, 2, str(tmp_path), train, valid, timeout=240)
    for per_rank in calls:  # the check saw the loop's collectives: DDP, NaN flag, metrics, ρ, broadcasts
        assert per_rank.get("all_reduce", 0) >= 3 * 4, per_rank
        assert per_rank.get("broadcast", 0) >= 1, per_rank


def _bf16_resume_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    import torch
    from device_checks import cuda_type_names

    from mtp_plugin.train.loop import Trainer

    def run(cfg, stop_at=None):
        trainer = Trainer(cfg, print_fn=_quiet)
        trainer.setup()
        start = trainer.iteration
        dtypes = {p.dtype for p in trainer.model.parameters()}
        optimizer = type(trainer.optimizer.chained_optimizers[0]).__name__
        result = trainer.train(stop_at=stop_at)
        trainer.close()
        return start, result.train_history, dtypes, optimizer

    def bf16(**training):
        cfg = tiny_experiment(train_prefix, valid_prefix, train_iters=4, **training)
        cfg.backend.params_dtype = "bfloat16"
        return cfg

    ckpt = str(Path(tmp) / "ckpt")
    with cuda_type_names():
        _, uninterrupted, dtypes, optimizer = run(bf16())
        _, first_half, _, _ = run(bf16(save_dir=ckpt, load_dir=ckpt), stop_at=2)
        torch.manual_seed(4321)
        resumed_at, second_half, _, _ = run(bf16(save_dir=ckpt, load_dir=ckpt))
    return {
        "uninterrupted": uninterrupted,
        "split": first_half + second_half,
        "resumed_at": resumed_at,
        "dtypes": dtypes,
        "optimizer": optimizer,
    }


@pytest.mark.slow
def test_bf16_run_saves_and_resumes_bit_exact(tmp_path):
    """bf16 weights with Megatron's Float16 optimizer (fp32 main params): the first save used to raise
    "Param id N does not match any model sharded param" because the torch norms kept fp32 weights."""
    train, valid = write_tiny_corpus(tmp_path / "data")
    (out,) = run_distributed(_bf16_resume_worker, 1, str(tmp_path), train, valid, timeout=240)
    assert out["optimizer"] == "Float16OptimizerWithFloat16Params"
    assert out["dtypes"] == {torch.bfloat16}
    assert out["resumed_at"] == 2
    assert [h["iteration"] for h in out["split"]] == [1, 2, 3, 4]
    for got, want in zip(out["split"], out["uninterrupted"], strict=True):
        for key in LOSS_KEYS:
            assert got[key] == want[key], (
                f"iteration {want['iteration']}: {key} {got[key]!r} != {want[key]!r}"
            )
