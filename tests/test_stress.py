"""A few seconds of the stress harness (bench/stress.py) under each statement scope, with CPU contention:
no 5xx, no deadlock, gapless numbers in commit order, everything acknowledged stored whole, no duplicate
requester. `python -m bench.stress` runs the full one (60 s per scope by default)."""

from pathlib import Path

import pytest

from bench import stress


@pytest.mark.e2e
@pytest.mark.parametrize("scope", stress.SCOPES)
async def test_a_short_stress_run_under_cpu_contention_is_clean(
    server_url: str, tmp_path: Path, scope: str, on_citus: bool
) -> None:
    if on_citus and scope == "any-desks":
        pytest.skip("the service refuses HEADONI_STATEMENT_SCOPE=any-desks on Citus (app/citus.py)")
    report = await stress.run(server_url, scope, 4.0, clients=4, busy=1, desks=8, hot=2, log_dir=tmp_path)
    print("\n".join(report.lines()))
    assert report.failures == []
    assert report.facts["acknowledged"] > 50
    assert report.facts["ordered_pairs"] > 0
    assert sum(report.load.admin.values()) > 0
