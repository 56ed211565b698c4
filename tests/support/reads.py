"""The read statements of one desk, with a second argument for each (after the desk): the tests that
check how each touches its desk (tests/test_scaling.py, one PostgreSQL; tests/test_citus.py, Citus)."""

from typing import Any, Final

from app import reads

DESK_READS: Final[list[tuple[str, str, Any]]] = [
    ("ticket by number", reads.TICKET_BY_NUMBER, 1),
    ("ticket by id", reads.TICKET_BY_ID, 1 << 40),
    ("departments", reads.DEPARTMENTS, None),
    ("ticket types", reads.TICKET_TYPES, None),
]
