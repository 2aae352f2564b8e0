"""Step-level batching: requests join the running batch between decode steps and leave as soon as they end.

With whole-batch generation (`PaliGemmaEngine.generate`) a batch lasts as long as its longest row:
finished rows idle in it, and a request that arrives one step after a batch started waits for all of
it. Here one thread (the process's compute thread when given one: segmentation/model/compute.py)
owns the engine's `StaticDecoder` and loops:

1. **admit**: waiting requests (first come, first served) are prefilled together into free slots, as
   many as there are free slots;
2. **step**: `sync_every` decode steps of the smallest bucket that holds every occupied slot (one
   CUDA graph replay each on a GPU; an eager step on the CPU computes exactly the occupied rows, the
   highest rows having moved down into freed slots);
3. **leave**: one look at the rows (the only host synchronisation); each finished row's answer goes
   back at once through its future and its slot is free for the next admission. A request whose
   future was cancelled (its client left) or whose deadline passed frees its slot too. The same look
   carries, for rows whose request streams (`on_tokens`), the tokens chosen since the last look, and a
   row cut by its request (`cut_after`, OpenAI's `max_tokens`) leaves once it has passed the cut.

Every row keeps its own budget, grammar state and adapter in its slot, and attends only to its own
keys, so its tokens do not depend on who else is in the running batch (float32 on the CPU: pinned by
tests; on a GPU see docs/batch-invariance.md).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..compute import ComputeThread
from ..grammar import RowSpec
from ..prompts import Prompt

logger = logging.getLogger(__name__)


def _fail(future: Future, exc: BaseException) -> None:
    """Fail a future unless it is settled already (a client may cancel it at any moment)."""
    if not future.done():
        with contextlib.suppress(InvalidStateError):
            future.set_exception(exc)


def _answer(future: Future, result) -> None:
    if not future.done():
        with contextlib.suppress(InvalidStateError):
            future.set_result(result)


class Overloaded(RuntimeError):
    """A request waited longer than the scheduler's `max_wait_s` for a slot: shed, the client may retry."""


class EngineBroken(RuntimeError):
    """The scheduler's loop met a failure it cannot recover from (a CUDA error leaves the device unusable
    for this process; or failure after failure): every request is refused until the process restarts."""


# Loop failures in a row, with nothing answered in between, after which the scheduler gives up.
BROKEN_AFTER_FAILURES = 3


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error (an illegal access, an assert in a kernel, ECC): the CUDA context of this process is
    unusable afterwards, so no later step can succeed. Out-of-memory is not one: it leaves the context
    usable and fails only the rows that needed the memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


@dataclass
class Job:
    """One request in the scheduler: its input, its slot while it runs, and when things happened."""

    image: Image.Image
    prompt: Prompt
    spec: RowSpec
    adapter: str | None  # PEFT adapter name (engine.adapters' values) or None for the base model
    future: Future
    deadline: float | None  # time.monotonic() after which the request is dropped
    admit_by: float | None = None  # time.monotonic() after which a request still waiting is shed
    submitted: float = field(default_factory=time.monotonic)
    first_step: float | None = None  # when its first token was chosen (end of its prefill)
    slot: int | None = None
    reach: int = 0  # cache positions its row can fill (prompt + budget + 1)
    steps: int = 0  # decode steps it was in the running batch for
    prompt_tokens: int = 0  # its prompt's tokens, image tokens included
    # Leave once more than this many tokens are chosen (the answer is then cut there: engine.conclude).
    cut_after: int | None = None
    # Called from the scheduler's thread with the token ids and log-probabilities chosen since the last
    # call (never past `cut_after`), after each group of steps while the row runs.
    on_tokens: Callable[[list[int], list[float]], None] | None = None
    streamed: int = 0  # tokens handed to on_tokens so far

    @property
    def horizon(self) -> int:
        """Steps after which the row is done at the latest: its budget, or its cut."""
        return self.spec.budget if self.cut_after is None else min(self.spec.budget, self.cut_after)


@dataclass
class SchedulerStats:
    """What the scheduler has done since it started (read by the serving layer's metrics)."""

    admitted: int = 0
    completed: int = 0
    dropped: int = 0  # cancelled or past their deadline
    failed: int = 0
    tokens: int = 0
    steps: int = 0


class StepScheduler:
    """Runs an engine's graph decoder with rows joining and leaving between steps (see the module doc).

    `submit` is thread-safe and returns a `concurrent.futures.Future` of a `Generation`. The engine must
    not be used for other generations while the scheduler runs (it owns the decoder's buffers).
    """

    def __init__(self, engine, *, max_prefill: int | None = None, max_wait_s: float | None = None,
                 on_finish=None, on_step=None, thread: ComputeThread | None = None, on_broken=None):
        self.engine = engine
        self.max_wait_s = max_wait_s  # longest a request may wait for a slot before it is shed (Overloaded)
        self.decoder = engine.decoder
        self.max_prefill = max_prefill or self.decoder.slots
        self.on_finish = on_finish  # called with each finished Job (metrics), from the scheduler thread
        # Called as on_step(scheduler, rows) after each group of steps with the rows that stepped, and
        # with rows=0 when the running batch has emptied (metrics).
        self.on_step = on_step
        self.on_broken = on_broken  # called with the reason once the loop gives up (EngineBroken)
        self.stats = SchedulerStats()
        self.broken: str | None = None  # why the loop gave up (EngineBroken), once it has
        self._failures_in_a_row = 0
        self.last_batch = 0  # rows the last group of steps computed (occupied or not)
        self._queue: deque[Job] = deque()
        self._slots: list[Job | None] = [None] * self.decoder.slots
        self._wake = threading.Condition()
        self._closed = False
        self._chores: deque[tuple[Future, Callable]] = deque()  # call(): work for the loop, between steps
        # The loop runs on the process's compute thread when given (where the engine was loaded: see
        # segmentation/model/compute.py), else on a thread of its own.
        thread = thread or ComputeThread(name="step-scheduler")
        self._loop: Future = thread.occupy(self._run, "a step-level scheduler")

    # --- the public side ------------------------------------------------------------------------

    def submit(self, image: Image.Image, prompt: Prompt, *, max_new_tokens: int | None = None,
               adapter: str | None = None, timeout_s: float | None = None, cut_after: int | None = None,
               on_tokens: Callable[[list[int], list[float]], None] | None = None) -> Future:
        """Queue one request; its future holds a `Generation` (or the exception that failed it).

        `adapter`: an adapter id given to `engine.attach_adapters`; `timeout_s`: drop it (TimeoutError)
        if it has not finished by then. Cancel the future to drop it early (a client that went away).
        `cut_after`: the row leaves once it has chosen more tokens than that (the generation then holds
        them all; `engine.conclude` cuts it). `on_tokens(ids, logprobs)`: the row's new tokens after each
        group of steps, from the scheduler's thread (it must not block).
        """
        spec = self.engine.row_spec(prompt, max_new_tokens)
        names = self.engine._adapter_names([adapter]) if self.engine.peft else [None]
        future: Future = Future()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = Job(image, prompt, spec, names[0], future, deadline, cut_after=cut_after, on_tokens=on_tokens)
        if self.max_wait_s is not None:
            job.admit_by = job.submitted + self.max_wait_s
        with self._wake:
            if self.broken is not None:
                raise EngineBroken(self.broken)
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._queue.append(job)
            self._wake.notify()
        return future

    def call(self, fn: Callable) -> Future:
        """Run `fn()` on the scheduler's thread between two groups of steps (an adapter loaded into the
        stacked weights, or unloaded, while no step reads them); its future holds the result."""
        future: Future = Future()
        with self._wake:
            if self.broken is not None:
                raise EngineBroken(self.broken)
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._chores.append((future, fn))
            self._wake.notify()
        return future

    def uses(self, adapter: str) -> bool:
        """Whether a waiting or running request names this PEFT adapter (call it from `call`)."""
        with self._wake:
            waiting = list(self._queue)
        return any(job is not None and job.adapter == adapter for job in [*waiting, *self._slots])

    def _run_chores(self) -> None:
        with self._wake:
            chores, self._chores = list(self._chores), deque()
        for future, fn in chores:
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except Exception as exc:  # the caller's to handle; the loop goes on
                future.set_exception(exc)
            else:
                future.set_result(result)

    @property
    def running(self) -> int:
        """Occupied slots."""
        return sum(job is not None for job in self._slots)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def slots(self) -> int:
        return len(self._slots)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop; waiting and running requests fail with RuntimeError."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        with contextlib.suppress(TimeoutError):
            self._loop.result(timeout)

    # --- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._queue and not self.running and not self._chores:
                    self._wake.wait()
                if self._closed:
                    break
            self._run_chores()
            try:
                self._drop_gone()
                self._admit()
                if self.running:
                    self._step_and_collect()
                elif self.on_step is not None:
                    self.on_step(self, 0)
                self._failures_in_a_row = 0
            except Exception as exc:  # a failed step fails the rows in it; the loop goes on if it can
                logger.exception("step-level batch failed")
                self._fail_running(exc)
                self._failures_in_a_row += 1
                if is_device_failure(exc) or self._failures_in_a_row >= BROKEN_AFTER_FAILURES:
                    self._give_up(exc)
                    return
        self._settle_all(RuntimeError("the scheduler is closed"))

    def _give_up(self, exc: Exception) -> None:
        """Refuse everything from now on: a process whose device failed must be restarted (the engine
        then reports itself neither ready nor alive)."""
        cause = "a device (CUDA) error" if is_device_failure(exc) else \
            f"{self._failures_in_a_row} failures in a row"
        with self._wake:
            self.broken = f"the engine stopped after {cause}; it must be restarted"
        logger.critical("step scheduler gave up: %s (%s: %s)", self.broken, type(exc).__name__, exc)
        self._settle_all(EngineBroken(self.broken))
        if self.on_broken is not None:
            self.on_broken(self.broken)

    def _settle_all(self, exc: Exception) -> None:
        """Fail every running and waiting request with `exc`."""
        self._fail_running(exc)
        with self._wake:
            waiting, self._queue = list(self._queue), deque()
            chores, self._chores = list(self._chores), deque()
        for job in waiting:
            _fail(job.future, exc)
        for future, _ in chores:
            _fail(future, exc)

    def _drop_gone(self) -> None:
        """Free the slots of requests that were cancelled or ran out of time; skip such waiting ones."""
        now = time.monotonic()
        gone = [job for job in self._slots if job is not None and self._is_gone(job, now)]
        with self._wake:
            waiting = [job for job in self._queue if self._is_gone(job, now)]
            shed = [job for job in self._queue if job.admit_by is not None and now > job.admit_by
                    and job not in waiting]
            for job in waiting + shed:
                self._queue.remove(job)
        self.stats.dropped += len(gone) + len(waiting) + len(shed)
        for job in gone + waiting:
            _fail(job.future, TimeoutError("the request ran out of time in the engine"))
        for job in shed:
            _fail(job.future, Overloaded(f"no free slot within {self.max_wait_s:g}s; retry shortly"))
        if gone:
            self._free([job.slot for job in gone])

    @staticmethod
    def _is_gone(job: Job, now: float) -> bool:
        return job.future.cancelled() or (job.deadline is not None and now > job.deadline)

    def _admit(self) -> None:
        """Prefill waiting requests (FIFO) into free slots, as many as fit, in one forward."""
        free = [slot for slot, job in enumerate(self._slots) if job is None]
        with self._wake:
            count = min(len(free), len(self._queue), self.max_prefill)
            jobs = [self._queue.popleft() for _ in range(count)]
        if not jobs:
            return
        # Futures stay pending while they run, so that a client that leaves can still cancel them.
        jobs = [job for job in jobs if not job.future.cancelled()]
        if not jobs:
            return
        if self.decoder.per_row_prefill and len(jobs) > 1:
            # Row isolation (the CPU): every request is prefilled alone, so its prompt's shapes never
            # depend on who is admitted with it; each fails alone too.
            for index, job in enumerate(jobs):
                try:
                    self._prefill([job], [slot for slot, occupant in enumerate(self._slots) if occupant is None])
                except Exception as exc:
                    if is_device_failure(exc):
                        for waiting in jobs[index:]:
                            _fail(waiting.future, exc)
                        raise
                    logger.exception("admitting a request failed")
                    _fail(job.future, exc)
                    self.stats.failed += 1
            return
        try:
            self._prefill(jobs, free)
        except Exception as exc:
            if is_device_failure(exc):
                for job in jobs:
                    _fail(job.future, exc)
                raise
            if len(jobs) == 1:  # this request fails alone; the running batch goes on
                logger.exception("admitting a request failed")
                _fail(jobs[0].future, exc)
                self.stats.failed += 1
                return
            # One request may be what failed the group (a prefill out of memory, a picture the processor
            # refuses): each is admitted alone, so only the failing one fails.
            logger.warning("admitting %d requests together failed (%s); admitting them one by one", len(jobs), exc)
            for job in jobs:
                free = [slot for slot, occupant in enumerate(self._slots) if occupant is None]
                try:
                    self._prefill([job], free)
                except Exception:
                    logger.exception("admitting a request failed")
                    _fail(job.future, exc)
                    self.stats.failed += 1

    def _prefill(self, jobs: list[Job], free: list[int]) -> None:
        """Prefill `jobs` together into the first free slots (long ones run the fast loop instead)."""
        inputs = self.engine.prepare([job.image for job in jobs], [job.prompt for job in jobs])
        jobs, inputs = self._beyond_the_cache(jobs, inputs)
        if not jobs:
            return
        slots = free[: len(jobs)]
        names = [job.adapter for job in jobs] if self.engine.peft else None
        context, graphs = self.engine.graph_context(names)
        with context(len(jobs)), self.decoder.peft_calls(not graphs):
            self.decoder.prefill(slots, inputs, [job.spec for job in jobs],
                                 share_images=self.engine.share_images and names is None, adapters=names)
        now = time.monotonic()
        prompt_length = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(-1).tolist()
        for job, slot, tokens in zip(jobs, slots, prompt_tokens):
            job.slot, job.first_step, job.reach = slot, now, prompt_length + job.spec.budget + 1
            job.prompt_tokens = int(tokens)
            self._slots[slot] = job
        self.stats.admitted += len(jobs)

    def _beyond_the_cache(self, jobs: list[Job], inputs) -> tuple[list[Job], dict]:
        """Answer the requests whose prompt and budget exceed the decoder's cache with the `fast` loop, one
        at a time (the running batch waits meanwhile); the rest, and their inputs, go on to the prefill."""
        lengths = inputs["attention_mask"].sum(-1).tolist()
        too_long = [job for job, length in zip(jobs, lengths) if length + job.spec.budget + 1 > self.decoder.length]
        if not too_long:
            return jobs, inputs
        for job in too_long:
            try:
                [generation] = self.engine.generate([job.image], [job.prompt], max_new_tokens=[job.spec.budget],
                                                    adapters=[self._adapter_id(job)])
            except Exception as exc:
                self.stats.failed += 1
                _fail(job.future, exc)
                continue
            self.stats.completed += 1
            _answer(job.future, generation)
        rest = [job for job in jobs if job not in too_long]
        return rest, (self.engine.prepare([j.image for j in rest], [j.prompt for j in rest]) if rest else {})

    def _adapter_id(self, job: Job) -> str | None:
        """The adapter id (as `engine.generate` takes it) of a job's PEFT adapter name."""
        return self.engine.adapter_id_of(job.adapter) if job.adapter is not None else None

    def _step_and_collect(self) -> None:
        decoder = self.decoder
        self._compact()  # after admission: new rows took the lowest free slots first
        occupied = [job for job in self._slots if job is not None]
        bucket = self.last_batch = decoder.batch_for(max(job.slot for job in occupied) + 1)
        names = None
        if self.engine.peft:
            from ..adapters import BASE_ROW

            names = [job.adapter if job is not None else BASE_ROW for job in self._slots[:bucket]]
        context, graphs = self.engine.graph_context(names)
        decoder.fit_span(max(job.reach for job in occupied))
        # A row is done after at most `budget` steps (its prefill chose its first token), or its cut: no
        # group of steps runs past the longest remaining one.
        steps = max(1, min(decoder.sync_every, max(job.horizon - job.steps for job in occupied)))
        with context(bucket):
            for _ in range(steps):
                decoder.run_step(bucket, graphs=graphs)
        for job in occupied:
            job.steps += steps
        self.stats.steps += steps
        finished, fresh = self._look(bucket, occupied)  # the host's one look per group of steps
        # A row past its cut has chosen one token more than the cut: whether the answer went on is known.
        done = [job for job in occupied if finished[job.slot] or (job.cut_after is not None
                                                                  and job.steps >= job.cut_after)]
        for job, ids, logprobs in fresh:
            if job not in done:
                self._stream(job, ids, logprobs)
        if done:
            self._deliver(done)
        if self.on_step is not None:
            self.on_step(self, len(occupied))

    def _look(self, bucket: int, occupied: list[Job]) -> tuple[list[bool], list[tuple[Job, list[int], list[float]]]]:
        """Which rows of the bucket finished, and each streaming row's tokens and log-probabilities chosen
        since its last look: one copy from the device (every row has chosen `1 + steps` tokens)."""
        decoder = self.decoder
        streaming = [job for job in occupied if job.on_tokens is not None]
        if not streaming:
            return decoder.finished[:bucket].cpu().tolist(), []
        low = min(job.streamed for job in streaming)
        high = min(decoder.length, max(job.steps + 1 for job in streaming))
        window = torch.cat([decoder.finished[:bucket, None].double(), decoder.out_tokens[:bucket, low:high].double(),
                            decoder.out_logprobs[:bucket, low:high].double()], dim=1).cpu()
        width = high - low
        fresh = []
        for job in streaming:
            end = min(job.steps + 1, high, job.cut_after if job.cut_after is not None else high)
            if end <= job.streamed:
                continue
            row = window[job.slot]
            columns = slice(1 + job.streamed - low, 1 + end - low)
            ids = [int(t) for t in row[columns].tolist()]
            logprobs = row[1 + width:][job.streamed - low:end - low].tolist()
            if self.decoder.eos_id in ids:  # a finished row: its answer goes back whole
                continue
            fresh.append((job, ids, logprobs))
        return window[:, 0].bool().tolist(), fresh

    def _stream(self, job: Job, ids: list[int], logprobs: list[float]) -> None:
        job.streamed += len(ids)
        try:
            job.on_tokens(ids, logprobs)
        except Exception:  # a failing listener never stops the row (nor the others)
            logger.exception("the on_tokens hook failed")

    def _deliver(self, jobs: list[Job]) -> None:
        """Answer finished rows and free their slots. One row that cannot be answered (its text does not
        decode, a metrics hook fails) fails alone: the others are answered all the same."""
        results = self.decoder.results([job.slot for job in jobs])
        try:
            self._free([job.slot for job in jobs])
        finally:  # the results are read: answer them even if the device fails to reset the slots
            self._answer_rows(jobs, results)

    def _answer_rows(self, jobs: list[Job], results) -> None:
        for job, decoded in zip(jobs, results):
            try:
                generation = self.engine._row(decoded.token_ids, decoded.token_logprobs)
                generation.prompt_tokens = job.prompt_tokens
            except Exception as exc:
                logger.exception("answering a finished row failed")
                self.stats.failed += 1
                _fail(job.future, exc)
                continue
            self.stats.completed += 1
            self.stats.tokens += len(generation.token_ids) + 1  # and its end token
            if self.on_finish is not None:
                try:
                    self.on_finish(job, generation)
                except Exception:
                    logger.exception("the on_finish hook failed")
            _answer(job.future, generation)

    def _compact(self) -> None:
        """Move the highest rows down into free slots below them: a step runs the first n slots, so
        every hole under the highest row is a row computed for nothing."""
        while True:
            occupied = [slot for slot, job in enumerate(self._slots) if job is not None]
            free = [slot for slot, job in enumerate(self._slots) if job is None]
            if not occupied or not free or free[0] > occupied[-1]:
                return
            source, target = occupied[-1], free[0]
            self.decoder.move(source, target)
            job = self._slots[source]
            self._slots[target], self._slots[source], job.slot = job, None, target
            self.decoder.reset(torch.tensor([source], device=self.decoder.device))

    def _free(self, slots: list[int]) -> None:
        # The device first: if it fails, the rows stay where _fail_running finds them.
        self.decoder.reset(torch.tensor(slots, device=self.decoder.device))
        for slot in slots:
            job = self._slots[slot]
            if job is not None:
                job.slot = None
            self._slots[slot] = None

    def _fail_running(self, exc: Exception) -> None:
        """Fail the running rows' requests, then free their slots (a device that failed may fail that
        too: the requests are answered first, whatever happens to the buffers)."""
        jobs = [job for job in self._slots if job is not None]
        for job in jobs:
            self.stats.failed += 1
            _fail(job.future, exc)
        self._slots = [None] * len(self._slots)
        for job in jobs:
            job.slot = None
        if jobs:
            try:
                self.decoder.reset()
            except Exception:
                logger.exception("resetting the decoder's rows failed")
