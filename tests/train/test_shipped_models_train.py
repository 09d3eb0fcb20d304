"""Every shipped model config, scaled down (tests/scaled_models.py: structure kept - MLA, sigmoid
routing with the balancing bias, node-limited groups, shared experts, dense first layers), trains two
steps on CPU through the Hydra app (`mtp_plugin.train.hydra_app.main`, the `python -m mtp_plugin.train`
entry point), all models in one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from scaled_models import local_spec_cannot_build, scaled_model_overrides, shipped_model_names
from train_tiny import EOD, REPO, VOCAB, repo_env, write_tiny_corpus

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

RUNNER = """
import json, sys
from mtp_plugin.train.hydra_app import main
for argv in json.loads(sys.argv[1]):
    main(argv)
    print("DONE " + argv[0], flush=True)
"""


def test_every_shipped_model_scaled_down_trains_two_steps(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "corpus")
    names = [n for n in shipped_model_names() if not local_spec_cannot_build(n)]
    common = [
        "mtp=d2",
        f"data.train_prefix={train}",
        f"data.valid_prefix={valid}",
        f"data.eod_id={EOD}",
        "training.train_iters=2",
        "training.lr_warmup_iters=1",
        "training.global_batch_size=4",
        "training.micro_batch_size=2",
        "training.log_interval=1",
        "training.eval_interval=0",
        "training.save_interval=0",
        "training.save_dir=null",
        "training.load_dir=null",
        "training.tensorboard_dir=null",
        "training.progress_bar=off",
    ]
    jobs = [
        [*scaled_model_overrides(name, vocab_size=VOCAB), *common, f"hydra.run.dir={tmp_path / name}"]
        for name in names
    ]
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(jobs)],
        cwd=REPO,
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = proc.stdout.split("DONE ")
    assert len(runs) == len(names) + 1
    for name, out in zip(names, runs):
        losses = [float(x.split("lm loss:")[1].split("|")[0]) for x in out.splitlines() if "lm loss:" in x]
        depth = [
            float(x.split("mtp_2 loss:")[1].split("|")[0]) for x in out.splitlines() if "mtp_2 loss:" in x
        ]
        assert len(losses) == 2 and len(depth) == 2, (name, out[-2000:])
        # An untrained model over VOCAB ids: near ln(512) = 6.24, finite, at every depth.
        assert all(5.0 < v < 7.5 for v in losses + depth), (name, losses, depth)
    assert set(names) >= {"toy", "small", "deepseek_v3"}
