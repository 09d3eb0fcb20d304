"""A checkpoint moves between MTP placements (issue 25), through the training loop (Trainer, Megatron's
distributed checkpoint) on 3 pipeline stages over gloo, in one 3-process launch.

Saved under `last` (`E t | t | m m L`) at iteration 2, resumed under `split` (`E t | t m | m L`) and under
`stage` (`E t | t m m | L`); saved under `split`, resumed under `last`: iteration 3 of each resumed run
equals iteration 3 of the run that kept its placement (losses of every depth, acceptance, grad norm). Each
depth is saved under its global index, wherever it runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed
from train_tiny import run_trainer, tiny_experiment, write_tiny_corpus

pytestmark = [pytest.mark.megatron, pytest.mark.distributed, pytest.mark.slow]

ITERS, SAVED_AT = 3, 2
LOSS_KEYS = ("lm loss", "mtp_1 loss", "mtp_2 loss", "mtp_1 acceptance", "mtp_2 acceptance", "grad norm")
# The tiny model has 2 layers: `last` over 3 stages needs a layout.
PLACEMENTS = {
    "last": (dict(placement="last"), "Et|t|mmL"),
    "split": (dict(placement="split"), None),
    "stage": (dict(placement="stage", mtp_stage=1), None),
}


def _experiment(train: str, valid: str, placement: str, **training):
    from mtp_plugin.config import ParallelConfig

    cfg = tiny_experiment(train, valid, train_iters=ITERS, **training)
    mtp, layout = PLACEMENTS[placement]
    cfg.mtp = dataclasses.replace(cfg.mtp, **mtp)
    cfg.parallel = ParallelConfig(pipeline_model_parallel_size=3, pipeline_layout=layout)
    return cfg


def _worker(tmp: str, train: str, valid: str) -> dict:
    out = {}
    for saved_as, resumed_as in (("last", ("split", "stage")), ("split", ("last",))):
        ckpt = Path(tmp) / saved_as
        out[saved_as] = run_trainer(
            _experiment(train, valid, saved_as, save_dir=str(ckpt), save_interval=SAVED_AT)
        )
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            # Resume from iteration 2 (the run went on to save iteration 3 too).
            (ckpt / "latest").write_text(f"iter_{SAVED_AT:07d}")
        torch.distributed.barrier()
        for placement in resumed_as:
            out[f"{saved_as}->{placement}"] = run_trainer(
                _experiment(train, valid, placement, load_dir=str(ckpt))
            )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split_resume")
    train, valid = write_tiny_corpus(tmp / "data")
    return run_distributed(_worker, 3, str(tmp), train, valid, timeout=600)[-1]  # the last stage logs


@pytest.mark.parametrize("move", ["last->split", "last->stage", "split->last"])
def test_checkpoint_resumes_under_another_placement(runs, move):
    saved_as = move.split("->")[0]
    kept, resumed = runs[saved_as], runs[move]
    assert resumed["start"] == SAVED_AT
    want = next(h for h in kept["history"] if h["iteration"] == SAVED_AT + 1)
    (got,) = resumed["history"]
    assert got["iteration"] == SAVED_AT + 1
    for key in LOSS_KEYS:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=f"{move}: {key}")
    # The placements are different models of the pipeline, not the same run twice: the split run's
    # iteration-1 losses differ from `last`'s (each placement initialises its stages from its own seeds).
    assert runs["last"]["history"][0]["lm loss"] != runs["split"]["history"][0]["lm loss"]
