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
import threading
from concurrent.futures import Future, ThreadPoolExecutor


class ComputeThread:
    """A single worker thread that runs functions one at a time (`run`, `submit`), or one loop for good
    (`occupy`)."""

    def __init__(self, name: str = "torch-compute"):
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None
        self._resident: str | None = None  # what occupies the thread for good, if anything
        self._lock = threading.Lock()
        self._executor.submit(self._remember_ident).result()

    def _remember_ident(self) -> None:
        self._ident = threading.get_ident()

    @property
    def ident(self) -> int:
        """The thread's `threading.get_ident()`."""
        return self._ident

    def is_current(self) -> bool:
        return threading.get_ident() == self._ident

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Queue `fn(*args, **kwargs)`; its future holds the result."""
        with self._lock:
            if self._resident is not None:
                raise RuntimeError(f"the compute thread runs {self._resident} for good; it takes no other work")
            return self._executor.submit(fn, *args, **kwargs)

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
            return self._executor.submit(self._occupied, loop)

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
