"""Reporting a benchmark: Rich tables on the terminal and a Markdown record in ``bench/results/<name>.md``.

Every record says where and how it was measured (machine, Python, package versions, date, the exact
command) so that a figure is never read without its conditions.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from rich.console import Console
from rich.table import Table as RichTable

RESULTS = Path(__file__).parent / "results"

# What the records list: ours and every peer, plus the drivers that shape the figures.
PACKAGES = (
    "certsync",
    "aiobreaker",
    "backoff",
    "circuitbreaker",
    "httpx",
    "procrastinate",
    "psutil",
    "psycopg",
    "psycopg-binary",
    "psycopg-pool",
    "purgatory",
    "pybreaker",
    "stamina",
    "structlog",
    "tenacity",
    "uvicorn",
)

console = Console(width=None if sys.stdout.isatty() else 140)


@dataclass(frozen=True, slots=True)
class Table:
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True, slots=True)
class Target:
    """One line of an issue's table of targets: what was promised, what was measured, whether it holds."""

    measure: str
    target: str
    measured: str
    met: bool


@dataclass(slots=True)
class Report:
    name: str
    title: str
    method: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra_machine: dict[str, str] = field(default_factory=dict)
    issue: int = 7  # the issue whose targets these are

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.tables.append(
            Table(title, tuple(columns), tuple(tuple(_cell(value) for value in row) for row in rows))
        )

    def target(self, measure: str, target: str, measured: str, met: bool) -> None:
        self.targets.append(Target(measure, target, measured, met))


def _cell(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> dict[str, str]:
    return {
        "cores (nproc)": str(os.cpu_count()),
        "CPU": cpu_model(),
        "memory": memory_total(),
        "OS": platform.platform(),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "load average when recorded (1, 5, 15 min)": ", ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def command() -> str:
    argv = [Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]
    return shlex.join(argv)


def publish(report: Report) -> Path:
    """Print the report's tables and targets, and write its Markdown record; returns the record's path."""
    console.rule(f"[bold]{report.title}")
    for table in report.tables:
        rich = RichTable(title=table.title, title_justify="left")
        for index, column in enumerate(table.columns):
            rich.add_column(column, justify="left" if index == 0 else "right")
        for row in table.rows:
            rich.add_row(*row)
        console.print(rich)
    if report.targets:
        rich = RichTable(title=f"Targets (issue {report.issue})", title_justify="left")
        for column in ("measure", "target", "measured", "verdict"):
            rich.add_column(column)
        for target in report.targets:
            verdict = "[green]met[/]" if target.met else "[red]missed[/]"
            rich.add_row(target.measure, target.target, target.measured, verdict)
        console.print(rich)
    for note in report.notes:
        console.print(f"[dim]• {note}[/]")
    path = RESULTS / f"{report.name}.md"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(report))
    console.print(
        f"[dim]written {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}[/]"
    )
    return path


def markdown(report: Report) -> str:
    lines = [f"# {report.title}", "", report.method, ""]
    for table in report.tables:
        lines += [f"### {table.title}", "", *_markdown_table(table.columns, table.rows), ""]
    if report.targets:
        rows = tuple(
            (t.measure, t.target, t.measured, "met" if t.met else "**missed**") for t in report.targets
        )
        lines += [
            f"### Targets (issue {report.issue})",
            "",
            *_markdown_table(("measure", "target", "measured", ""), rows),
            "",
        ]
    if report.notes:
        lines += ["### Notes", "", *(f"- {note}" for note in report.notes), ""]
    conditions = {**machine(), **report.extra_machine}
    lines += [
        "### Conditions",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command()}`",
        *(f"- {key}: {value}" for key, value in conditions.items()),
        "- packages: " + ", ".join(f"{name} {version}" for name, version in versions().items()),
        "",
    ]
    return "\n".join(lines)


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(columns), "|" + "|".join("---" for _ in columns) + "|", *(line(row) for row in rows)]
