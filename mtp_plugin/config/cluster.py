"""Where a run executes: the schema Hydra's `cluster/` group fills (launch details: slurm/ and its README)."""

from __future__ import annotations

from dataclasses import dataclass

from mtp_plugin.config.checks import check_finite

LAUNCHERS = ("local", "slurm")


@dataclass(kw_only=True)
class ClusterConfig:
    """The machines a run (or a plan) is for.

    launcher: "local" (this machine; `torchrun` or one process) or "slurm" (sbatch scripts under slurm/).
    num_nodes x gpus_per_node is the world size the planner sizes a layout for (a local run's world size is
      what torchrun starts). device_memory_gib: memory of one accelerator, the planner's "fits" limit.
    partition / account / time_limit: Slurm's --partition, --account, --time (null: the site's defaults).
    `sbatch_options()`: those as the options of `sbatch slurm/train.sbatch` (one task, i.e. rank, per GPU).
    """

    launcher: str = "local"
    num_nodes: int = 1
    gpus_per_node: int = 1
    device_memory_gib: float = 80.0
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None

    def __post_init__(self) -> None:
        check_finite(self, "cluster")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"cluster.launcher={self.launcher!r}; use one of {LAUNCHERS}")
        for name in ("num_nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise ValueError(f"cluster.{name} must be >= 1, got {getattr(self, name)}")
        if self.device_memory_gib <= 0:
            raise ValueError(f"cluster.device_memory_gib must be > 0, got {self.device_memory_gib}")
        if self.launcher == "local" and self.num_nodes != 1:
            raise ValueError(
                f"cluster.num_nodes={self.num_nodes} with launcher=local; use cluster=slurm for several nodes"
            )

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def sbatch_options(self) -> list[str]:
        """sbatch options that allocate this cluster for the scripts under slurm/ (one task per GPU)."""
        if self.launcher != "slurm":
            raise ValueError(
                f"cluster.launcher={self.launcher!r} is not launched by sbatch; use cluster=slurm"
            )
        options = [f"--nodes={self.num_nodes}", f"--ntasks-per-node={self.gpus_per_node}"]
        options.append(f"--gpus-per-node={self.gpus_per_node}")
        for flag, value in (
            ("partition", self.partition),
            ("account", self.account),
            ("time", self.time_limit),
        ):
            if value:
                options.append(f"--{flag}={value}")
        return options
