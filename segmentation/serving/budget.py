"""A weighted asyncio semaphore: full-size pixels a public worker holds in memory at once.

A decoded image costs about 8 bytes a pixel while it is decoded and resized (the RGB picture and
Pillow's working copies), and pasting and encoding one full-size mask about as much again; a
40-megapixel image is ~300 MB either way. Without a bound one `/segment_batch` of 16 such images
(or 16 concurrent requests) would hold ~5 GB. Each stage that holds a full-size picture or mask
takes the image's pixels from the budget first and gives them back when it is done, so what a
worker holds is capped by the budget, not by how many images arrive.

Waiters are served first come, first served: a large image at the head is not starved by small
ones behind it. A weight over the whole budget is clamped to it, so one image of the largest
allowed size always gets through (alone).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class PixelBudget:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("the pixel budget must be at least 1")
        self.capacity = capacity
        self.available = capacity
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self.peak_in_use = 0  # the most pixels ever held at once (for tests and metrics)

    @property
    def in_use(self) -> int:
        return self.capacity - self.available

    def _weight(self, pixels: int) -> int:
        return max(1, min(int(pixels), self.capacity))

    async def acquire(self, pixels: int) -> int:
        """Wait until `pixels` (clamped to the capacity) are free and take them; returns what was taken."""
        weight = self._weight(pixels)
        if not self._waiters and weight <= self.available:
            self._take(weight)
            return weight
        future = asyncio.get_running_loop().create_future()
        entry = (weight, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(weight)  # granted just as we were cancelled: give it back
            else:
                with contextlib.suppress(ValueError):  # `_wake` may have dropped it already
                    self._waiters.remove(entry)
                self._wake()  # the head may have changed
            raise
        return weight

    def _take(self, weight: int) -> None:
        self.available -= weight
        self.peak_in_use = max(self.peak_in_use, self.in_use)

    def release(self, weight: int) -> None:
        self.available += weight
        if self.available > self.capacity:
            raise RuntimeError("released more pixels than were taken")
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            weight, future = self._waiters[0]
            if future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            if weight > self.available:
                return
            self._waiters.popleft()
            self._take(weight)
            future.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[int]:
        """`async with budget.hold(w * h):` ... the pixels are given back on leaving, however it is left."""
        weight = await self.acquire(pixels)
        try:
            yield weight
        finally:
            self.release(weight)
