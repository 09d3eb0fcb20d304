"""Plan many configurations in one process (`python tests/plan_jobs.py < jobs.json > plans.json`).

Each job is a list of the planner's command-line overrides; the answer for each is the planner's JSON
report, or {"error": <the one-line message>} for a configuration it refuses. The meta-device parameter
table is built once per distinct model and MTP depth count (the rest of a plan is arithmetic). Runs in
its own process: the planner builds in a one-process group and puts torch in Megatron's CPU mode.
"""

from __future__ import annotations

import json
import sys


def plan_all(jobs: list[list[str]]) -> list[dict]:
    from hydra import compose, initialize_config_dir

    from mtp_plugin.train import hydra_app

    hydra_app.register_configs()
    tables: dict[str, list] = {}
    # One Hydra initialisation for every job (the CLI's compose_experiment makes one per call).
    with initialize_config_dir(config_dir=str(hydra_app.CONFIG_DIR), version_base="1.3", job_name="plan"):
        return [_plan_one(compose(config_name=hydra_app.CONFIG_NAME, overrides=job), tables) for job in jobs]


def _plan_one(cfg, tables: dict[str, list]) -> dict:
    from mtp_plugin.plan import check_plan, plan_experiment
    from mtp_plugin.plan.build import parameter_table
    from mtp_plugin.train.hydra_app import ConfigError, to_experiment

    try:
        experiment = to_experiment(cfg)
        try:
            check_plan(experiment)  # before any build, as the CLI does
        except (ValueError, OSError) as err:
            raise ConfigError(f"error: {err}") from None
    except ConfigError as err:
        return {"error": err.message}
    key = repr((experiment.model, experiment.mtp.num_depths))
    if key not in tables:
        tables[key] = parameter_table(experiment)
    return plan_experiment(experiment, records=tables[key])


if __name__ == "__main__":
    json.dump(plan_all(json.load(sys.stdin)), sys.stdout)
