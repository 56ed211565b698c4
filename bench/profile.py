"""py-spy on the server's workers under load, summarized as where the CPU time goes."""

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench.server import Server


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(server: Server, seconds: float, out_dir: Path, stamp: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """py-spy record (collapsed stacks, without pausing the process) on each worker for `seconds`."""
    spy = py_spy()
    if spy is None:
        raise SystemExit("bench: --profile needs py-spy: `.venv/bin/pip install py-spy`")
    started = []
    for worker in server.workers():
        out = out_dir / f"profile-{stamp}-{worker.pid}.txt"
        command = [
            spy, "record", "--pid", str(worker.pid), "--duration", str(max(1, round(seconds))), "--rate", "250",
            "--nonblocking", "--format", "raw", "--output", str(out),
        ]
        started.append((subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out))
    return started


def finish(started: list[tuple[subprocess.Popen[bytes], Path]], seconds: float) -> list[Path]:
    written = []
    for process, out in started:
        try:
            _, err = process.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        if out.exists():
            written.append(out)
        else:
            print(f"bench: py-spy wrote nothing (exit {process.returncode}): {err.decode()[-300:]}")
    return written


# Where a sample's time goes: the first of these found in its stack, innermost frame first.
_AREAS = [
    ("asyncpg (protocol, codecs, pool)", ("asyncpg/",)),
    ("JSON and validation (msgspec, email-validator, app.validation)", ("validation.py", "email_validator", "msgspec")),
    ("auth (token cache, host, sha256)", ("auth.py",)),
    ("app hot path (writer, routes, ids)", ("writer.py", "statement.py", "coalesce.py", "tickets.py", "intake.py",
                                           "ids.py", "batch.py", "idempotency.py")),
    ("access log and metrics (app.logs, app.observability, prometheus_client)",
     ("app/logs.py", "app/observability.py", "prometheus_client")),
    ("rate limits (app.limiter, app.rates)", ("app/limiter.py", "app/rates.py")),
    ("Starlette routing, requests, responses, middleware", ("starlette/",)),
    ("HTTP protocol (app.http, app.limits, httptools, uvicorn)",
     ("app/http.py", "app/limits.py", "uvicorn/", "httptools")),
    ("asyncio/uvloop event loop", ("asyncio/", "uvloop")),
]


def summarize(files: list[Path], top: int = 25) -> list[str]:
    """Shares of the sampled time by area (inclusive of what the area calls, attributed to the
    innermost matching area), and the functions where the samples are (self time)."""
    own: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack.split(";")
            total += count
            own[frames[-1]] += count
            areas[_area(frames)] += count
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples (active CPU only: py-spy leaves idle waiting out)", "by area:"]
    lines += [f"  {n * 100 / total:5.1f}%  {name}" for name, n in areas.most_common()]
    lines.append("by function (self):")
    lines += [f"  {n * 100 / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return lines


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in _AREAS:
            if any(needle in frame for needle in needles):
                return name
    return "other (interpreter, GC, threads)"
