"""The pixel budget: a weighted asyncio semaphore, first come first served (segmentation/serving/budget.py)."""

from __future__ import annotations

import asyncio

import pytest

from segmentation.serving.budget import PixelBudget


def test_concurrent_holders_never_exceed_the_capacity():
    budget = PixelBudget(100)
    held = []

    async def work(pixels: int):
        async with budget.hold(pixels):
            held.append(budget.in_use)
            await asyncio.sleep(0.001 * (pixels % 7))

    async def main():
        await asyncio.gather(*(work(p) for p in [10, 60, 30, 90, 5, 45, 70, 20, 100, 1] * 5))

    asyncio.run(main())
    assert max(held) <= 100 and budget.peak_in_use <= 100 and budget.in_use == 0
    assert budget.peak_in_use > 60  # some of them did run at once


def test_an_image_over_the_whole_budget_runs_alone():
    budget = PixelBudget(100)

    async def main():
        async with budget.hold(5000) as taken:
            assert taken == 100 and budget.available == 0

    asyncio.run(main())
    assert budget.available == 100


def test_first_come_first_served():
    budget = PixelBudget(100)
    order = []

    async def main():
        first = await budget.acquire(80)
        big = asyncio.ensure_future(budget.acquire(90))  # waits: only 20 free
        await asyncio.sleep(0)
        small = asyncio.ensure_future(budget.acquire(10))  # would fit, but queues behind the big one
        await asyncio.sleep(0)
        big.add_done_callback(lambda _: order.append("big"))
        small.add_done_callback(lambda _: order.append("small"))
        assert not big.done() and not small.done()
        budget.release(first)
        await asyncio.gather(big, small)
        assert budget.in_use == 100

    asyncio.run(main())
    assert order == ["big", "small"]


def test_a_cancelled_waiter_takes_nothing_and_lets_the_next_one_in():
    budget = PixelBudget(100)

    async def main():
        first = await budget.acquire(100)
        waiter = asyncio.ensure_future(budget.acquire(100))
        behind = asyncio.ensure_future(budget.acquire(50))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        budget.release(first)
        assert await behind == 50
        assert budget.in_use == 50
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())


def test_the_budget_is_given_back_when_the_holder_fails():
    budget = PixelBudget(10)

    async def main():
        with pytest.raises(ValueError):
            async with budget.hold(7):
                raise ValueError("decoding failed")

    asyncio.run(main())
    assert budget.available == 10


def test_release_of_more_than_was_taken_is_a_bug():
    with pytest.raises(RuntimeError):
        PixelBudget(10).release(1)
    with pytest.raises(ValueError):
        PixelBudget(0)
