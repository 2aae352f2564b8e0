"""One thread for all of a process's torch work.

PyTorch's CPU kernels run on OpenMP (libgomp, in PyTorch's wheels). Every thread that runs a parallel
torch op gets a team of worker threads of its own, and once libgomp manages more threads than there are
CPUs it throttles them: an idle worker stops spinning between parallel regions almost at once and
sleeps, so each of the hundreds of parallel regions of a decode step waits for a futex wake-up. A
model loaded on one thread (BentoML's main thread) and run on another (the scheduler's, or BentoML's
pool threads for batches) is in that state. Measured on the 2-core test machine (medium model):

| where the torch work ran | decode step, 12 rows | prefill, 1 row |
| --- | ---: | ---: |
| one thread (this module) | 19-21 ms | 93-126 ms |
| loaded on the main thread, run on another | 26 ms | 136-149 ms |

So the engine's process loads, warms up and runs its models on one `ComputeThread`. A step-level
scheduler makes it its home for good (`occupy`); after that, other work must not be sent to it.
"""

from __future__ import annotations

import functools
import queue
import threading
from concurrent.futures import Future


class ComputeThread:
    """A single worker thread that runs functions one at a time (`run`, `submit`), or one loop for good
    (`occupy`).

    A daemon thread (not a `ThreadPoolExecutor`'s): the interpreter joins an executor's threads at exit,
    and a scheduler's loop that nobody closed would then keep a stopping worker alive for ever.
    """

    def __init__(self, name: str = "torch-compute"):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._resident: str | None = None  # what occupies the thread for good, if anything
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            future, fn, args, kwargs = self._tasks.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)
            else:
                future.set_result(result)

    @property
    def ident(self) -> int:
        """The thread's `threading.get_ident()`."""
        return self._thread.ident

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def _queue(self, fn, args, kwargs) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args, kwargs))
        return future

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)`; its future holds the result."""
        with self._lock:
            if self._resident is not None:
                raise RuntimeError(f"the compute thread runs {self._resident} for good; it takes no other work")
            return self._queue(fn, args, kwargs)

    def run(self, fn, /, *args, **kwargs):
        """`fn(*args, **kwargs)` on the thread, waited for (called directly when already on it)."""
        if self.is_current():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    def occupy(self, loop, name: str) -> Future:
        """Run `loop()` on the thread until it returns; meanwhile `submit` and `run` from other threads
        raise (they would wait forever). The future settles when the loop ends."""
        with self._lock:
            if self._resident is not None:
                raise RuntimeError(f"the compute thread runs {self._resident} for good already")
            self._resident = name
            return self._queue(self._occupied, (loop,), {})

    def _occupied(self, loop) -> None:
        try:
            loop()
        finally:
            with self._lock:
                self._resident = None

    @property
    def occupied(self) -> bool:
        return self._resident is not None


@functools.cache
def compute_thread() -> ComputeThread:
    """The process's compute thread, started on first use."""
    return ComputeThread()
