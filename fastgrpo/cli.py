"""The ``fastgrpo`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgrpo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fused GRPO loss against the materialized reference on a small problem")
    from .demo import add_arguments

    add_arguments(demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
