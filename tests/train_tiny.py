"""A tiny learnable corpus and experiment for the training-loop tests (tests/train, tests/distributed).

Documents draw tokens from the first 64 ids of a 512-id vocabulary with a strong bigram structure, so
the main loss and every MTP depth's loss fall within a few steps of a tiny model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

VOCAB = 512
EOD = VOCAB - 1


def write_tiny_corpus(directory: str | Path, *, num_docs: int = 200, seed: int = 0) -> tuple[str, str]:
    """Write train/valid indexed datasets under `directory`; return their prefixes."""
    from mtp_plugin.data import write_indexed_dataset

    rng = np.random.default_rng(seed)
    successor = rng.integers(0, 64, size=64)  # each token's likely next token
    docs = []
    for _ in range(num_docs):
        length = int(rng.integers(24, 120))
        doc = [int(rng.integers(0, 64))]
        for _ in range(length - 1):
            doc.append(int(successor[doc[-1]]) if rng.random() < 0.8 else int(rng.integers(0, 64)))
        docs.append(doc)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, valid = str(directory / "train_text_document"), str(directory / "valid_text_document")
    write_indexed_dataset(train, docs[20:], eod_id=EOD, vocab_size=VOCAB)
    write_indexed_dataset(valid, docs[:20], eod_id=EOD, vocab_size=VOCAB)
    return train, valid


# Hydra overrides that shrink the toy model onto the tiny corpus (CLI form).
TINY_MODEL_OVERRIDES = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.num_attention_heads=4",
    "model.ffn_hidden_size=64",
    "model.seq_length=32",
    f"model.vocab_size={VOCAB}",
    "model.num_experts=4",
    "model.moe_ffn_hidden_size=32",
    "model.moe_shared_expert_size=32",
    "model.first_dense_layers=1",
    f"data.eod_id={EOD}",
]


def tiny_model_config(**overrides):
    """The tiny corpus's model: 2 layers, hidden 32, 4 heads, sequence 32, VOCAB ids (dense unless overridden)."""
    from mtp_plugin.config import ModelConfig

    fields = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=32)
    return ModelConfig(**{**fields, "vocab_size": VOCAB, **overrides})


def tiny_experiment(train_prefix: str, valid_prefix: str | None, *, pp: int = 1, **training):
    """ExperimentConfig of a 2-layer MoE (first dense) with D=2 on the tiny corpus."""
    from mtp_plugin.config import (
        DataConfig,
        ExperimentConfig,
        LambdaScheduleConfig,
        MTPConfig,
        ParallelConfig,
        TrainingConfig,
    )

    defaults = dict(
        train_iters=6,
        global_batch_size=4,
        micro_batch_size=2,
        lr=3e-3,
        min_lr=3e-4,
        lr_warmup_iters=1,
        eval_interval=0,
        log_interval=1,
        progress_bar="off",
    )
    defaults.update(training)
    return ExperimentConfig(
        name="tiny",
        model=tiny_model_config(
            num_experts=4,
            moe_ffn_hidden_size=32,
            moe_shared_expert_size=32,
            first_dense_layers=1,
            moe_token_dispatcher_type="allgather",  # what a CPU run of the product uses (train.cpu)
        ),
        mtp=MTPConfig(
            num_depths=2,
            # The switch lands mid-run, so a resume must restore λ from the consumed tokens exactly.
            lambda_schedule=LambdaScheduleConfig(
                kind="piecewise", boundaries_tokens=[3 * 4 * 32], values=[0.3, 0.1]
            ),
        ),
        parallel=ParallelConfig(pipeline_model_parallel_size=pp),
        training=TrainingConfig(**defaults),
        data=DataConfig(train_prefix=train_prefix, valid_prefix=valid_prefix, eod_id=EOD),
    )


def run_trainer(cfg, stop_at: int | None = None) -> dict:
    """One Trainer life in this process: set up (resuming if cfg's load_dir holds a checkpoint), train
    (to `stop_at`), close. Returns the iteration it started at, its train history and its printed lines."""
    from mtp_plugin.train.loop import Trainer

    lines: list[str] = []
    trainer = Trainer(cfg, print_fn=lines.append)
    trainer.setup()
    start = trainer.iteration
    result = trainer.train(stop_at=stop_at)
    trainer.close()
    return {"start": start, "history": result.train_history, "lines": lines}


def repo_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that imports the repository's `mtp_plugin` and the tests'
    helpers: the repository first on PYTHONPATH, then whatever the caller's path holds (e.g. packages
    installed with --target); `extra` variables on top."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **extra,
    }


def run_app(
    *args: str, env: dict | None = None, timeout: float = 240, nproc: int = 1, cwd: str | Path = REPO
) -> subprocess.CompletedProcess:
    """`python -m mtp_plugin.train ARGS` from `cwd` (the repository root), output captured; with nproc > 1
    through torchrun (`torch.distributed.run --nproc-per-node nproc -m mtp_plugin.train ARGS`)."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    )
    return subprocess.run(
        [sys.executable, *launcher, "-m", "mtp_plugin.train", *args],
        cwd=cwd,
        env=repo_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _app_or_fail(*args: str, timeout: float, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = run_app(*args, timeout=timeout, nproc=nproc)
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def train_exit_and_resume(
    root: Path, args: list[str], *, exit_at: int, timeout: float = 300, nproc: int = 1
) -> dict:
    """Run the app three times: uninterrupted in root/full; in root/split with `training.exit_interval=
    exit_at` (it saves and exits), then the same command without it (it resumes). Returns the stdout of
    each run and the exact scalars each run directory's `tensorboard/scalars.jsonl` holds."""
    from mtp_plugin.train import logs

    full, split = root / "full", root / "split"
    runs = {
        "full": _app_or_fail(*args, f"hydra.run.dir={full}", timeout=timeout, nproc=nproc).stdout,
        "exit": _app_or_fail(
            *args, f"training.exit_interval={exit_at}", f"hydra.run.dir={split}", timeout=timeout, nproc=nproc
        ).stdout,
        "resume": _app_or_fail(*args, f"hydra.run.dir={split}", timeout=timeout, nproc=nproc).stdout,
    }
    for name, run_dir in (("full", full), ("split", split)):
        runs[f"{name} scalars"] = logs.read_scalars(run_dir / "tensorboard" / logs.ScalarWriter.JSONL_NAME)
        runs[f"{name} dir"] = run_dir
    return runs


def by_step(records: list[dict], key: str) -> dict[int, float]:
    """{step: value} of one scalar; a step logged twice (a resume repeating it) must agree."""
    out: dict[int, float] = {}
    for record in records:
        if key in record:
            step = int(record["step"])
            assert out.get(step, record[key]) == record[key], (key, step)
            out[step] = record[key]
    return out


# The tiny model with DeepSeek-V3's attention: MLA with q and kv LoRA, latent norms and YaRN (small widths).
TINY_MLA_OVERRIDES = [
    "model.multi_latent_attention=true",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_head_dim=8",
    "model.qk_pos_emb_head_dim=8",
    "model.v_head_dim=8",
    "model.qk_layernorm=true",
    "model.rope_type=yarn",
    "model.rotary_scaling_factor=4",
    "model.original_max_position_embeddings=16",
]


def trained_speculate_model(tmp_path_factory, *overrides: str) -> dict[str, Path]:
    """A 12-iteration app run (D = 2) on the tiny corpus and 4 prompts from its valid split, for the decoder
    tests (tests/speculate, tests/gpu): {"checkpoint": its save_dir, "prompts": a .jsonl, "root": tmp}.
    overrides: more Hydra overrides of the run (TINY_MLA_OVERRIDES)."""
    root = tmp_path_factory.mktemp("speculate")
    train, valid = write_tiny_corpus(root / "data")
    proc = run_app(
        *TINY_MODEL_OVERRIDES,
        *overrides,
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        "mtp=d2",
        "training.train_iters=12",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.lr=3e-3",
        "training.lr_warmup_iters=1",
        "training.eval_interval=0",
        "training.progress_bar=off",
        f"hydra.run.dir={root / 'run'}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mtp_plugin.data import read_indexed_dataset

    prompts = root / "prompts.jsonl"
    docs = read_indexed_dataset(valid)
    # Prompts of different lengths: a batch decodes from its shortest.
    lines = [json.dumps({"token_ids": [int(t) for t in d[: 5 + i % 3]]}) for i, d in enumerate(docs[:4])]
    prompts.write_text("\n".join(lines) + "\n")
    return {"checkpoint": root / "run" / "checkpoints", "prompts": prompts, "root": root}
