"""Nothing lost (issue 10): a non-finite step is never applied nor saved, an exit signal saves and exits
with its own code, a resume checks the checkpoint against the run and re-derives the lr schedule, and a
finished run is not saved again. Trainer-level checks run in a spawned rank (tests/distributed_utils.py);
the exit codes and messages go through `python -m mtp_plugin.train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_utils import run_distributed
from train_tiny import REPO, TINY_MODEL_OVERRIDES, repo_env, run_app, tiny_experiment, write_tiny_corpus

LOSS_KEYS = ("lm loss", "mtp_1 loss", "mtp_2 loss", "grad norm", "learning rate", "mtp lambda")


def _params(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _checkpoint_tensors(path: Path, tmp: Path) -> dict:
    """Every tensor of a dist_checkpointing (torch_dist) checkpoint, read without a process group."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    flat: dict = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(out, weights_only=False))
    return flat


# ------------------------------------------------------------------ non-finite steps


def _nonfinite_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    import torch

    from mtp_plugin.train import checkpoint
    from mtp_plugin.train.loop import NonFiniteLossError, Trainer

    def run(mode: str, **training) -> dict:
        ckpt = Path(tmp) / mode
        cfg = tiny_experiment(
            train_prefix, valid_prefix, train_iters=6, save_interval=1, save_dir=str(ckpt),
            load_dir=str(ckpt), nonfinite=mode, **training,
        )  # fmt: skip
        cfg.model.moe_token_dispatcher_type = "allgather"
        lines: list[str] = []
        trainer = Trainer(cfg, print_fn=lines.append)
        trainer.setup()
        trainer.train(stop_at=2)
        if mode == "skip":  # one NaN gradient at iteration 3 only
            real = trainer._forward_backward

            def poisoned(*args, forward_only, **kwargs):
                real(*args, forward_only=forward_only, **kwargs)
                if trainer.iteration == 2 and not forward_only:
                    next(trainer.ddp.parameters()).main_grad.view(-1)[0] = float("nan")

            trainer._forward_backward = poisoned
        before = _params(trainer.model)
        try:
            result = trainer.train(stop_at=3)
            message, skipped = None, result.skipped_iterations
        except NonFiniteLossError as err:
            message, skipped = str(err), None
        after = _params(trainer.model)
        if message is None:
            trainer.train()
        trainer.close()
        return {
            "message": message,
            "skipped": skipped,
            "lines": lines,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "iteration": trainer.iteration,
            "latest": (ckpt / checkpoint.LATEST).read_text().strip(),
            "dirs": sorted(p.name for p in ckpt.iterdir()),
            "finite": {
                p.name: all(bool(t.isfinite().all()) for t in _checkpoint_tensors(p, Path(tmp)).values())
                for p in sorted(ckpt.glob("iter_*"))
            },
            "history": result.train_history if message is None else [],
        }

    # lr 1e6: the loss stays finite but at iteration 3 the grad norm is NaN.
    return {"stop": run("stop", lr=1e6, min_lr=0.0), "skip": run("skip")}


@pytest.mark.megatron
@pytest.mark.slow
def test_nonfinite_grad_norm_is_never_applied_nor_saved(tmp_path):
    """Before: iteration 3's NaN grad norm was applied and saved (NaN weights, `latest` pointing at them)."""
    train, valid = write_tiny_corpus(tmp_path / "data")
    (out,) = run_distributed(_nonfinite_worker, 1, str(tmp_path), train, valid, timeout=240)
    stop = out["stop"]
    assert stop["message"] == (
        "iteration 3: grad norm nan; the update was not applied and nothing was saved; the last checkpoint "
        "iter_0000002 is untouched (rerun to resume from it); lower training.lr or set training.clip_grad, "
        "or training.nonfinite=skip to step over such iterations"
    )
    assert stop["unchanged"] and stop["iteration"] == 2
    assert stop["latest"] == "iter_0000002" and stop["dirs"] == ["iter_0000001", "iter_0000002", "latest"]
    assert stop["finite"] == {"iter_0000001": True, "iter_0000002": True}
    # skip: iteration 3 (one NaN gradient) is counted without an update; the run goes on to 6.
    skip = out["skip"]
    assert skip["message"] is None and skip["skipped"] == 1 and skip["unchanged"]
    assert skip["iteration"] == 6 and skip["latest"] == "iter_0000006"
    assert all(skip["finite"].values()) and len(skip["finite"]) == 6
    assert (
        " iteration 3: grad norm nan; update skipped (training.nonfinite=skip, 1 in a row)" in skip["lines"]
    )
    assert [h["iteration"] for h in skip["history"]] == [1, 2, 4, 5, 6]


@pytest.mark.megatron
@pytest.mark.slow
def test_app_stops_on_nonfinite_grad_norm_with_one_line_and_exit_code_4(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = run_app(
        *_app_args(
            train, valid, run_dir, "training.train_iters=5", "training.lr=1e6", "training.min_lr=0",
            "training.save_interval=1",
        )[3:]  # without `python -m mtp_plugin.train`
    )  # fmt: skip
    assert proc.returncode == 4, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: iteration 4: grad norm nan; the update was not applied and nothing was saved; the last "
        "checkpoint iter_0000003 is untouched (rerun to resume from it); lower training.lr or set "
        "training.clip_grad, or training.nonfinite=skip to step over such iterations"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "iter_0000003"
    # The shipped training.keep_last_checkpoints=2 keeps the newest two.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_0000002", "iter_0000003", "latest"]


# ------------------------------------------------------------------ exit signals, resume


def _signal_worker(tmp: str, train_prefix: str, valid_prefix: str) -> dict:
    from mtp_plugin.train import checkpoint
    from mtp_plugin.train.loop import Trainer

    ckpt = Path(tmp) / "ckpt"

    def run(train_iters: int, *, signal_at: int | None = None, **training):
        # Warmup covers iterations 1-2, so their lr does not depend on train_iters.
        cfg = tiny_experiment(
            train_prefix, valid_prefix, train_iters=train_iters, lr_warmup_iters=2, **training
        )
        cfg.model.moe_token_dispatcher_type = "allgather"
        lines: list[str] = []
        trainer = Trainer(cfg, print_fn=lines.append)
        trainer.setup()
        start = trainer.iteration
        if signal_at is not None:
            real = trainer.train_step

            def step():
                values = real()
                if trainer.iteration == signal_at:  # arrives mid-run, while the step's results are logged
                    os.kill(os.getpid(), signal.SIGTERM)
                return values

            trainer.train_step = step
        result = trainer.train()
        trainer.close()
        return {"start": start, "history": result.train_history, "lines": lines, "stop": result.stop_signal}

    dirs = {"save_dir": str(ckpt), "load_dir": str(ckpt)}
    full = run(6)
    stopped = run(4, signal_at=2, **dirs)
    after_stop = {"latest": (ckpt / checkpoint.LATEST).read_text().strip()}
    # A longer run resumes it: the lr schedule is re-derived for 6 iterations, as if it had been 6 all along.
    resumed = run(6, save_interval=1, keep_last_checkpoints=1, **dirs)
    saved = {p.name: p.stat().st_mtime_ns for p in (ckpt / "iter_0000006").iterdir()}
    again = run(6, **dirs)  # finished: says so and saves nothing
    return {
        "full": full,
        "stopped": stopped,
        "after_stop": after_stop,
        "resumed": resumed,
        "again": again,
        "dirs": sorted(p.name for p in ckpt.iterdir()),
        "untouched": saved == {p.name: p.stat().st_mtime_ns for p in (ckpt / "iter_0000006").iterdir()},
        "ckpt": str(ckpt),
    }


@pytest.mark.megatron
@pytest.mark.slow
def test_sigterm_saves_then_a_longer_run_resumes_exactly(tmp_path):
    """Before: SIGTERM killed the run unsaved; a longer train_iters on resume ran at the old schedule's
    min_lr; rerunning a finished run saved again without a word."""
    train, valid = write_tiny_corpus(tmp_path / "data")
    (out,) = run_distributed(_signal_worker, 1, str(tmp_path), train, valid, timeout=300)
    ckpt = out["ckpt"]
    stopped = out["stopped"]
    assert stopped["stop"] == "SIGTERM" and [h["iteration"] for h in stopped["history"]] == [1, 2]
    assert stopped["lines"][-1] == (
        f" SIGTERM received: stopped after iteration 2; checkpoint {ckpt}/iter_0000002; exit code 3 "
        "(rerun the same command to resume)"
    )
    assert out["after_stop"]["latest"] == "iter_0000002"
    resumed = out["resumed"]
    assert resumed["start"] == 2 and resumed["stop"] is None
    notice = [line for line in resumed["lines"] if "lr schedule re-derived" in line]
    assert len(notice) == 1 and "training.train_iters 4 -> 6" in notice[0], resumed["lines"]
    want = out["full"]["history"]
    got = stopped["history"] + resumed["history"]
    assert [h["iteration"] for h in got] == [1, 2, 3, 4, 5, 6]
    for g, w in zip(got, want, strict=True):
        for key in LOSS_KEYS:
            assert g[key] == w[key], (w["iteration"], key, g[key], w[key])
    assert out["dirs"] == ["iter_0000006", "latest"]  # keep_last_checkpoints=1
    again = out["again"]
    assert again["history"] == [] and out["untouched"]
    assert (
        f" nothing to train: {ckpt}/iter_0000006 is at iteration 6 of training.train_iters=6; nothing was "
        "saved (raise training.train_iters to go on)"
    ) in again["lines"]


def test_a_second_signal_aborts_at_once():
    from mtp_plugin.train.loop import ExitSignals, SignalAbort

    lines: list[str] = []
    with ExitSignals(["SIGUSR1"], lines.append, repeat_window_s=0.3) as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1
        # The same signal again at once is the first one delivered twice (Slurm signals every process of a
        # step, torchrun forwards it to its workers as well): it must not abort the save.
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.4)
        assert lines == []
        with pytest.raises(SignalAbort) as err:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs at the next bytecode
    assert err.value.code == 128 + signal.SIGUSR1
    assert lines == [" second SIGUSR1: aborting without saving"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # restored


def _process_group_members(pgid: int) -> list[str]:
    """Live processes in process group `pgid` (from /proc), as "pid name"."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(f"{stat.parent.name} {name}")
    return members


def _app_args(train: str, valid: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "mtp_plugin.train", *TINY_MODEL_OVERRIDES,
        f"data.train_prefix={train}", f"data.valid_prefix={valid}", "training.global_batch_size=4",
        "training.micro_batch_size=2", "training.lr_warmup_iters=1", "training.eval_interval=0",
        "training.log_interval=1", "training.progress_bar=off", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


@pytest.mark.megatron
@pytest.mark.slow
def test_app_sigterm_saves_exits_3_leaves_no_process_and_resume_checks_the_config(tmp_path):
    train, valid = write_tiny_corpus(tmp_path / "data")
    run_dir = tmp_path / "run"
    env = repo_env()
    # save_interval=1: the signals land while checkpoints are being written too.
    args = _app_args(train, valid, run_dir, "training.train_iters=50", "training.save_interval=1")

    def run_until(checkpoint: str, signum: int) -> tuple[subprocess.Popen, str, str]:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
        )  # fmt: skip
        seen = []
        try:
            for line in proc.stdout:
                seen.append(line)
                if " saved checkpoint " in line and checkpoint in line:
                    proc.send_signal(signum)
                    break
            stdout, stderr = proc.communicate(timeout=120)
            stdout = "".join(seen) + stdout
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(1)
        return proc, stdout, stderr

    # SIGKILL: nothing can run, but nothing the run started may outlive it (before: Megatron's writer
    # Manager and its resource_tracker stayed), and `latest` names a finished checkpoint.
    proc, _, _ = run_until("iter_0000001", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert _process_group_members(proc.pid) == []
    killed_at = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / killed_at / "metadata.json").is_file()
    # SIGTERM (the same command resumes): finish the iteration, save, say where, exit 3.
    proc, stdout, stderr = run_until("iter_0000003", signal.SIGTERM)
    assert proc.returncode == 3, stderr[-3000:]
    assert f"loaded checkpoint {run_dir}/checkpoints/{killed_at}" in stdout
    (last,) = [line for line in stdout.splitlines() if "SIGTERM received" in line] or [stdout[-2000:]]
    stopped_at = int(last.split("stopped after iteration ")[1].split(";")[0])
    assert stopped_at >= 3
    name = f"iter_{stopped_at:07d}"
    assert f"checkpoint {run_dir}/checkpoints/{name}; exit code 3" in last, last
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == name
    assert "Traceback" not in stderr
    assert _process_group_members(proc.pid) == []  # no checkpoint writer, manager or resource tracker left
    # The checkpoint is a D = 2 run: resuming it with one depth is refused before any model is built.
    mismatch = run_app(*_app_args(train, valid, run_dir, "training.train_iters=50", "mtp.num_depths=1")[3:])
    assert mismatch.returncode == 2, mismatch.stderr[-3000:]
    errors = [line for line in mismatch.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, mismatch.stderr[-3000:]
    assert f"error: {run_dir}/checkpoints/{name} was written with another configuration: " in errors[0]
    assert "mtp.num_depths=2 vs 1 (checkpoint vs this run)" in errors[0]
    assert "building the model" not in mismatch.stdout and "Traceback" not in mismatch.stderr


def test_resume_config_differences_name_each_field(tmp_path):
    from mtp_plugin.train import checkpoint

    saved = tiny_experiment("/data/train_text_document", None)
    (tmp_path / checkpoint.RUN_CONFIG).write_text(json.dumps(checkpoint.run_config(saved)))
    same = tiny_experiment("/data/train_text_document", None, pp=2, lr=1e-2, train_iters=60, log_interval=5)
    same.data.cache_dir = "/elsewhere"  # layout, lr schedule, intervals and caches may change on resume
    assert checkpoint.run_config_differences(tmp_path, checkpoint.run_config(same)) == []
    other = tiny_experiment("/data/other_text_document", None)
    other.mtp.num_depths, other.model.hidden_size = 1, 64
    assert checkpoint.run_config_differences(tmp_path, checkpoint.run_config(other)) == [
        "data.train_prefix=/data/train_text_document vs /data/other_text_document",
        "model.hidden_size=32 vs 64",
        "mtp.num_depths=2 vs 1",
    ]
