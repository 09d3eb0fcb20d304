"""`python -m mtp_plugin.convert export|import`: the app's checkpoints to and from Hugging Face's
DeepSeek-V3 layout with the MTP layers (README "Taking the MTP depths out").

    python -m mtp_plugin.convert export --checkpoint DIR --out HF_DIR
    python -m mtp_plugin.convert import HF_DIR --out CKPT [the run's Hydra overrides, e.g. experiment=...]

Bad input is one line `error: ...` on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _size(text: str) -> int:
    """ "2GiB", "500MB", "1048576" -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    upper = text.strip().upper()
    suffix = next((s for s in units if upper.endswith(s)), "")
    try:
        value = int(float(upper.removesuffix(suffix) if suffix else upper) * units.get(suffix, 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2GiB or 500MB") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_plugin.convert", description=__doc__.split("\n\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="a checkpoint of the app -> a Hugging Face directory")
    export.add_argument("--checkpoint", required=True, help="an iter_* checkpoint or a training.save_dir")
    export.add_argument("--out", required=True, help="the new Hugging Face directory (must not exist)")
    export.add_argument("--max-shard-size", type=_size, default="2GiB", help="largest shard (default 2GiB)")
    imp = commands.add_parser(
        "import", help="a Hugging Face directory -> a checkpoint training.load_dir reads"
    )
    imp.add_argument("hf_dir", help="config.json, *.safetensors and model.safetensors.index.json")
    imp.add_argument("--out", required=True, help="the new checkpoint directory (must not exist)")
    imp.add_argument(
        "overrides", nargs="*", help="the run's Hydra overrides (model=..., mtp=..., experiment=...)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    # Hydra overrides may come before or after --out: argparse takes positionals in one run only.
    args, rest = parser.parse_known_args(argv)
    if rest and (args.command != "import" or any(a.startswith("-") or "=" not in a for a in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if rest:
        args.overrides = [*args.overrides, *rest]
    from mtp_plugin.convert.convert import ConvertError, export_checkpoint, import_checkpoint

    try:
        if args.command == "export":
            export_checkpoint(args.checkpoint, args.out, max_shard_bytes=args.max_shard_size)
        else:
            from mtp_plugin.train.hydra_app import ConfigError, compose_experiment, quiet_megatron

            quiet_megatron()

            try:
                cfg = compose_experiment(list(args.overrides))
            except (ConfigError, ValueError) as err:
                message = str(err)
                raise SystemExit(_error(message.removeprefix("error: "))) from None
            import_checkpoint(args.hf_dir, args.out, cfg)
    except ConvertError as err:
        raise SystemExit(_error(str(err))) from None


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    main()
