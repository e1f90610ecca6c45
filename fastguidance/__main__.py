"""Command line: ``python -m fastguidance bench [options]`` (see ``--help``)."""

from __future__ import annotations

import argparse

from . import bench


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastguidance", description="FastGuidance tools")
    commands = parser.add_subparsers(dest="command", required=True)
    bench_parser = commands.add_parser("bench", help="every method against CFG on the bundled reference model",
                                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(bench_parser)
    options = parser.parse_args(argv)
    if options.command == "bench":
        bench.main(options)


if __name__ == "__main__":
    main()
