"""mtp.trunk_gradients and a λ of 0 through the app's Trainer (Megatron's DDP, optimizer and checkpoints).

One process trains the tiny MoE jointly and saves; then, from that checkpoint's weights
(`training.pretrained_checkpoint`): a `frozen` run, which must move the depths and not one bit of the
trunk, embedding or head, resumes bit-exact, and runs its trunk without a graph; and a run with λ = 0
(the SFT/RL workflow that drops the MTP loss), which must leave the depths exactly as they were under
weight decay 0.1 while the trunk trains. Detached's gradients are checked against Megatron-Core 0.19's
mtp_detach_heads in tests/parity/test_megatron_parity.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_utils import run_distributed
from train_tiny import tiny_experiment, write_tiny_corpus

pytestmark = [pytest.mark.megatron]


def _weights_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    import dataclasses

    import torch

    from mtp_plugin.config import LambdaScheduleConfig
    from mtp_plugin.train.loop import Trainer

    def run(cfg, stop_at=None, probe=False):
        trainer = Trainer(cfg, print_fn=lambda line: None)
        trainer.setup()
        trunk_graph = []
        if probe:
            # The trunk's output on the MTP path: a graph there would keep its activations for backward.
            trainer.model.decoder.register_forward_hook(
                lambda module, args, out: trunk_graph.append(out.requires_grad)
            )
        start = trainer.iteration
        result = trainer.train(stop_at=stop_at)
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        optimized = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
        trainer.close()
        return {
            "start": start,
            "history": result.train_history,
            "weights": weights,
            "trainable": trainable,
            "optimized": optimized,
            "trunk_graph": trunk_graph,
        }

    pretrained = str(Path(tmp) / "pretrained")
    joint = run(tiny_experiment(train_prefix, valid_prefix, train_iters=3, save_dir=pretrained))

    def from_pretrained(name: str, **mtp):
        ckpt = str(Path(tmp) / name)
        cfg = tiny_experiment(
            train_prefix,
            valid_prefix,
            train_iters=4,
            weight_decay=0.1,
            save_dir=ckpt,
            load_dir=ckpt,
            pretrained_checkpoint=pretrained,
        )
        cfg.mtp = dataclasses.replace(cfg.mtp, **mtp)
        return cfg

    frozen_cfg = from_pretrained("frozen", trunk_gradients="frozen")
    frozen = run(frozen_cfg, probe=True)
    split_cfg = from_pretrained("frozen_split", trunk_gradients="frozen")
    first = run(split_cfg, stop_at=2)
    resumed = run(split_cfg)
    no_mtp = run(from_pretrained("no_mtp", lambda_schedule=LambdaScheduleConfig(kind="constant", value=0.0)))
    depth_params = sum(v.numel() for n, v in joint["weights"].items() if n.startswith("mtp_stack."))

    def moved(run_out, depths: bool) -> dict[str, bool]:
        return {
            n: not torch.equal(v, joint["weights"][n])
            for n, v in run_out["weights"].items()
            if n.startswith("mtp_stack.") == depths
        }

    return {
        "frozen_trunk_moved": moved(frozen, depths=False),
        "frozen_depths_moved": moved(frozen, depths=True),
        "frozen_trainable": frozen["trainable"],
        "frozen_optimized": frozen["optimized"],
        "depth_params": depth_params,
        "frozen_trunk_graph": frozen["trunk_graph"],
        "frozen_history": frozen["history"],
        "first_history": first["history"],
        "resumed_history": resumed["history"],
        "resumed_at": resumed["start"],
        "frozen_start": frozen["start"],
        "no_mtp_depths_moved": moved(no_mtp, depths=True),
        "no_mtp_trunk_moved": moved(no_mtp, depths=False),
        "no_mtp_history": no_mtp["history"],
    }


@pytest.mark.distributed
def test_frozen_trains_only_the_depths_and_zero_lambda_leaves_them_as_they_were(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    (out,) = run_distributed(_weights_worker, 1, str(tmp_path), train, valid, parallel=None, timeout=400)
    # frozen: started from the weights at iteration 0; every depth tensor moved, no trunk tensor did.
    assert out["frozen_start"] == 0
    assert out["frozen_depths_moved"] and all(out["frozen_depths_moved"].values())
    assert out["frozen_trunk_moved"] and not any(out["frozen_trunk_moved"].values()), [
        n for n, m in out["frozen_trunk_moved"].items() if m
    ]
    # Only the depths are trainable and in the optimizer (so weight decay cannot reach the rest).
    assert out["frozen_trainable"] == out["frozen_optimized"] == out["depth_params"]
    # The trunk ran without a graph: nothing of it is kept for backward.
    assert out["frozen_trunk_graph"] and not any(out["frozen_trunk_graph"])
    # Resume: stop at 2, rerun: iterations 3-4 equal the uninterrupted frozen run's, bit for bit.
    assert out["resumed_at"] == 2
    keys = ("lm loss", "mtp_1 loss", "mtp_2 loss", "mtp chain accept length")
    uninterrupted = [[h[k] for k in keys] for h in out["frozen_history"]]
    split = [[h[k] for k in keys] for h in out["first_history"] + out["resumed_history"]]
    assert split == uninterrupted
    # The frozen trunk's main loss is the same function of the data as before; the depths' losses fall.
    history = out["frozen_history"]
    assert history[-1]["mtp_1 loss"] < history[0]["mtp_1 loss"]
    # λ = 0: the depths are scored (their loss is logged) but not one of their bits changed under weight
    # decay 0.1, while the trunk trained.
    assert all(h["mtp lambda"] == 0.0 and h["mtp_1 loss"] > 0 for h in out["no_mtp_history"])
    assert out["no_mtp_depths_moved"] and not any(out["no_mtp_depths_moved"].values())
    assert any(out["no_mtp_trunk_moved"].values())
