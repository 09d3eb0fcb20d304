"""A real Slurm on this machine for the `slurm` tests: munged, slurmctld and one slurmd per virtual node.

Debian's Slurm (22.05) lets several slurmd share a host: each node has its own port, spool, pid and log
file (`%n`), and `slurmd -N NAME` says which node a daemon is. Everything the daemons write - the munge
key and socket, slurm.conf, state, spool, logs - lives in one temporary directory; nothing under /etc is
touched (SLURM_CONF names the configuration, AuthInfo=socket= the munge socket), and nodes are reached at
127.0.0.1 (NodeAddr), so /etc/hosts stays as it is. The tests install nothing: `make slurm-deps` (root,
apt-get; CI's .ci/run calls it) installs the Debian packages, and without them `slurm_missing()` gives the
one-line reason the tests skip with.

Settings that are the test cluster's, not the scripts' (PLATFORM.md "A real Slurm on one machine"):
- proctrack/linuxproc and task/none: no cgroups or systemd in a container.
- AuthInfo cred_expire=5: a requeued job waits cred_expire + 1 s before it may start again (120 s by
  default); SchedulerParameters=sched_interval=1 starts it the moment it may.
- No accounting: jobs are watched with `scontrol show job`, which keeps a finished job for MinJobAge.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey", "runuser")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


def slurm_missing() -> str | None:
    """Why a local Slurm cannot start here, in one line; None when it can."""
    missing = [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} not found); `make slurm-deps` installs it (root, apt-get)"
    if os.geteuid() != 0:
        return "the local Slurm runs slurmd as root and munged as user munge: run the slurm tests as root"
    return None


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """munged + slurmctld + one slurmd per node name, configured and logged under `root`."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus_per_node: int = 2):
        self.root, self.nodes, self.cpus_per_node = Path(root), nodes, cpus_per_node
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self._munge_pid_file = self.munge_dir / "munged.pid"
        self._slurm_pid_files: list[Path] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def _start_munge(self) -> None:
        # munged runs as its own user and wants its socket directory reachable by everyone.
        self.munge_dir.mkdir(mode=0o755)
        shutil.chown(self.munge_dir, "munge", "munge")
        key = self.munge_dir / "munge.key"
        as_munge = ["runuser", "-u", "munge", "--"]
        subprocess.run([*as_munge, _sbin("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True)
        pid = self._munge_pid_file
        subprocess.run(
            [
                *as_munge, _sbin("munged"), f"--socket={self.munge_dir / 'socket'}", f"--key-file={key}",
                f"--pid-file={pid}", f"--log-file={self.munge_dir / 'munged.log'}",
                f"--seed-file={self.munge_dir / 'munged.seed'}",
            ],
            check=True, capture_output=True,
        )  # fmt: skip

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        for sub in ("state", "spool", "log"):
            (r / sub).mkdir()
        lines = [
            "ClusterName=mtptest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_dir / 'socket'},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd'}.%n.pid",
            f"SlurmctldLogFile={r / 'log'}/slurmctld.log",
            f"SlurmdLogFile={r / 'log'}/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=1",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "MinJobAge=600",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory=4000 State=UNKNOWN"
            )
        lines.append(
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP"
        )
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 30) -> None:
        self._start_munge()
        self._write_conf()
        self._run(_sbin("slurmctld"), "-i")
        self._slurm_pid_files.append(self.root / "slurmctld.pid")
        for name in self.nodes:
            self._run(_sbin("slurmd"), "-N", name)
            self._slurm_pid_files.append(self.root / f"slurmd.{name}.pid")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self._run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
            if states.count("idle") == len(self.nodes):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the nodes did not come up: {states}\n{self.logs()}")

    def stop(self) -> None:
        """Stop the Slurm daemons together, then munged, and wait until each is gone."""
        for pid_files in (self._slurm_pid_files, [self._munge_pid_file]):
            pids = []
            for pid_file in pid_files:
                try:
                    pids.append(int(pid_file.read_text().split()[0]))
                except (OSError, ValueError, IndexError):
                    continue
            _terminate(pids)
        self._slurm_pid_files.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log"))
        )

    # ------------------------------------------------------------------ jobs

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str]) -> int:
        proc = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, capture_output=True, text=True,
            env={**env, "SLURM_CONF": str(self.conf)}, timeout=60,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def sbatch_test_only(self, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        """`sbatch --test-only`: whether and when Slurm would start the job, without submitting it."""
        return subprocess.run(
            ["sbatch", "--test-only", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` as {field: value} (values without spaces, which are the ones we read)."""
        out = self._run("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(part.split("=", 1) for part in out.split() if "=" in part)

    def scontrol(self, *args: str) -> None:
        self._run("scontrol", *args)

    def wait(self, job_id: int, timeout: float, on_poll=None) -> dict[str, str]:
        """Poll until the job reaches a final state (not `sbatch --wait`, which polls at 2/8/32 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["JobState"] in FINAL_STATES:
                return job
            if on_poll is not None:
                on_poll(job)
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {job['JobState']} after {timeout} s")


def _terminate(pids: list[int], grace: float = 10) -> None:
    """SIGTERM every pid, SIGKILL those still alive `grace` seconds later."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def job_processes(job_id: int) -> list[str]:
    """Live processes whose environment says they belong to Slurm job `job_id` ("pid cmdline")."""
    found = []
    needle = f"SLURM_JOB_ID={job_id}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in proc.joinpath("environ").read_bytes().split(b"\0"):
                continue
            state = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                cmdline = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{proc.name} {cmdline}")
        except OSError:
            continue
    return found


def make_root() -> Path:
    """A fresh directory the munge user can traverse (pytest's tmp_path is root-only, mode 0700)."""
    root = Path(tempfile.mkdtemp(prefix="mtp-slurm-"))
    root.chmod(0o755)
    return root
