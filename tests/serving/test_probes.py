"""Readiness as the public service sees the engine: answers within the check timeout, whatever the engine does."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from segmentation.serving.probes import Readiness


class Engine:
    """Stands in for BentoML's client of the engine service (outside this project): `is_ready` as it behaves."""

    def __init__(self, behaviour: str = "ready") -> None:
        self.behaviour = behaviour

    async def is_ready(self, timeout: int | None = None) -> bool:
        if self.behaviour == "silent":  # a loading engine: its socket accepts, nothing answers
            await asyncio.sleep(30)
        if self.behaviour == "refused":
            raise httpx.ConnectError("connection refused")
        return self.behaviour == "ready"


def check(readiness: Readiness) -> tuple[bool, str, float]:
    start = time.monotonic()
    ready, reason = asyncio.run(readiness.check())
    return ready, reason, time.monotonic() - start


@pytest.mark.parametrize(
    ("behaviour", "ready", "reason"),
    [
        (None, False, "starting"),
        ("silent", False, "loading"),
        ("not-ready", False, "loading"),
        ("refused", False, "the model engine is unavailable"),
        ("ready", True, "ready"),
    ],
)
def test_first_answer_by_engine_state(behaviour, ready, reason):
    readiness = Readiness(check_timeout_s=0.2)
    if behaviour:
        readiness.attach(Engine(behaviour))
    got_ready, got_reason, seconds = check(readiness)
    assert (got_ready, reason in got_reason) == (ready, True), got_reason
    assert seconds < 1


def test_a_ready_engine_that_is_busy_stays_ready_until_stale():
    engine = Engine("ready")
    readiness = Readiness(check_timeout_s=0.1, stale_after_s=0.5)
    readiness.attach(engine)
    assert check(readiness)[0]
    engine.behaviour = "silent"  # busy generating: its readiness answer is late
    assert check(readiness)[:2] == (True, "ready (the engine is busy)")
    time.sleep(0.6)
    ready, reason, _ = check(readiness)
    assert not ready and "has not answered for" in reason


def test_a_ready_engine_that_refuses_connections_is_not_ready():
    engine = Engine("ready")
    readiness = Readiness(check_timeout_s=0.1)
    readiness.attach(engine)
    assert check(readiness)[0]
    engine.behaviour = "refused"
    assert not check(readiness)[0]
