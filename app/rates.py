"""A rate limit as configured: so many units per so many seconds, with a burst (docs/limits.md)."""

import re
from typing import Final

import msgspec

_PERIODS: Final = {
    "s": 1, "sec": 1, "second": 1,
    "min": 60, "minute": 60,
    "h": 3600, "hour": 3600,
}
_RATE: Final = re.compile(r"\s*(\d{1,9})\s*/\s*(\d{0,6})\s*([a-z]+)\s*")
_NAMES: Final = {1: "s", 60: "min", 3600: "h"}
MAX_UNITS: Final = 1_000_000_000


class Limit(msgspec.Struct, frozen=True):
    """`units` per `seconds`, and up to `burst` units at once from a full bucket."""

    units: int
    seconds: int
    burst: int

    @property
    def interval_us(self) -> int:
        """Microseconds per unit (GCRA's emission interval), at least 1."""
        return max(1, self.seconds * 1_000_000 // self.units)

    @property
    def rate(self) -> str:
        """The rate as written on the command line, e.g. 600/min."""
        name = _NAMES.get(self.seconds)
        return f"{self.units}/{name}" if name else f"{self.units}/{self.seconds}s"


def parse_rate(text: str, burst: int | None = None) -> Limit:
    """`600/min`, `10/s`, `5000/h` or `100/10s` (per 10 seconds); burst defaults to the rate's count
    (one period's worth), capped at 100, so that a limit of a few a minute does not allow a
    minute's worth at once while a batch of 100 still fits a limit of 100 or more."""
    match = _RATE.fullmatch(text.lower())
    if match is None or match[3] not in _PERIODS:
        raise ValueError(f"bad rate {text!r}: write it as N/s, N/min, N/h or N/<k>s, e.g. 600/min")
    units, multiple, period = int(match[1]), int(match[2] or 1), _PERIODS[match[3]]
    if not 0 < units <= MAX_UNITS or multiple == 0 or (match[2] and period != 1):
        raise ValueError(f"bad rate {text!r}: write it as N/s, N/min, N/h or N/<k>s, e.g. 600/min")
    if burst is None:
        burst = min(units, 100)
    if not 0 < burst <= MAX_UNITS:
        raise ValueError(f"bad burst {burst}: it must be 1 to {MAX_UNITS}")
    return Limit(units, period * multiple, burst)


def from_columns(units: int | None, seconds: int | None, burst: int | None) -> Limit | None:
    """A limit from its three database columns (set together or not at all)."""
    if units is None or seconds is None or burst is None:
        return None
    return Limit(units, seconds, burst)
