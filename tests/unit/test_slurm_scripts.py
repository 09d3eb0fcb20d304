"""The sbatch scripts under slurm/ against the configs they launch: the 671B script allocates exactly the
DeepSeek-V3 cluster its experiment is planned for (cluster=h800_2048, pp16 x ep64), every script asks for
a time-limit warning it can act on and is requeueable. (tests/slurm/ submits them to real Slurm.)"""

from __future__ import annotations

import re
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from train_tiny import REPO

from mtp_plugin.config import ClusterConfig
from mtp_plugin.train.hydra_app import CONFIG_DIR, register_configs, to_experiment

SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


def sbatch_options(path) -> dict[str, str]:
    """{option: value} of a script's `#SBATCH --name[=value]` lines (comments after them dropped)."""
    options = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if match:
            options[match.group(1)] = match.group(2) or ""
    return options


def test_the_671b_script_allocates_the_deepseek_v3_plan():
    options = sbatch_options(REPO / "slurm" / "deepseek_v3_671b.sbatch")
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        experiment = to_experiment(compose(config_name="config", overrides=["experiment=deepseek_v3_671b"]))
    cluster, par = experiment.cluster, experiment.parallel
    # The allocation `python -m mtp_plugin.plan experiment=deepseek_v3_671b` prints as its sbatch line.
    assert cluster.sbatch_options() == [
        f"--{k}={options[k]}" for k in ("nodes", "ntasks-per-node", "gpus-per-node")
    ]
    assert int(options["nodes"]) == cluster.num_nodes == 256
    # One srun task (rank) per GPU.
    assert int(options["ntasks-per-node"]) == int(options["gpus-per-node"]) == cluster.gpus_per_node == 8
    world_size = int(options["nodes"]) * int(options["ntasks-per-node"])
    assert (par.pipeline_model_parallel_size, par.expert_model_parallel_size) == (16, 64)
    assert experiment.check_world_size(world_size) == 128  # data parallel: 2048 / pp16
    assert "experiment=deepseek_v3_671b" in (REPO / "slurm" / "deepseek_v3_671b.sbatch").read_text()


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_script_warns_before_its_limit_and_can_requeue(script):
    options = sbatch_options(script)
    signal_name, lead_s = re.fullmatch(r"B:(\w+)@(\d+)", options["signal"]).groups()
    assert (
        signal_name == "USR1" and 60 <= int(lead_s) <= 3600
    )  # the launch body traps USR1 in the batch shell
    assert "requeue" in options and options["open-mode"] == "append"
    assert "%j" in options["output"]
    text = script.read_text()
    assert 'source "$slurm_dir/mtp_launch.sh"' in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_sbatch_options_of_a_cluster():
    cluster = ClusterConfig(
        launcher="slurm", num_nodes=4, gpus_per_node=8, partition="gpu", time_limit="04:00:00"
    )
    assert cluster.sbatch_options() == [
        "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--time=04:00:00",
    ]  # fmt: skip
    with pytest.raises(
        ValueError, match="cluster.launcher='local' is not launched by sbatch; use cluster=slurm"
    ):
        ClusterConfig().sbatch_options()
