"""`python -m mtp_plugin.plan [group=option ...] [field=value ...] [--json] [--world-size N]
[--device-memory-gib G]`: the training app's configuration (same groups, overrides and checks), sized
on the meta device. Bad input is one line naming the field and the fix, exit status 2."""

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
    args = parser.parse_intermixed_args(argv)

    from mtp_plugin.train.hydra_app import ConfigError, compose_experiment, quiet_megatron

    quiet_megatron()  # Megatron's import-time Apex/TE UserWarnings would fill the top of the report
    try:
        experiment = compose_experiment(args.overrides)
        if args.world_size is not None and args.world_size < 1:
            raise ConfigError(f"error: --world-size must be >= 1, got {args.world_size}")
        from mtp_plugin.plan import format_report, plan_experiment

        try:
            report = plan_experiment(
                experiment, world_size=args.world_size, device_memory_gib=args.device_memory_gib
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


if __name__ == "__main__":
    sys.exit(main())
