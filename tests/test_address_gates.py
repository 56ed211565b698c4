"""app/limits.py's AddressGates on their own: how client addresses are told apart, a turn given back,
and the table forgetting addresses whose gates are as new (HEADONI_ADDRESS_RATE; the end-to-end
behaviour is in test_hostile_clients.py)."""

import asyncio
from collections.abc import Callable

from app.limits import AddressGates


def recorder(log: list[str], name: str) -> Callable[[], bool]:
    """A start that runs: it notes its name and says it ran (so it spends a turn)."""

    def start() -> bool:
        log.append(name)
        return True

    return start


def test_an_ipv6_address_counts_by_its_64_and_an_ipv4_one_by_itself() -> None:
    key = AddressGates.key
    assert key("2001:db8:1:2:aaaa::1") == key("2001:db8:1:2:bbbb:cccc:dddd:9") == "2001:db8:1:2::"
    assert key("2001:db8:1:3::1") != key("2001:db8:1:2::1")
    assert key("fe80::1%eth0") == "fe80::"
    assert key("::ffff:10.0.0.1") == "10.0.0.1" != key("::ffff:10.0.0.2")  # IPv4 on a dual-stack listener
    assert key("127.0.0.1") == "127.0.0.1" != key("127.0.0.2")
    assert key(None) == ""  # a Unix socket's peers: one address


async def test_past_the_burst_a_start_waits_until_a_turn_comes_back_and_other_addresses_do_not_wait() -> None:
    gates = AddressGates(rate=2)
    started: list[str] = []

    for name in ("a", "b", "c"):
        gates.enter("10.0.0.1", recorder(started, name))
    gates.enter("10.0.0.2", recorder(started, "elsewhere"))
    assert started == ["a", "b", "elsewhere"]  # c waits: 10.0.0.1 spent its burst of 2
    gates.give_back("10.0.0.1")  # a showed a known token
    assert started == ["a", "b", "elsewhere", "c"]
    gates.enter("10.0.0.1", recorder(started, "d"))
    assert started[-1] == "c"  # no turn left: d waits for the rate
    await asyncio.sleep(0.6)  # 2 a second: a turn within 0.5 s
    assert started[-1] == "d"


async def test_a_start_that_has_nothing_to_run_spends_no_turn() -> None:
    gates = AddressGates(rate=1)
    gates.enter("10.0.0.1", lambda: False)  # its connection was closed while it waited
    ran: list[str] = []
    gates.enter("10.0.0.1", recorder(ran, "next"))
    assert ran == ["next"]  # at once: the burst of 1 was not spent


async def test_gates_as_new_are_forgotten() -> None:
    gates = AddressGates(rate=1000)
    for i in range(10):
        gates.enter(f"10.0.0.{i}", lambda: True)
    assert len(gates) == 10
    await asyncio.sleep(0.01)  # each turn comes back within 1 ms
    gates._sweep()
    assert len(gates) == 0
