"""Where the workers of `headoni serve --workers N` keep prometheus-client's metrics files.

prometheus-client picks its storage when first imported, and in multi-process mode it writes files in
PROMETHEUS_MULTIPROC_DIR from then on; so the directory is chosen and checked here, before anything
imports it (this module does not).
"""

import atexit
import glob
import os
import shutil
import tempfile

from app import settings


class MetricsDirectoryError(RuntimeError):
    """The directory for the metrics files of several workers cannot be written."""


def prepare_multiprocess_dir(workers: int) -> str | None:
    """Set up prometheus-client's multi-process mode for `headoni serve`, before workers start: a fresh
    directory for a run with several workers (removed at exit), or the one PROMETHEUS_MULTIPROC_DIR
    names, emptied of an earlier run's files. Return the directory, or None in single-process mode.
    A directory that cannot be written (a read-only root filesystem with no tmpfs at /tmp, as in a
    hardened container) raises MetricsDirectoryError, with what to do."""
    directory = settings.metrics_dir()
    try:
        if directory:
            os.makedirs(directory, exist_ok=True)
            for stale in glob.glob(os.path.join(directory, "*.db")):
                os.unlink(stale)
            with tempfile.TemporaryFile(dir=directory):  # the workers will write here
                pass
        elif workers > 1:
            directory = tempfile.mkdtemp(prefix="headoni-metrics-")
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            os.environ[settings.METRICS_DIR_VARIABLE] = directory  # for the workers, which import it
    except OSError as exc:
        # Not tempfile.gettempdir(): with no writable temporary directory it raises again, in here.
        where = directory or os.environ.get("TMPDIR") or "/tmp"
        raise MetricsDirectoryError(
            f"the workers' metrics files need a writable directory, and {where} cannot be written"
            f" ({exc.strerror or exc}): mount a tmpfs at /tmp, or set PROMETHEUS_MULTIPROC_DIR to a writable one"
        ) from exc
    return directory or None
