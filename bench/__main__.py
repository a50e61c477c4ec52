"""``python -m bench [NAME ...] [--database-url URL] [--quick]``: run every benchmark, or the ones named.

Names: breaker, retry, throughput, latency, rate_limit, database, memory, reconcile, bulk. Each prints
its table and writes ``bench/results/<name>.md``. ``--database-url`` (or ``CERTSYNC_TEST_DATABASE_URL``) is
an admin connection to a PostgreSQL server on which fresh databases are created and dropped; without either,
the embedded server the tests use is started.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from bench import DATABASE_ENV, Options
from bench._report import console, publish

NAMES = ("breaker", "retry", "throughput", "latency", "rate_limit", "database", "memory", "reconcile", "bulk")


def parse(argv: list[str]) -> tuple[list[str], Options]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(NAMES) + " (default: all)")
    parser.add_argument(
        "--database-url",
        default=os.environ.get(DATABASE_ENV),
        help=f"admin connection string (default: ${DATABASE_ENV}, else the embedded server)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller scale, for trying the scripts out")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(NAMES)}")
    return list(args.names) or list(NAMES), Options(database_url=args.database_url, quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    names, options = parse(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    for name in names:
        module = importlib.import_module(f"bench.bench_{name}")
        begun = time.monotonic()
        publish(module.run(options))
        console.print(f"[dim]{name}: {time.monotonic() - begun:.0f} s[/]\n")
    console.print(f"[bold]all benchmarks: {time.monotonic() - started:.0f} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
