"""Nothing lost (issue 10): a non-finite step is never applied nor saved, an exit signal saves and exits
with its own code, a resume checks the checkpoint against the run and re-derives the lr schedule, and a
finished run is not saved again. Trainer-level checks run in a spawned rank (tests/distributed_utils.py);
the exit codes and messages go through `python -m mtp_plugin.train`."""

from __future__ import annotations

import json
import math
import os
import shutil
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
        "iter_0000002 is untouched (rerun to resume from it); lower training.lr, or training.nonfinite=skip "
        "to step over such iterations"
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
    # The run ends with exit 0: the count is said at its end too (issue 21), once, by the train() that skipped.
    summary = [line for line in skip["lines"] if "skipped their update" in line]
    assert summary == [
        " 1 of 1 iterations skipped their update (non-finite loss or grad norm; training.nonfinite=skip)"
    ]


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
        "checkpoint iter_0000003 is untouched (rerun to resume from it); lower training.lr, or "
        "training.nonfinite=skip to step over such iterations"
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


# ------------------------------------------------------------------ issue 21: the history, full disks, shards


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def _train_rows(path: Path) -> list[dict]:
    from mtp_plugin.train import logs

    return [r for r in logs.read_scalars(path) if "lm loss" in r]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.megatron
@pytest.mark.mcore_agnostic
@pytest.mark.slow
def test_kill_9_loses_no_logged_row_and_a_resume_rewrites_the_history_as_one_run(corpus, tmp_path):
    """Before: scalars.jsonl was written at close (a SIGKILL lost every row of that process) and a resume
    appended the iterations it trained again (step 4 twice); TensorBoard's events likewise."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, valid = corpus
    run_dir = tmp_path / "run"
    jsonl = run_dir / "tensorboard" / "scalars.jsonl"
    args = _app_args(
        train,
        valid,
        run_dir,
        "training.train_iters=6",
        "training.save_interval=3",
        "training.eval_interval=3",
    )
    proc = subprocess.Popen(
        args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if "iteration        5/" in line:
                os.killpg(proc.pid, signal.SIGKILL)  # iteration 5 is logged; the last checkpoint is 3's
                break
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    killed = _train_rows(jsonl)
    assert [r["step"] for r in killed] == [1, 2, 3, 4, 5]  # every logged row survived the SIGKILL
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000003"

    resumed = run_app(*args[3:])  # the same command: resumes from iteration 3, trains 4-6 again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = _train_rows(jsonl)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 4 and 5 once, from the process that saved them
    assert rows[:3] == killed[:3]
    for got, was in zip(rows[3:5], killed[3:5], strict=True):  # CPU runs are deterministic: the same again
        assert {k: got[k] for k in LOSS_KEYS} == {k: was[k] for k in LOSS_KEYS}
    from mtp_plugin.train import logs

    valid_steps = [r["step"] for r in logs.read_scalars(jsonl) if "lm loss validation" in r]
    assert valid_steps == [3, 6]
    # TensorBoard reads the events of both processes; its purge hides the first one's steps 4 and 5.
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("lm loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in scalars] == pytest.approx([r["lm loss"] for r in rows], rel=1e-6)
    # train.log keeps every line printed, the killed process's iterations 4 and 5 among them, up to the
    # resume line that says where the history continues.
    log = (run_dir / "train.log").read_text()
    assert log.count("iteration        4/") == 2 and "loaded checkpoint" in log

    # A truncated shard of the newest checkpoint is one line at launch, naming the file and the one before.
    shard = run_dir / "checkpoints" / "iter_0000006" / "__0_0.distcp"
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    damaged = run_app(*_app_args(train, valid, run_dir, "training.train_iters=8")[3:])
    assert damaged.returncode == 2, damaged.stderr[-3000:]
    assert damaged.stderr.strip().splitlines() == [
        f"error: {shard} is {size // 2:,} bytes, {size:,} when saved (truncated or damaged); the checkpoint "
        f"is damaged: point {run_dir}/checkpoints/latest at the previous iter_* directory (iter_0000003 is "
        "the newest before it)"
    ]
    assert "building the model" not in damaged.stdout


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` here to make a small tmpfs")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (`mount -t tmpfs -o {options}`: {proc.stderr.strip()})")


@pytest.mark.megatron
@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "message"),
    [
        # 2 MiB: one toy checkpoint (1.8 MB) fits; the second, needing as much as the first, is refused
        # before anything is written.
        pytest.param(
            "size=2m",
            "error: not enough space in {ckpt} for checkpoint iter_0000002: it needs about {needed} bytes, "
            "{free} are free; free space or point training.save_dir elsewhere; nothing was written; "
            "{ckpt}/latest still names iter_0000001 (rerun to resume from it)",
            marks=pytest.mark.mcore_agnostic,  # refused before Megatron writes anything
        ),
        # Space enough but 13 inodes: the second checkpoint's files run out of them while being written.
        (
            "size=64m,nr_inodes=13",
            "error: writing checkpoint iter_0000002 in {ckpt} failed: No space left on device (errno 28); the "
            "partial checkpoint was removed; {ckpt}/latest still names iter_0000001 (rerun to resume from it)",
        ),
    ],
    ids=["no-space-for-the-save", "write-fails-midway"],
)
def test_a_full_disk_is_one_line_exit_5_with_the_last_checkpoint_intact(options, message, corpus, tmp_path):
    """Before: exit 1, 98 lines and two tracebacks ending in `unexpected pos 704 vs 598`."""
    train, valid = corpus
    mount = tmp_path / "small"
    _mount_tmpfs(mount, options)
    try:
        ckpt = mount / "ckpt"
        proc = run_app(
            *_app_args(
                train, valid, tmp_path / "run", "training.train_iters=3", "training.save_interval=1",
                f"training.save_dir={ckpt}", f"training.load_dir={ckpt}",
            )[3:]
        )  # fmt: skip
        free = f"{shutil.disk_usage(mount).free:,}"
        needed = f"{sum(f.stat().st_size for f in (ckpt / 'iter_0000001').iterdir()):,}"
        assert proc.returncode == 5, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [message.format(ckpt=ckpt, free=free, needed=needed)]
        assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000001", "latest"]
        assert (ckpt / "latest").read_text().strip() == "iter_0000001"
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.megatron
@pytest.mark.mcore_agnostic
@pytest.mark.slow
def test_a_run_of_a_shipped_preset_is_extended_and_its_passed_lambda_switch_stays_passed(corpus, tmp_path):
    """Before: experiment=toy_demo at 6 iterations, then at more, was refused: its λ switch (2/3 of the run)
    moved with train_iters (`boundaries_tokens=[4096.2047999999995] vs [5461.6064]`)."""
    train, valid = corpus
    run_dir = tmp_path / "run"

    def launch(*extra: str) -> subprocess.CompletedProcess:
        return run_app(*_app_args(train, valid, run_dir, "experiment=toy_demo", *extra)[3:])

    first = launch("training.train_iters=6")  # switch at 512 tokens: iteration 6 trains at λ 0.1
    assert first.returncode == 0, first.stderr[-3000:]
    longer = launch("training.train_iters=30", "training.exit_interval=7")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert (
        " λ switch re-derived from this run's length (training.train_iters 30, 3,840 tokens; 768 consumed): the "
        "switch at 512 tokens (iteration 6) has passed and stays passed (this run's length would put it at "
        "2,560 tokens (iteration 22))"
    ) in longer.stdout.splitlines(), longer.stdout[-3000:]
    rows = _train_rows(run_dir / "tensorboard" / "scalars.jsonl")
    assert [(r["step"], r["mtp lambda"]) for r in rows] == [
        (1, 0.3), (2, 0.3), (3, 0.3), (4, 0.3), (5, 0.3), (6, 0.1), (7, 0.1),
    ]  # fmt: skip


def test_a_lambda_switch_may_move_with_the_run_length_only(tmp_path):
    """A resume accepts λ switch points scaled by the run's length (a run-relative switch re-derived);
    one of the user's own moved otherwise, or another λ value, is a difference (refused at launch)."""
    from mtp_plugin.train import checkpoint

    def experiment(train_iters: int, boundary: float, values=(0.3, 0.1)):
        cfg = tiny_experiment("/data/train_text_document", None, train_iters=train_iters)
        cfg.mtp.lambda_schedule.boundaries_tokens, cfg.mtp.lambda_schedule.values = [boundary], list(values)
        return checkpoint.run_config(cfg)

    (tmp_path / checkpoint.RUN_CONFIG).write_text(json.dumps(experiment(6, 6 * 128 * 0.6667)))
    assert checkpoint.run_config_differences(tmp_path, experiment(30, 30 * 128 * 0.6667)) == []
    assert checkpoint.run_config_differences(tmp_path, experiment(30, 1000.0)) == [
        f"mtp.lambda_schedule.boundaries_tokens={[6 * 128 * 0.6667]} vs [1000.0]"
    ]
    assert checkpoint.run_config_differences(tmp_path, experiment(6, 6 * 128 * 0.6667, (0.5, 0.1))) == [
        "mtp.lambda_schedule.values=[0.3, 0.1] vs [0.5, 0.1]"
    ]


def test_a_resumed_lambda_schedule_keeps_the_switches_it_passed():
    from mtp_plugin.core.schedules import CosineLambda, PiecewiseLambda, keep_passed_switches

    old = PiecewiseLambda(boundaries_tokens=(100, 300), values=(0.3, 0.2, 0.1))
    longer = PiecewiseLambda(boundaries_tokens=(200, 600), values=(0.3, 0.2, 0.1))
    assert keep_passed_switches(old, longer, 50).boundaries_tokens == (200, 600)  # none passed: all move
    assert keep_passed_switches(old, longer, 150).boundaries_tokens == (100, 600)  # the first stays
    assert keep_passed_switches(old, longer, 300).boundaries_tokens == (
        100,
        300,
    )  # a boundary belongs to the later piece
    shorter = PiecewiseLambda(boundaries_tokens=(50, 90), values=(0.3, 0.2, 0.1))
    kept = keep_passed_switches(old, shorter, 120)  # the second lands behind the first: passed now, after it
    assert kept.boundaries_tokens[0] == 100 and 100 < kept.boundaries_tokens[1] < 100.001 and kept(120) == 0.1
    ramp = keep_passed_switches(
        CosineLambda(start_tokens=10, end_tokens=20), CosineLambda(start_tokens=30, end_tokens=60), 15
    )
    assert (ramp.start_tokens, ramp.end_tokens) == (10, 60)


@pytest.mark.megatron
@pytest.mark.mcore_agnostic
def test_sigterm_during_start_up_stops_before_training_with_one_line_and_no_run_directory(corpus, tmp_path):
    """Before: SIGTERM while the model was being built exited 143 without a word and left the run directory."""
    train, valid = corpus
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        _app_args(train, valid, run_dir, "training.train_iters=3"), cwd=REPO, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "initialising" in line:  # start-up has begun: process groups, then the model and datasets
                proc.send_signal(signal.SIGTERM)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stdout = "".join(seen) + stdout
    assert proc.returncode == 3, stderr[-3000:]
    assert (
        " SIGTERM received during start-up: stopped before training iteration 1; nothing saved; exit code 3 "
        "(rerun the same command to start)"
    ) in stdout.splitlines()
    assert "iteration        1/" not in stdout and "Traceback" not in stderr
    assert not run_dir.exists()
    assert _process_group_members(proc.pid) == []


@pytest.mark.megatron
@pytest.mark.slow
def test_a_resume_with_another_lr_trains_at_that_lr(corpus, tmp_path):
    """Before: resumed with training.lr=1e-3 after a run at 1e6, the line claimed the new lr while the
    restored param groups' max_lr of 1e6 drove the schedule (the next iterations went non-finite)."""
    train, valid = corpus
    run_dir = tmp_path / "run"
    common = ("training.train_iters=5", "training.min_lr=0", "training.save_interval=1")
    # Iteration 1 is the warmup's lr 0: the saved weights are the initial ones, only the optimizer knows 1e6.
    first = run_app(
        *_app_args(train, valid, run_dir, *common, "training.lr=1e6", "training.exit_interval=1")[3:]
    )
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_app(*_app_args(train, valid, run_dir, *common, "training.lr=1e-3")[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Every param group's lr as the resumed optimizer holds it, then each logged step's (group 0's).
    assert (
        " lr schedule re-derived from this run's settings (training.lr 1000000.0 -> 0.001): lr 0.001 at "
        "iteration 2"
    ) in resumed.stdout.splitlines(), resumed.stdout[-3000:]
    rows = _train_rows(run_dir / "tensorboard" / "scalars.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # Cosine from 1e-3 to 0 over iterations 2-5.
    want = [0.0, *(0.5e-3 * (1 + math.cos(math.pi * i / 4)) for i in range(4))]
    assert [r["learning rate"] for r in rows] == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert all(math.isfinite(r["grad norm"]) and r["grad norm"] < 100 for r in rows)
