"""The test suite's helpers, which test modules import (tests/conftest.py holds only fixtures and hooks).

desks.py: a desk per test and a ticket body; app.py: the app in-process and the forms of the create;
api.py: posting and reading answers; servers.py: a real `headoni serve` (bench/server.py's launcher);
raw.py: raw HTTP/1.1 over a socket; load.py: concurrent clients and what they got stored;
own_postgres.py: a private PostgreSQL for fault tests; compose_stack.py: the image and compose stack.
"""

from bench.prefill import BASE_DOMAIN
from bench.server import ROOT

__all__ = ["BASE_DOMAIN", "ROOT"]
