"""Snowflake worker leases: unique numbers, reservations that outlive a lost lease, and recovery."""

import asyncio
import time
import uuid

import asyncpg
import pytest

from app.ids import MAX_SEQUENCE, RESERVE_MS, LeaseExpired, LeaseKeeper, Snowflake, WorkerLease, decode, now_ms


async def _reservation(pool: asyncpg.Pool, worker: int) -> asyncpg.Record:
    return await pool.fetchrow("SELECT reserved_until, holder FROM snowflake_workers WHERE worker = $1", worker)


async def test_leases_take_distinct_numbers_and_reserve_ahead(database_url: str, pool: asyncpg.Pool) -> None:
    first, second = await WorkerLease.acquire(database_url), await WorkerLease.acquire(database_url)
    try:
        assert first.worker != second.worker
        for lease in (first, second):
            row = await _reservation(pool, lease.worker)
            assert row["holder"] == lease.holder and row["reserved_until"] == lease.until_ms
            assert lease.until_ms >= now_ms() + RESERVE_MS - 5_000
    finally:
        await first.close()
        await second.close()


def test_snowflake_never_passes_its_reservation_nor_reuses_the_floor() -> None:
    floor = now_ms() + 50  # an earlier holder spent up to 50 ms ahead of now
    ids = Snowflake(7, after_ms=floor, until_ms=floor + 1)
    made = [ids.next_id() for _ in range(MAX_SEQUENCE + 1)]  # all of millisecond floor + 1
    assert len(set(made)) == len(made)
    assert {decode(i)[0] for i in made} == {floor + 1 + 1_420_070_400_000}
    assert all(decode(i)[1] == 7 for i in made)
    with pytest.raises(LeaseExpired):  # the next would need floor + 2, past the reservation
        ids.next_id()


async def test_a_number_lost_while_in_use_is_taken_again_only_after_its_reservation(
    database_url: str, pool: asyncpg.Pool
) -> None:
    keeper = await LeaseKeeper.start(database_url)
    try:
        worker = keeper.ids.worker
        before = keeper.ids.next_ids(100)
        lease = keeper.lease
        assert lease is not None
        # Another process waits for exactly this number; then the database drops the lease's session:
        # the advisory lock passes to the waiter while this process runs on.
        waiter = await asyncpg.connect(database_url)
        waiting = asyncio.create_task(waiter.execute("SELECT pg_advisory_lock($1, $2::int)", 0x4844, worker))
        deadline = time.monotonic() + 5
        while not await pool.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", waiter.get_server_pid()
        ):
            assert time.monotonic() < deadline, "the waiter never queued on the lock"
            await asyncio.sleep(0.01)
        await pool.execute("SELECT pg_terminate_backend($1::int)", lease.conn.get_server_pid())
        await asyncio.wait_for(waiting, 5)
        rival = await WorkerLease.take(waiter, uuid.uuid4(), prefer=worker)
        assert rival.worker == worker
        try:
            assert rival.after_ms >= keeper.ids.last_ms
            theirs = rival.snowflake().next_ids(1000)
            ours = keeper.ids.next_ids(1000)  # still within the old reservation: safe
            everything = before + ours + theirs
            assert len(set(everything)) == len(everything)
            # The keeper notices and holds a lease again, on another number since the rival has this one.
            deadline = time.monotonic() + 5
            while keeper.lease is None or keeper.lease.conn.is_closed() or keeper.ids.worker == worker:
                assert time.monotonic() < deadline, "the keeper did not take a lease again"
                await asyncio.sleep(0.05)
            after = keeper.ids.next_ids(1000)
            assert len(set(everything + after)) == len(everything) + len(after)
            assert min(after) > max(ours)  # still ordered within the process
        finally:
            await rival.close()
    finally:
        await keeper.close()


async def test_the_same_number_goes_on_when_nobody_took_it_meanwhile(database_url: str, pool: asyncpg.Pool) -> None:
    keeper = await LeaseKeeper.start(database_url)
    try:
        worker, last = keeper.ids.worker, keeper.ids.next_id()
        lease = keeper.lease
        assert lease is not None
        await pool.execute("SELECT pg_terminate_backend($1::int)", lease.conn.get_server_pid())
        deadline = time.monotonic() + 5
        while keeper.lease is lease or keeper.lease is None:
            assert time.monotonic() < deadline, "the keeper did not take a lease again"
            await asyncio.sleep(0.05)
        assert keeper.ids.worker == worker
        assert keeper.ids.next_id() > last
        assert decode(keeper.ids.next_id())[0] - time.time() * 1000 < 1_000  # not pushed into the future
    finally:
        await keeper.close()


async def test_a_clean_close_gives_back_the_unused_reservation(database_url: str, pool: asyncpg.Pool) -> None:
    keeper = await LeaseKeeper.start(database_url)
    worker = keeper.ids.worker
    last = keeper.ids.next_id()
    await keeper.close()
    assert (await _reservation(pool, worker))["reserved_until"] == decode(last)[0] - 1_420_070_400_000
    with pytest.raises(LeaseExpired):  # a closed keeper makes no more ids
        for _ in range(MAX_SEQUENCE + 2):
            keeper.ids.next_id()
