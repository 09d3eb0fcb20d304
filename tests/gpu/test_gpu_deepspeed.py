"""backend=deepspeed on one CUDA device (NCCL, bf16) through the app's entry point (`python -m mtp_plugin.train`).

The toy MoE with D = 2 on the tiny corpus: an uninterrupted 6-iteration run, and the same command stopped by
`training.exit_interval=3` then resumed from DeepSpeed's checkpoint. Every depth's loss falls, the resumed
iterations equal the uninterrupted run's, the log line carries the ρ fields and the peak GPU memory.

    PYTHONPATH=$PWD python -m pytest -q -m gpu tests/gpu/test_gpu_deepspeed.py -s
"""

from __future__ import annotations

import pytest
import torch
from train_tiny import EOD, VOCAB, by_step, train_exit_and_resume, write_tiny_corpus

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.deepspeed,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_deepspeed_backend_trains_and_resumes_on_one_gpu_in_bf16(tmp_path):
    pytest.importorskip("deepspeed")
    train, valid = write_tiny_corpus(tmp_path / "data")
    args = [
        "backend=deepspeed",
        "backend.params_dtype=bfloat16",
        "model=toy",
        f"model.vocab_size={VOCAB}",
        "mtp=d2",
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        f"data.eod_id={EOD}",
        "training.train_iters=6",
        "training.global_batch_size=8",
        "training.micro_batch_size=4",
        "training.lr=3e-3",
        "training.lr_warmup_iters=1",
        "training.eval_interval=3",
        "training.eval_iters=1",
        "training.log_interval=1",
        "training.progress_bar=off",
        "training.clip_grad=1.0",
    ]
    runs = train_exit_and_resume(tmp_path, args, exit_at=3, timeout=600)
    print(runs["full"][-3000:])
    full, split = runs["full scalars"], runs["split scalars"]
    for key in ("lm loss", "mtp_1 loss", "mtp_2 loss", "grad norm", "mtp lambda"):
        want, got = by_step(full, key), by_step(split, key)
        assert {s: got[s] for s in (4, 5, 6)} == {s: want[s] for s in (4, 5, 6)}, key
    for key in ("lm loss", "mtp_1 loss", "mtp_2 loss"):
        loss = by_step(full, key)
        assert loss[6] < loss[1] - 0.1, (key, loss)
    assert "rho_ceiling bits/GFLOP" in runs["full"] and "peak memory" in runs["full"]
