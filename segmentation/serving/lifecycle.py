"""Ending a BentoML worker on purpose: stopping the whole server at start, or restarting one worker.

BentoML's process manager (circus, in the `bentoml serve` or `start-http-server` process) starts a
worker again whenever it exits. That is right for a worker that failed at run time, and wrong for one
that can never start: it would be restarted in a loop that never says the server is useless.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

logger = logging.getLogger(__name__)

RESTART_EXIT_CODE = 70


def stop_server(reason: str) -> None:
    """Stop the whole server from one of its workers, once, with `reason` in the log: the worker's
    parent (the process manager) is asked to stop, and this worker exits."""
    logger.critical("stopping the server: %s", reason)
    print(f"FATAL: stopping the server: {reason}", file=sys.stderr, flush=True)
    os.kill(os.getppid(), signal.SIGTERM)
    os._exit(3)


def restart_worker(reason: str, after_s: float = 2.0) -> None:
    """Exit this worker `after_s` seconds from now (time for the answers already settled to go out), so
    that the process manager starts a fresh one: what a process whose GPU context failed needs."""
    logger.critical("restarting this worker in %.0f s: %s", after_s, reason)
    timer = threading.Timer(after_s, os._exit, (RESTART_EXIT_CODE,))
    timer.daemon = True
    timer.start()
