"""`python -m mtp_plugin.plan [group=option ...] [field=value ...] [--json] [--world-size N]
[--device-memory-gib G] [--costs FILE]`: the training app's configuration (same groups, overrides and
checks), sized on the meta device; `--costs` ranks the pipeline placements by measured per-piece costs
(`benchmarks/layer_costs.py`). Bad input is one line naming the field and the fix, exit status 2."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtp_plugin.plan", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m mtp_plugin.train")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--world-size", type=int, default=None, help="GPUs (default: the cluster group's)")
    parser.add_argument(
        "--device-memory-gib", type=float, default=None, help="memory of one GPU (default: cluster's, 80)"
    )
    parser.add_argument(
        "--costs",
        default=None,
        help="measured per-piece costs (JSON of benchmarks/layer_costs.py) for the placements' step times",
    )
    args = parser.parse_intermixed_args(argv)

    from mtp_plugin.train.hydra_app import ConfigError, compose_experiment, quiet_megatron

    quiet_megatron()  # Megatron's import-time Apex/TE UserWarnings would fill the top of the report
    try:
        experiment = compose_experiment(args.overrides)
        if args.world_size is not None and args.world_size < 1:
            raise ConfigError(f"error: --world-size must be >= 1, got {args.world_size}")
        from mtp_plugin.plan import format_report, plan_experiment

        try:
            costs = _read_costs(args.costs) if args.costs else None
            report = plan_experiment(
                experiment, world_size=args.world_size, device_memory_gib=args.device_memory_gib, costs=costs
            )
        except (ValueError, OSError) as err:
            raise ConfigError(f"error: {err}") from None
    except ConfigError as err:
        print(err.message, file=sys.stderr)
        return 2
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print(format_report(report, experiment.name))
    return 0


def _read_costs(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--costs {path} is not JSON ({err.msg}); write it with benchmarks/layer_costs.py"
        ) from None
    except OSError as err:
        raise ValueError(
            f"--costs {path}: {err.strerror}; give a file benchmarks/layer_costs.py wrote"
        ) from None


if __name__ == "__main__":
    sys.exit(main())
