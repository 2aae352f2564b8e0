"""The service's own Prometheus metrics (prometheus_client), beside BentoML's request counters and
batch sizes, all on `/metrics`.

BentoML serves `/metrics` from prometheus_client's multiprocess directory (`PROMETHEUS_MULTIPROC_DIR`,
set in each worker's environment before it starts), so every worker's samples are summed there;
gauges say how (`multiprocess_mode`).

Request stages: `segmentation_stage_seconds{stage}`, `segmentation_objects_per_request`,
`segmentation_generated_tokens`. Streamed answers (the OpenAI-compatible API with `stream: true`):
`segmentation_time_to_first_token_seconds` and `segmentation_inter_token_latency_seconds`, as the public
tier sends them.

The engine's load, for autoscaling the engine tier (`seg_engine_*`, exported by the process that
runs the model):

- `seg_engine_requests_in_flight`: requests the engine has accepted and not answered (queued or
  running); `seg_engine_running_slots`: rows of the batch being generated; `seg_engine_queue_length`:
  requests waiting for a slot; `seg_engine_slots`: rows one batch may hold (occupancy is
  running / slots). The service sets these around each batch; a scheduler that keeps its own slots
  and queue sets them with `set_running_slots` / `set_queue_length`.
- `seg_engine_time_to_first_step_seconds`, `seg_engine_steps_per_request` (histograms) and
  `seg_engine_tokens_per_second` (gauge): for the scheduler to report with the helpers below.
- `seg_engine_steps_total{path}` (counter): every decode step, by how it ran: `graph` (a replayed CUDA
  graph), `fixed` (the fixed-shape step run eagerly: CPUs, or a bucket whose capture failed), `peft` (rows
  of an adapter without a slot in the stacked adapter weights, stepped through PEFT's hooks), `fast` (the
  fast loop: a prompt past the graph engine's cache, or SEG_ENGINE=fast), `hf-generate`. A GPU server
  whose steps are not all `graph` is running a fallback. Counted on the host per step call
  (`watch_engine_steps`), never syncing the device.
- `seg_engine_adapter_operations_total{operation, outcome}` (counter): adapters loaded and unloaded while
  serving (adapter_admin.py), by the status the engine answered (`200`, `400`, `404`, `409`...).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:  # the public service imports this module and must not import torch
    from .pool import PredictOutcome

STAGE_SECONDS = Histogram(
    "segmentation_stage_seconds",
    "Seconds spent per request stage",
    labelnames=["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OBJECTS = Histogram(
    "segmentation_objects_per_request",
    "Objects found per image",
    buckets=(0, 1, 2, 3, 5, 8, 13, 21, 34),
)
TOKENS = Histogram(
    "segmentation_generated_tokens",
    "Tokens generated per image",
    buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "segmentation_time_to_first_token_seconds",
    "Seconds from a streamed request's arrival to the first text of its answer sent to the client",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
INTER_TOKEN_LATENCY = Histogram(
    "segmentation_inter_token_latency_seconds",
    "Seconds per token between the pieces of a streamed answer sent to the client, after the first",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# Engine load. One engine worker per server: "livesum" adds the live processes' values (and drops a
# dead worker's), which is that worker's value.
ENGINE_IN_FLIGHT = Gauge(
    "seg_engine_requests_in_flight", "Requests the engine has accepted and not yet answered (queued or running)",
    multiprocess_mode="livesum",
)
ENGINE_RUNNING_SLOTS = Gauge(
    "seg_engine_running_slots", "Rows (requests) of the batch the engine is generating now",
    multiprocess_mode="livesum",
)
ENGINE_QUEUE_LENGTH = Gauge(
    "seg_engine_queue_length", "Requests waiting for a slot in the engine's next batch",
    multiprocess_mode="livesum",
)
ENGINE_SLOTS = Gauge(
    "seg_engine_slots", "Rows one engine batch may hold (SEG_MAX_BATCH_SIZE)", multiprocess_mode="livesum",
)
ENGINE_TIME_TO_FIRST_STEP = Histogram(
    "seg_engine_time_to_first_step_seconds", "Seconds from a request's arrival at the engine to its first decode step",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ENGINE_STEPS_PER_REQUEST = Histogram(
    "seg_engine_steps_per_request", "Decode steps a request took part in",
    buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024),
)
ENGINE_STEP_ROWS = Histogram(
    "seg_engine_step_rows", "Rows in the running batch, once per group of decode steps (step-level batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
ENGINE_STEPS = Counter(
    "seg_engine_steps", "Decode steps by how they ran: graph, fixed, peft, fast, hf-generate", labelnames=["path"],
)
ADAPTER_OPERATIONS = Counter(
    "seg_engine_adapter_operations", "LoRA adapters loaded and unloaded while serving, by operation (load, unload) "
    "and outcome (the HTTP status the engine answered)", labelnames=["operation", "outcome"],
)
ENGINE_TOKENS_PER_SECOND = Gauge(
    "seg_engine_tokens_per_second", "Tokens generated per second over the engine's last batch or step window",
    multiprocess_mode="livesum",
)


def observe_stage(stage: str, seconds: float) -> None:
    STAGE_SECONDS.labels(stage=stage).observe(seconds)


def observe_outcome(outcome: PredictOutcome) -> None:
    """An engine outcome's stage timings, tokens and objects."""
    for stage, seconds in outcome.timings.items():
        observe_stage(stage, seconds)
    if outcome.prediction is not None:
        TOKENS.observe(outcome.prediction.generated_tokens)
        OBJECTS.observe(len(outcome.prediction.objects))


def observe_time_to_first_token(seconds: float) -> None:
    TIME_TO_FIRST_TOKEN.observe(seconds)


def observe_inter_token(seconds: float, tokens: int) -> None:
    """A piece of `tokens` tokens sent `seconds` after the one before it: `tokens` gaps of equal share."""
    for _ in range(max(1, tokens)):
        INTER_TOKEN_LATENCY.observe(seconds / max(1, tokens))


# ---- helpers for the engine (its scheduler, or the service around each batch) ---------------------

def count_adapter_operation(operation: str, status: int) -> None:
    """`seg_engine_adapter_operations_total{operation, outcome}`: one load or unload and its status."""
    ADAPTER_OPERATIONS.labels(operation=operation, outcome=str(status)).inc()


def set_engine_slots(slots: int) -> None:
    ENGINE_SLOTS.set(slots)


def set_running_slots(rows: int) -> None:
    ENGINE_RUNNING_SLOTS.set(rows)


def set_queue_length(requests: int) -> None:
    ENGINE_QUEUE_LENGTH.set(requests)


def observe_time_to_first_step(seconds: float) -> None:
    ENGINE_TIME_TO_FIRST_STEP.observe(seconds)


def observe_steps_per_request(steps: int) -> None:
    ENGINE_STEPS_PER_REQUEST.observe(steps)


def set_tokens_per_second(value: float) -> None:
    ENGINE_TOKENS_PER_SECOND.set(value)


def watch_engine_steps(engines) -> None:
    """Count every decode step of these engines (PaliGemmaEngine) in `seg_engine_steps_total{path}`; every
    path is exported from the start (at 0), so a fallback shows as a rising line next to a flat one."""
    from ..model.graph.decoder import STEP_PATHS

    children = {path: ENGINE_STEPS.labels(path=path) for path in STEP_PATHS}

    def count(path: str, steps: int) -> None:
        children[path].inc(steps)

    for engine in engines:
        engine.step_listeners.append(count)


class SchedulerMetrics:
    """Publishes step-level batching as it happens: the scheduler calls `row_finished` as each row ends
    and `stepped` after each group of steps, or once its running batch has emptied (from its own thread)."""

    def __init__(self, load: EngineLoad, window_s: float = 10.0) -> None:
        self.load = load
        self.window_s = window_s
        self._marks: list[tuple[float, int]] = []  # (time, tokens so far) within the window

    def row_finished(self, job, generation) -> None:
        if job.first_step is not None:
            observe_time_to_first_step(job.first_step - job.submitted)
        observe_steps_per_request(job.steps)

    def stepped(self, scheduler, rows: int) -> None:
        if rows:
            ENGINE_STEP_ROWS.observe(rows)
        self.load.rows_running(scheduler.running)
        now = time.monotonic()
        self._marks = [m for m in self._marks if now - m[0] <= self.window_s] + [(now, scheduler.stats.tokens)]
        (first, tokens_then), (_, tokens_now) = self._marks[0], self._marks[-1]
        if now > first:
            set_tokens_per_second((tokens_now - tokens_then) / (now - first))


class EngineLoad:
    """Requests in flight at the engine and rows running, kept consistent: queued = in flight - running.

    `request_started` / `request_finished` are called per HTTP request (an ASGI middleware on the
    engine), `batch_started` / `batch_finished` around each batch the engine runs.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.running = 0

    def _publish(self) -> None:
        ENGINE_IN_FLIGHT.set(self.in_flight)
        set_running_slots(self.running)
        set_queue_length(max(0, self.in_flight - self.running))

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1
            self._publish()

    def request_finished(self) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            self._publish()

    def batch_started(self, rows: int) -> None:
        with self._lock:
            self.running = rows
            self._publish()

    def rows_running(self, rows: int) -> None:
        """Step-level batching: the rows in the running batch now."""
        with self._lock:
            self.running = rows
            self._publish()

    def batch_finished(self) -> None:
        with self._lock:
            self.running = 0
            self._publish()


class EngineLoadMiddleware:
    """ASGI middleware on the engine service: counts `/predict` requests from arrival to answer."""

    def __init__(self, app, *, load: EngineLoad, paths: frozenset[str] = frozenset({"/predict"})) -> None:
        self.app = app
        self.load = load
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        self.load.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.load.request_finished()
