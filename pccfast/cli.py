"""The ``pccfast`` command."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from .info import format_info

    print(format_info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pccfast",
        description="PCC pre-training and channel-independence pruning of CNNs, with fused kernels.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    info = commands.add_parser("info", help="versions, compiled extension, available backends")
    info.set_defaults(run=_info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
