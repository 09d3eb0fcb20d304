"""The Hydra app end to end on one CUDA device, bf16, through its real entry point (`python -m mtp_plugin.train`).

Per case: an uninterrupted 6-iteration run, and the same command stopped by `training.exit_interval=3`
(it saves and exits) then started again (it resumes from the checkpoint). The resumed run's losses,
acceptances, grad norms and validation losses equal the uninterrupted run's bit for bit (the exact values
of `tensorboard/scalars.jsonl`; `backend.deterministic=true`, as bit-exactness on a GPU needs). Each run
also writes TensorBoard events and the loss PNG and logs the ρ fields and the peak memory.

The MoE trunk uses the alltoall token dispatcher (CUDA streams: the GPU-only path) with a toy shape on
the tiny corpus, so a case takes seconds once Megatron is imported.
"""

from __future__ import annotations

import pytest
import torch
from train_tiny import EOD, VOCAB, by_step, train_exit_and_resume, write_tiny_corpus

from mtp_plugin.train import logs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.megatron,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = {
    "mtp-off": (0, ["mtp=off"]),
    "d1-plain": (1, ["mtp=d1", "mtp.loss_chunk_tokens=0"]),
    "d2-plain": (2, ["mtp=d2", "mtp.loss_chunk_tokens=0"]),
    # 512 tokens per micro-batch: two chunks per depth.
    "d2-chunked": (2, ["mtp=d2", "mtp.loss_chunk_tokens=256"]),
}


def _args(train: str, valid: str, mtp_args: list[str]) -> list[str]:
    return [
        "model=toy",
        f"model.vocab_size={VOCAB}",
        "model.moe_token_dispatcher_type=alltoall",
        *mtp_args,
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        f"data.eod_id={EOD}",
        "backend.params_dtype=bfloat16",
        "backend.deterministic=true",
        "training.train_iters=6",
        "training.global_batch_size=8",
        "training.micro_batch_size=4",
        "training.lr_warmup_iters=1",
        "training.clip_grad=1.0",
        "training.log_interval=1",
        "training.eval_interval=3",
        "training.eval_iters=1",
        "training.progress_bar=off",
    ]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_app_bf16_save_resume_is_bit_exact(case, tmp_path):
    num_depths, mtp_args = CASES[case]
    train, valid = write_tiny_corpus(tmp_path / "data")
    runs = train_exit_and_resume(tmp_path, _args(train, valid, mtp_args), exit_at=3)

    assert "exiting at iteration 3" in runs["exit"]
    assert " saved checkpoint " in runs["exit"] and "at iteration 3" in runs["exit"]
    assert "loaded checkpoint" in runs["resume"] and "at iteration 3" in runs["resume"]
    keys = [*logs.metric_names(num_depths), "grad norm", "learning rate", "mtp lambda"]
    if num_depths == 0:
        assert not any(key.startswith("mtp_") for record in runs["full scalars"] for key in record)
    for key in keys:
        want = by_step(runs["full scalars"], key)
        assert sorted(want) == [1, 2, 3, 4, 5, 6], key
        assert by_step(runs["split scalars"], key) == want, key
    for key in logs.metric_names(num_depths):
        want = by_step(runs["full scalars"], key + " validation")
        assert sorted(want) == [3, 6], key
        assert by_step(runs["split scalars"], key + " validation") == want, key
    losses = by_step(runs["full scalars"], "lm loss")
    assert losses[6] < losses[1]

    lines = [logs.parse_log_line(line) for line in runs["full"].splitlines()]
    train_lines = [fields for fields in lines if fields and "validation" not in fields]
    assert [f["iteration"] for f in train_lines] == [1, 2, 3, 4, 5, 6]
    for fields in train_lines:  # ρ and the GPU's peak memory ride on every log line
        assert fields["rho_ceiling bits/GFLOP"] > 0 and fields["TFLOP/s/GPU"] > 0
        assert 0 < fields["peak memory (GiB)"] < 40
    assert " peak memory " in runs["full"]
    board = runs["full dir"] / "tensorboard"
    assert list(board.glob("events.out.tfevents.*"))
    assert (board / "loss_curves.png").stat().st_size > 10_000
    assert (runs["split dir"] / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_app_distributed_optimizer_dp2_ep2_resume_is_bit_exact(tmp_path):
    """Megatron's distributed optimizer (optimizer state sharded over dp 2; it needs CUDA tensors, so the
    CPU tests cannot run it) with the MoE experts of trunk and MTP depths over ep 2, through torchrun."""
    train, valid = write_tiny_corpus(tmp_path / "data")
    args = [
        *_args(train, valid, ["mtp=d2", "mtp.loss_chunk_tokens=0"]),
        "backend.use_distributed_optimizer=true",
        "parallel.expert_model_parallel_size=2",
    ]
    runs = train_exit_and_resume(tmp_path, args, exit_at=3, nproc=2)
    assert "loaded checkpoint" in runs["resume"] and "parallel layout changed" not in runs["resume"]
    for key in [*logs.metric_names(2), "grad norm", "learning rate"]:
        want = by_step(runs["full scalars"], key)
        assert sorted(want) == [1, 2, 3, 4, 5, 6], key
        assert by_step(runs["split scalars"], key) == want, key
