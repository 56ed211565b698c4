"""The bench's table, its targets, and the facts of the machine it ran on."""

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]

from bench.wrk import Measure


@dataclass(frozen=True)
class Scenario:
    key: str  # e.g. "A8": the letter of the issue and the connections
    label: str
    connections: int
    unit: str = "req/s"
    ceiling: str | None = None  # key of the scenario whose rate is this one's database ceiling
    per_request: int = 1  # tickets per request (the batch route)


@dataclass
class Row:
    scenario: Scenario
    runs: list[Measure] = field(default_factory=list)
    note: str = ""

    @property
    def rate(self) -> float:
        return statistics.median(m.rate for m in self.runs) * self.scenario.per_request if self.runs else 0.0

    @property
    def p50(self) -> float:
        return statistics.median(m.p50_ms for m in self.runs) if self.runs else 0.0

    @property
    def p99(self) -> float:
        return statistics.median(m.p99_ms for m in self.runs) if self.runs else 0.0

    @property
    def p999(self) -> float:
        return statistics.median(m.p999_ms for m in self.runs) if self.runs else 0.0

    @property
    def max(self) -> float:
        return statistics.median(m.max_ms for m in self.runs) if self.runs else 0.0

    @property
    def errors(self) -> int:
        return sum(m.errors for m in self.runs)


def ratio(row: Row, rows: dict[str, Row]) -> float | None:
    ceiling = rows.get(row.scenario.ceiling or "")
    if ceiling is None or not ceiling.rate or not row.runs:
        return None
    return row.rate / ceiling.rate


def table(rows: dict[str, Row]) -> list[str]:
    head = (
        f"{'scenario':<44} {'conns':>5} {'rate':>16} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>8} {'max ms':>8}"
        f" {'errors':>6}  {'ceiling':<14}"
    )
    lines = [head, "-" * len(head)]
    for row in rows.values():
        s = row.scenario
        if not row.runs:
            lines.append(f"{s.label:<44} {s.connections:>5}  skipped: {row.note}")
            continue
        r = ratio(row, rows)
        ceiling = f"{r:.2f} x {s.ceiling}" if r and s.ceiling else "-"
        lines.append(
            f"{s.label:<44} {s.connections:>5} {row.rate:>10,.0f} {s.unit:<5} {row.p50:>8.2f} {row.p99:>8.2f}"
            f" {row.p999:>8.2f} {row.max:>8.1f} {row.errors:>6}  {ceiling:<14}"
        )
    return lines


def targets(rows: dict[str, Row], soak_grew: bool | None) -> list[str]:
    """The issues' targets (10: contention and the tail; 16: the cost of a create), each met or missed."""
    out: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append(f"  [{'met ' if ok else 'MISS'}] {name}: {detail}")

    for key in ("A32", "E32"):
        row = rows.get(key)
        if row and row.runs:
            check(f"{key[0]} 32 conns p99 <= 20 ms, p99.9 <= 50 ms, 0 errors",
                  row.p99 <= 20 and row.p999 <= 50 and not row.errors,
                  f"p99 {row.p99:.1f} ms, p99.9 {row.p999:.1f} ms, {row.errors} errors")
    a8 = rows.get("A8")
    if a8 and a8.runs:
        check("A 8 conns p99 <= 10 ms, 0 errors", a8.p99 <= 10 and not a8.errors, f"p99 {a8.p99:.1f} ms")
    a32 = rows.get("A32")
    if a32 and a32.runs:
        r = ratio(a32, rows) or 0.0
        check("A 32 conns >= 0.45 x the HTTP ceiling (H32)", r >= 0.45, f"{r:.2f} x ({a32.rate:,.0f} req/s)")
    c = next((row for key, row in rows.items() if key.startswith("C") and row.runs), None)
    if c:
        bulk = ratio(c, rows)
        against = f", {bulk:.2f} x the bulk-load ceiling ({c.scenario.ceiling})" if bulk else ""
        check("C >= 40,000 tickets/s", c.rate >= 40_000, f"{c.rate:,.0f} tickets/s{against}")
    if soak_grew is not None:
        check("no RSS growth over the soak", not soak_grew, "grew" if soak_grew else "flat")
    return out


def machine(database: dict[str, str]) -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cpu": cpu_model,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "wrk": wrk_version.strip(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        **database,
    }
