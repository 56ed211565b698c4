"""A Citus worker stopped under load, for real (pg_ctl on the node): creates of its desks answer 503 with
Retry-After, never a 500 or a hang, while the other worker's desks go on; once it is back the service
recovers by itself; nothing acknowledged is lost and no number is used twice. Needs the suite's Citus
cluster on this machine (its nodes' data directories at hand), so it is skipped elsewhere."""

import asyncio
import os
import pwd
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from app.ids import Snowflake
from bench import cluster
from bench.server import Server
from tests.support.desks import Desk, make_desk, ticket_body
from tests.support.load import assert_acknowledged_are_stored, run_load
from tests.support.servers import serving
from tests.test_citus import node_of

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("citus_only")]
NO_HANG = 15.0


@dataclass
class Node:
    """A cluster node run by pg_ctl on this machine, as the owner of its data directory."""

    address: str
    data_dir: Path
    bin_dir: Path

    def _pg_ctl(self, *args: str) -> None:
        command = shlex.join([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-w", *args])
        owner = pwd.getpwuid(self.data_dir.stat().st_uid).pw_name
        if os.geteuid() != self.data_dir.stat().st_uid:
            command = f"su {shlex.quote(owner)} -s /bin/sh -c {shlex.quote(command)}"
        subprocess.run(command, shell=True, check=True, capture_output=True, timeout=60)

    def stop(self) -> None:
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        self._pg_ctl("-l", str(self.data_dir / "server.log"), "start")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()


async def local_node(database_url: str, address: str) -> Node:
    host, port = address.split(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        pytest.skip(f"the worker {address} is not on this machine")
    conn = await asyncpg.connect(cluster.at_node(database_url, cluster.Node(host, int(port), False)))
    try:
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            pytest.skip("stopping a worker needs its data directory, which only a superuser is shown")
        data_dir = Path(await conn.fetchval("SHOW data_directory"))
        bin_dir = Path(await conn.fetchval("SELECT setting FROM pg_config WHERE name = 'BINDIR'"))
    finally:
        await conn.close()
    if not (bin_dir / "pg_ctl").exists() or not data_dir.is_dir():
        pytest.skip(f"the worker {address} is not run from this machine's files")
    return Node(address, data_dir, bin_dir)


async def desks_on_two_workers(pool: asyncpg.Pool, ids: Snowflake) -> tuple[Desk, Desk, str, str]:
    """Two desks whose shards live on two different workers, and those workers."""
    first = await make_desk(pool, ids)
    for _ in range(50):
        other = await make_desk(pool, ids)
        if (node := await node_of(pool, other.desk_id)) != (home := await node_of(pool, first.desk_id)):
            return first, other, home, node
    pytest.skip("the cluster has one worker: nothing to stop while another serves")


@pytest.fixture
def citus_server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    with serving(database_url, tmp_path / "serve.log", HEADONI_POOL_TIMEOUT="5") as server:
        yield server


async def until_created(http: httpx.AsyncClient, desk: Desk, seconds: float) -> httpx.Response:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        response = await http.post("/api/v1/tickets", json=ticket_body(), headers=desk.headers())
        if response.status_code != 503 or asyncio.get_running_loop().time() > deadline:
            return response
        await asyncio.sleep(0.2)


async def test_a_stopped_worker_fails_only_its_desks_with_503_and_the_service_recovers_by_itself(
    pool: asyncpg.Pool, ids: Snowflake, database_url: str, citus_server: Server
) -> None:
    stopped_desk, serving_desk, stopped_at, _ = await desks_on_two_workers(pool, ids)
    worker = await local_node(database_url, stopped_at)
    url = citus_server.base_url
    before = [await run_load(url, d, clients=2, seconds=1.0, timeout=NO_HANG) for d in (stopped_desk, serving_desk)]
    worker.stop()
    try:
        during = await asyncio.gather(
            *(run_load(url, d, clients=3, seconds=3.0, timeout=NO_HANG) for d in (stopped_desk, serving_desk))
        )
        async with httpx.AsyncClient(base_url=url, timeout=NO_HANG) as http:
            refused = await http.post("/api/v1/tickets", json=ticket_body(), headers=stopped_desk.headers())
            listed = await http.get("/api/v1/departments", headers=serving_desk.headers())
    finally:
        worker.start()
    assert (refused.status_code, refused.json()["error"]) == (503, "service_unavailable")
    assert refused.headers["retry-after"].isdigit()
    assert listed.status_code == 200
    assert set(during[0].outcomes) == {"503"}, during[0].outcomes  # never a 500, never a hang
    assert set(during[1].outcomes) == {"201"}, during[1].outcomes  # the other worker's desk went on
    async with httpx.AsyncClient(base_url=url, timeout=NO_HANG) as http:
        back = await until_created(http, stopped_desk, 30)
    assert back.status_code == 201, back.text
    after = [await run_load(url, d, clients=2, seconds=1.0, timeout=NO_HANG) for d in (stopped_desk, serving_desk)]
    assert [set(a.outcomes) for a in after] == [{"201"}, {"201"}]
    assert citus_server.process.poll() is None  # recovered by itself, never restarted
    print(f"stopped worker's desk: {during[0].outcomes}, the other's: {during[1].outcomes}")
    for n, desk in enumerate((stopped_desk, serving_desk)):
        seen = before[n]
        for load in (during[n], after[n]):
            seen.created += load.created
            seen.outcomes += load.outcomes
        count = await assert_acknowledged_are_stored(pool, desk, seen)  # numbers 1..count, each once
        assert count >= len(seen.created)
