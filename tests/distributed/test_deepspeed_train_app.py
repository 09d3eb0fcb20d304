"""`backend=deepspeed` through the Hydra app: 2 stages x 2 data-parallel x 2 expert-parallel ranks (4 gloo
processes) train the tiny corpus; every depth's loss falls; a run stopped by exit_interval and rerun
resumes through DeepSpeed's checkpoint and continues exactly like the uninterrupted run, across the λ
switch; the log line, validation and ρ fields are the Megatron path's.

The four ranks run the app's `main` three times in the same processes (uninterrupted, exit, resume): the
processes and DeepSpeed's import are paid once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

from distributed_utils import run_distributed  # noqa: E402
from train_tiny import EOD, TINY_MODEL_OVERRIDES, by_step, write_tiny_corpus  # noqa: E402

pytestmark = [pytest.mark.deepspeed, pytest.mark.distributed]

ITERS, EXIT_AT, GLOBAL_BATCH, SEQ = 6, 3, 8, 32
SWITCH_TOKENS = 4 * GLOBAL_BATCH * SEQ  # λ 0.3 for iterations 1-4, 0.1 from iteration 5 (after the resume)


def _app_runs(args: list[str], root: str) -> dict:
    from deepspeed_cpu import init_deepspeed_cpu

    from mtp_plugin.train import logs
    from mtp_plugin.train.hydra_app import main

    init_deepspeed_cpu()
    full, split = Path(root) / "full", Path(root) / "split"
    main([*args, f"hydra.run.dir={full}"])
    main([*args, f"training.exit_interval={EXIT_AT}", f"hydra.run.dir={split}"])
    main([*args, f"hydra.run.dir={split}"])
    out = {}
    for name, run_dir in (("full", full), ("split", split)):
        jsonl = run_dir / "tensorboard" / logs.ScalarWriter.JSONL_NAME
        out[name] = logs.read_scalars(jsonl) if jsonl.is_file() else None
        out[f"{name} log"] = (run_dir / logs.TRAIN_LOG_NAME).read_text() if jsonl.is_file() else None
    return out


def test_pp2_dp2_ep2_trains_every_depth_and_resumes_exactly_across_the_lambda_switch(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    args = [
        "backend=deepspeed",
        "parallel=pp2_ep2",
        "mtp=d2",
        *TINY_MODEL_OVERRIDES,
        "model.num_layers=4",  # 2 layers a stage: each stage holds an MoE layer (ZeRO-1 needs it)
        "model.moe_aux_loss_coeff=0.01",
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        f"data.eod_id={EOD}",
        "mtp.lambda_schedule.kind=piecewise",
        "mtp.lambda_schedule.value=null",
        f"mtp.lambda_schedule.boundaries_tokens=[{SWITCH_TOKENS}]",
        "mtp.lambda_schedule.values=[0.3,0.1]",
        f"training.train_iters={ITERS}",
        f"training.global_batch_size={GLOBAL_BATCH}",
        "training.micro_batch_size=2",
        "training.lr=3e-3",
        "training.min_lr=3e-4",
        "training.lr_warmup_iters=1",
        "training.eval_interval=3",
        "training.eval_iters=1",
        "training.log_interval=1",
        "training.progress_bar=off",
    ]
    ranks = run_distributed(_app_runs, 4, args, str(tmp_path), cpu_shims=False, timeout=400)
    last = ranks[-1]  # the logging rank: last stage
    full, split = last["full"], last["split"]
    assert full is not None and split is not None
    # Exact resume: the resumed iterations equal the uninterrupted run's bit for bit, λ switch included.
    for key in (
        "lm loss",
        "mtp_1 loss",
        "mtp_2 loss",
        "mtp_2 acceptance",
        "mtp lambda",
        "learning rate",
        "grad norm",
    ):
        want, got = by_step(full, key), by_step(split, key)
        assert sorted(want) == sorted(got) == list(range(1, ITERS + 1)), key
        assert {s: got[s] for s in range(EXIT_AT + 1, ITERS + 1)} == {
            s: want[s] for s in range(EXIT_AT + 1, ITERS + 1)
        }, key
    lam = by_step(full, "mtp lambda")
    assert (lam[4], lam[5]) == (0.3, 0.1)
    # Every depth learns the bigram corpus: the last two iterations' mean 0.15 nats below the first two's.
    for key in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
        loss = by_step(full, key)
        assert (loss[ITERS - 1] + loss[ITERS]) / 2 < (loss[1] + loss[2]) / 2 - 0.15, (key, loss)
    # The Megatron path's log line, validation line and cluster ρ.
    log = last["full log"]
    assert "mtp_2 loss" in log and "rho_ceiling bits/GFLOP" in log and "validation" in log
    assert "deepspeed: pp 2, dp 2, ep 2, ZeRO 1" in log
    assert "loaded checkpoint" in last["split log"]
    marker = json.loads(
        (tmp_path / "split" / "checkpoints" / f"iter_{ITERS:07d}" / "deepspeed_checkpoint.json").read_text()
    )
    assert marker["layout"]["pipeline_model_parallel_size"] == 2
