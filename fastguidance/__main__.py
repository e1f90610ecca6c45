"""Command line: ``python -m fastguidance bench [options]`` (see ``--help``).

Every option is checked before any sampling; a refusal is one line naming the option and the fix
(:mod:`fastguidance.research.cli`), never a traceback.
"""

from __future__ import annotations

from .research import bench
from .research.cli import CommandLineParser, run_refusing_in_one_line

PROG = "python -m fastguidance"


def main(argv: list[str] | None = None) -> None:
    parser = CommandLineParser(prog=PROG, description="FastGuidance tools")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandLineParser)
    bench_parser = commands.add_parser("bench", help="every method against CFG and a CFG window on the bundled "
                                                     "reference model", description=bench.__doc__)
    bench.add_arguments(bench_parser)
    options = parser.parse_args(argv)
    if options.command == "bench":
        run_refusing_in_one_line(f"{PROG} bench", lambda: bench.main(options))


if __name__ == "__main__":
    main()
