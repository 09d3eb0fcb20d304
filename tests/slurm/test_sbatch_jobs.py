"""The shipped sbatch script against real Slurm daemons: munged, slurmctld and two slurmd as two virtual
nodes on this machine (tests/slurm_cluster.py), the tiny MoE with D = 2 on 2 nodes x 2 ranks over gloo
(pipeline 2 x data 2).

- a torchrun-per-node job completes: every depth's loss falls and the cluster ρ is in the log;
- an srun-per-rank job meets its time limit mid-run: Slurm's warning (--signal=B:USR1) makes the training
  save and exit 3, the script requeues the job, the requeued run resumes from that checkpoint and the
  job completes with, iteration for iteration, the losses of the uninterrupted job;
- a job one of whose ranks dies ends FAILED with that rank's exit code and leaves no process behind.

Hitting a time limit fast: Slurm's limits are whole minutes and slurmctld tests them (and sends the
--signal warning) every 30 s, so the test shortens the running job's limit (scontrol update TimeLimit)
to 1-2 minutes ahead, inside the warning's lead: the warning arrives at slurmctld's next 30-s check.
The test then gives the limit back, as a real requeued run gets its whole limit again. That job
evaluates every iteration, which does not touch the training's numbers, so that it is still training
when the warning comes.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, job_processes, make_root, slurm_missing
from train_tiny import REPO, TINY_MODEL_OVERRIDES, repo_env, write_tiny_corpus

from mtp_plugin.train import logs

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SCRIPT = REPO / "slurm" / "train.sbatch"
TRAIN_ITERS = 50
# After the test shortens the limit (at iteration 3), Slurm's warning comes within its 30-s check
# period; the time-limited run must still be training then, on however fast a machine.
TRAINING_AFTER_SHORTENING_S = 42
LOSSES = ("lm loss", "mtp_1 loss", "mtp_2 loss")
SHAPE = ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=10"]


@pytest.fixture(scope="module")
def cluster():
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)
    root = make_root()
    slurm = LocalSlurm(root)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir(cluster):
    """The submit directory: the corpus, the job logs and outputs/slurm/<job>-<id>/ run directories."""
    work = cluster.root / "work"
    write_tiny_corpus(work / "data")
    return work


def _overrides(work: Path, *extra: str) -> list[str]:
    return [
        *TINY_MODEL_OVERRIDES, "parallel=pp2", f"data.train_prefix={work}/data/train_text_document",
        f"data.valid_prefix={work}/data/valid_text_document", f"training.train_iters={TRAIN_ITERS}",
        "training.global_batch_size=4", "training.micro_batch_size=2", "training.lr_warmup_iters=1",
        "training.eval_interval=0", "training.log_interval=1", "training.progress_bar=off",
        "training.tensorboard_dir=null", *extra,
    ]  # fmt: skip


def _job_env(launcher: str) -> dict[str, str]:
    return repo_env(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        MTP_DEVICE="cpu",
        MTP_PYTHON=sys.executable,
        MTP_LAUNCHER=launcher,
    )


def _log(work: Path, name: str, job_id: int) -> str:
    path = work / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _iterations(log: str) -> dict[int, dict[str, float]]:
    """{iteration: its logged losses}; an iteration logged twice (a resume repeating it) must agree."""
    out: dict[int, dict[str, float]] = {}
    for line in log.splitlines():
        fields = logs.parse_log_line(line)
        if fields and "validation" not in fields and "lm loss" in fields:
            it = int(fields["iteration"])
            assert out.setdefault(it, fields) == fields, (it, out[it], fields)
    return out


def _tail(log: str, lines: int = 12) -> str:
    return "\n".join(line[:240] for line in log.splitlines()[-lines:])


@pytest.fixture(scope="module")
def completed_job(cluster, workdir):
    """The uninterrupted job (torchrun per node); its losses are the reference of the requeued one."""
    start = time.monotonic()
    job_id = cluster.sbatch(*SHAPE, "--job-name=full", str(SCRIPT), *_overrides(workdir),
                            cwd=workdir, env=_job_env("torchrun"))  # fmt: skip
    job = cluster.wait(job_id, timeout=240)
    log = _log(workdir, "full", job_id)
    print(
        f"\njob {job_id} (torchrun): {job['JobState']} {job['ExitCode']} in {time.monotonic() - start:.0f} s\n{_tail(log)}"
    )
    return job, log


def test_torchrun_job_completes_every_depth_learns_and_logs_cluster_rho(completed_job, workdir):
    job, log = completed_job
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), _tail(log, 60)
    assert "launcher torchrun, device cpu, 4 rank(s), rendezvous 127.0.0.1:" in log
    assert "initialising 4 process(es) (tp 1, pp 2, ep 1)" in log
    steps = _iterations(log)
    assert sorted(steps) == list(range(1, TRAIN_ITERS + 1))
    for key in LOSSES:
        assert steps[TRAIN_ITERS][key] < steps[1][key] - 0.3, (key, steps[1][key], steps[TRAIN_ITERS][key])
    # The cluster ρ (bits over the FLOPs all four ranks executed) in the last rank's log line.
    last = next(line for line in reversed(log.splitlines()) if f"iteration {TRAIN_ITERS:8d}/" in line)
    rho = {k: float(v) for k, v in re.findall(r"(rho_(?:ceiling|effective)) bits/GFLOP: ([0-9.E+-]+)", last)}
    assert rho.keys() == {"rho_ceiling", "rho_effective"} and 0 < rho["rho_effective"] < rho["rho_ceiling"]
    assert "training exited with code 0" in log
    run_dir = workdir / "outputs" / "slurm" / f"full-{job['JobId']}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"iter_{TRAIN_ITERS:07d}"
    assert (run_dir / "train.log").is_file()


def test_time_limit_warning_saves_requeues_and_resumes_to_the_uninterrupted_losses(
    cluster, workdir, completed_job
):
    reference = _iterations(completed_job[1])
    # Evaluating every iteration (forward only, fixed validation batches) slows the run, not its numbers:
    # enough batches, from the uninterrupted job's pace, to train TRAINING_AFTER_SHORTENING_S after
    # iteration 3 (one validation batch costs about half a training iteration).
    step_s = (
        sorted(reference[it]["elapsed time per iteration (ms)"] for it in reference)[len(reference) // 2]
        / 1e3
    )
    wanted_step_s = TRAINING_AFTER_SHORTENING_S / (TRAIN_ITERS - 3)
    eval_iters = min(100, max(1, math.ceil((wanted_step_s / step_s - 1) / 0.5)))
    args = _overrides(workdir, "training.eval_interval=1", f"training.eval_iters={eval_iters}")
    job_id = cluster.sbatch(*SHAPE, "--signal=B:USR1@150", "--job-name=limit", str(SCRIPT), *args,
                            cwd=workdir, env=_job_env("srun"))  # fmt: skip
    events: dict[str, float] = {}
    start = time.monotonic()

    def on_poll(job: dict[str, str]) -> None:
        log = _log(workdir, "limit", job_id)
        if "shortened" not in events and job["JobState"] == "RUNNING" and "iteration        3/" in log:
            minutes, seconds = (int(x) for x in job["RunTime"].split(":")[-2:])
            # 60-120 s left, within the 150 s lead: Slurm warns at its next time-limit check.
            cluster.scontrol("update", f"JobId={job_id}", f"TimeLimit={minutes + 2}")
            events["shortened"] = time.monotonic() - start
            events["shortened_at_runtime_s"] = minutes * 60 + seconds
        if "shortened" in events and "restored" not in events and "time-limit warning" in log:
            cluster.scontrol("update", f"JobId={job_id}", "TimeLimit=10")
            events["restored"] = time.monotonic() - start

    job = cluster.wait(job_id, timeout=420, on_poll=on_poll)
    log = _log(workdir, "limit", job_id)
    print(f"\njob {job_id} (srun, requeued, eval_iters {eval_iters} at {step_s:.3f} s/iteration): {job['JobState']} {job['ExitCode']} restarts {job['Restarts']}, "
          f"in {time.monotonic() - start:.0f} s; {events}\n{_tail(log)}")  # fmt: skip
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), _tail(log, 80)
    assert "shortened" in events and "restored" in events, events
    (stop,) = re.findall(
        r"SIGUSR1 received: stopped after iteration (\d+); checkpoint (\S+); exit code 3", log
    )
    stopped_at, checkpoint = int(stop[0]), stop[1]
    assert 3 <= stopped_at < TRAIN_ITERS and checkpoint.endswith(f"/iter_{stopped_at:07d}")
    assert "training exited with code 3" in log
    assert f"requeueing job {job_id} (restart 1)" in log
    assert f"job {job_id} (restart 1) on 2 node(s)" in log
    assert f"loaded checkpoint {checkpoint} at iteration {stopped_at}" in log
    steps = _iterations(log)
    assert sorted(steps) == list(range(1, TRAIN_ITERS + 1))
    for it in range(1, TRAIN_ITERS + 1):
        assert {k: steps[it][k] for k in LOSSES} == {k: reference[it][k] for k in LOSSES}, it


def _rank_pid(job_id: int, rank: int) -> int | None:
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = proc.joinpath("environ").read_bytes().split(b"\0")
            cmdline = proc.joinpath("cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"SLURM_JOB_ID={job_id}".encode() in env
            and f"RANK={rank}".encode() in env
            and b"mtp_plugin.train" in cmdline
            and b"torch.distributed.run" not in cmdline
        ):
            return int(proc.name)
    return None


def test_a_dying_rank_fails_the_job_and_leaves_no_process(cluster, workdir):
    job_id = cluster.sbatch(*SHAPE, "--job-name=crash", str(SCRIPT), *_overrides(workdir),
                            cwd=workdir, env=_job_env("srun"))  # fmt: skip
    killed: list[int] = []

    def on_poll(job: dict[str, str]) -> None:
        if not killed and "iteration        2/" in _log(workdir, "crash", job_id):
            pid = _rank_pid(job_id, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
                killed.append(pid)

    start = time.monotonic()
    job = cluster.wait(job_id, timeout=240, on_poll=on_poll)
    log = _log(workdir, "crash", job_id)
    print(
        f"\njob {job_id} (srun, rank 1 killed): {job['JobState']} {job['ExitCode']} in {time.monotonic() - start:.0f} s\n{_tail(log)}"
    )
    assert killed, "rank 1 was never seen"
    # The killed rank's code (128 + SIGKILL), not that of a rank srun terminated afterwards.
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", f"{128 + signal.SIGKILL}:0"), _tail(log, 60)
    assert f"rank 1 failed first (exit code {128 + signal.SIGKILL})" in log
    assert f"iteration {TRAIN_ITERS:8d}/" not in log
    deadline = time.monotonic() + 10
    while job_processes(job_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_processes(job_id) == []


@pytest.mark.parametrize("name", ["train.sbatch", "deepseek_v3_671b.sbatch", "deepspeed.sbatch"])
def test_sbatch_test_only_accepts_every_script(cluster, workdir, name):
    """Each script's #SBATCH lines as they are, with the node shape shrunk to this 2-node, GPU-less cluster."""
    script = REPO / "slurm" / name
    ok = cluster.sbatch_test_only(
        "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", str(script), cwd=workdir
    )
    assert ok.returncode == 0 and " to start at " in ok.stderr, ok.stderr
    if name == "deepseek_v3_671b.sbatch":
        # Its own 256 nodes x 8 tasks (GPUs left out: this cluster has none) is refused by node count.
        full = cluster.sbatch_test_only("--gpus-per-node=0", str(script), cwd=workdir)
        assert full.returncode != 0 and "Requested node configuration is not available" in full.stderr, (
            full.stderr
        )
