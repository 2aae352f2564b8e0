"""Ending a BentoML worker on purpose: stopping the whole server at start, or restarting one worker.

BentoML's process manager (circus, in the `bentoml serve` or `start-http-server` process) starts a
worker again whenever it exits. That is right for a worker that failed at run time, and wrong for one
that can never start: it would be restarted in a loop that never says the server is useless.

A server stopped this way exits with status 1 (`exit_nonzero_after_a_failed_start`, installed in every
process that imports `service.py`): circus itself stops gracefully on the SIGTERM and would exit 0, so
`bentoml serve`, a container and Kubernetes (CrashLoopBackOff) would not see the failed start.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

RESTART_EXIT_CODE = 70
FAILED_START_EXIT_CODE = 1


def _reason_file(manager_pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"paligemma-seg-stopped-{manager_pid}.txt"


def stop_server(reason: str) -> None:
    """Stop the whole server from one of its workers, once, with `reason` in the log: the worker's
    parent (the process manager) is asked to stop, and this worker exits."""
    logger.critical("stopping the server: %s", reason)
    print(f"FATAL: stopping the server: {reason}", file=sys.stderr, flush=True)
    manager = os.getppid()
    with contextlib.suppress(OSError):
        _reason_file(manager).write_text(reason + "\n")  # for the manager's exit status
    os.kill(manager, signal.SIGTERM)
    os._exit(3)


@contextlib.contextmanager
def stop_server_on_failure(what: str):
    """Around a worker's start: an exception (a CUDA graph capture that SEG_REQUIRE_GRAPHS requires, a GPU
    out of memory, a model that does not load) is logged with its traceback and stops the server once."""
    try:
        yield
    except Exception as exc:
        logger.exception("%s failed to start", what)
        stop_server(f"{what} could not start: {type(exc).__name__}: {exc}".strip())


def _exit_if_a_worker_stopped_us() -> None:
    path = _reason_file(os.getpid())
    try:
        reason = path.read_text().strip()
    except OSError:
        return
    with contextlib.suppress(OSError):
        path.unlink()
    print(f"the server stopped: {reason}", file=sys.stderr, flush=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(FAILED_START_EXIT_CODE)  # an atexit handler cannot change the exit status otherwise


def exit_nonzero_after_a_failed_start() -> None:
    """In the process manager (only the process that finds a reason file named after its own pid acts):
    once it has stopped, exit with status 1 and print the reason a worker gave `stop_server`."""
    atexit.register(_exit_if_a_worker_stopped_us)


def restart_worker(reason: str, after_s: float = 2.0) -> None:
    """Exit this worker `after_s` seconds from now (time for the answers already settled to go out), so
    that the process manager starts a fresh one: what a process whose GPU context failed needs."""
    logger.critical("restarting this worker in %.0f s: %s", after_s, reason)
    timer = threading.Timer(after_s, os._exit, (RESTART_EXIT_CODE,))
    timer.daemon = True
    timer.start()
