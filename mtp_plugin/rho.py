"""ρ (supervisory bits per FLOP) from the command line.

python -m mtp_plugin.rho density-table [--json]  # Chapter 7 §7.1's ρ tables, in correct units
python -m mtp_plugin.rho mtp-cost [--json]       # true FLOP cost of MTP depths per model shape
"""

from __future__ import annotations

import argparse
import json
import sys

from mtp_plugin.accounting.seed import (
    default_mtp_costs,
    format_mtp_costs,
    format_seed_table,
    seed_rows,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtp_plugin.rho", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser(
        "density-table",
        aliases=["seed-table"],  # its first name
        help="§7.1's 7B/70B/671B supervisory-density tables (and the true cost of MTP)",
    )
    table.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    cost = sub.add_parser("mtp-cost", help="analytic FLOP cost of MTP depths per model shape")
    cost.add_argument("--json", action="store_true", help="print the costs as a JSON list")
    args = parser.parse_args(argv)

    if args.command in ("density-table", "seed-table"):
        rows = seed_rows()
        if args.json:
            json.dump([row.to_json() for row in rows], sys.stdout, indent=2)
            print()
        else:
            print(format_seed_table(rows))
            print()
            print(format_mtp_costs(default_mtp_costs()))
    else:
        costs = default_mtp_costs()
        if args.json:
            json.dump([c.to_json() for c in costs], sys.stdout, indent=2)
            print()
        else:
            print(format_mtp_costs(costs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
