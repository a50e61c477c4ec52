"""``python -m bench [NAME ...] [--database-url URL] [--quick] [--repeat N]``: run all, or those named.

Names: breaker, retry, throughput, latency, rate_limit, database, memory, reconcile, bulk, bulk_throughput.
Each prints its table and writes ``bench/results/<name>.md``. ``--database-url`` (or
``CERTSYNC_TEST_DATABASE_URL``) is an admin connection to a PostgreSQL server on which fresh databases
are created and dropped; without either, the embedded server the tests use is started. ``--repeat N``
measures N independent runs in one invocation and reports each, for the benchmarks whose module sets
``REPEATABLE`` (rate_limit).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from types import ModuleType

from bench import DATABASE_ENV, Options
from bench._report import console, publish

NAMES = (
    "breaker",
    "retry",
    "throughput",
    "latency",
    "rate_limit",
    "database",
    "memory",
    "reconcile",
    "bulk",
    "bulk_throughput",
)


def parse(argv: list[str]) -> tuple[list[str], Options]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(NAMES) + " (default: all)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_ENV),
        help=f"admin connection string (default: ${DATABASE_ENV}, else the embedded server)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller scale, for trying the scripts out")
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N", help="independent runs, each reported (rate_limit only)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(NAMES)}")
    names = list(args.names) or list(NAMES)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.repeat > 1:
        single = [name for name in names if not getattr(_module(name), "REPEATABLE", False)]
        if single:
            parser.error(f"--repeat is not supported by {', '.join(single)}")
    return names, Options(database_url=args.database_url, quick=args.quick, repeat=args.repeat)


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"bench.bench_{name}")


def main(argv: list[str] | None = None) -> int:
    names, options = parse(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    for name in names:
        module = _module(name)
        begun = time.monotonic()
        publish(module.run(options))
        console.print(f"[dim]{name}: {time.monotonic() - begun:.0f} s[/]\n")
    console.print(f"[bold]all benchmarks: {time.monotonic() - started:.0f} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
