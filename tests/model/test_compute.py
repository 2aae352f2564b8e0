"""The compute thread (segmentation/model/compute.py): one thread runs a process's torch work, a
step-level scheduler can make it its home for good, and nothing else is then sent to it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pictures import random_image

from segmentation.model.compute import ComputeThread
from segmentation.model.engine import PaliGemmaEngine
from segmentation.model.graph.decoder import GraphSettings
from segmentation.model.graph.scheduler import StepScheduler
from segmentation.model.prompts import parse_prompt

ROOT = Path(__file__).resolve().parents[2]


def test_run_and_submit_use_one_thread_that_is_not_the_caller():
    compute = ComputeThread(name="test-compute")
    idents = {compute.run(threading.get_ident) for _ in range(3)}
    idents.add(compute.submit(threading.get_ident).result())
    assert idents == {compute.ident} and compute.ident != threading.get_ident()
    # From the thread itself, run calls directly (a queued call would wait for itself forever).
    assert compute.run(lambda: compute.run(threading.get_ident)) == compute.ident
    with pytest.raises(ZeroDivisionError):
        compute.run(lambda: 1 / 0)


def test_an_occupied_thread_refuses_other_work_until_its_loop_ends():
    compute = ComputeThread(name="test-compute")
    release = threading.Event()
    started = threading.Event()

    def loop():
        started.set()
        release.wait(10)

    done = compute.occupy(loop, "a test loop")
    assert started.wait(10) and compute.occupied
    with pytest.raises(RuntimeError, match="a test loop"):
        compute.run(threading.get_ident)
    with pytest.raises(RuntimeError, match="already"):
        compute.occupy(loop, "another loop")
    release.set()
    done.result(10)
    assert not compute.occupied
    assert compute.run(threading.get_ident) == compute.ident


def test_a_scheduler_on_the_compute_thread_runs_every_forward_there(tiny_fixtures):
    compute = ComputeThread(name="test-compute")
    # Loaded and warmed on the compute thread, as the service's engine worker does.
    engine = compute.run(PaliGemmaEngine.from_pretrained, tiny_fixtures / "paligemma", generation="graph",
                         graph=GraphSettings(buckets=(1, 2, 4)))
    seen: list[int] = []
    # q_proj runs in the prefill (transformers' forward) and in every decode step (the decoder's own).
    query = engine.model.model.language_model.layers[0].self_attn.q_proj
    hook = query.register_forward_pre_hook(lambda *_: seen.append(threading.get_ident()))
    scheduler = StepScheduler(engine, thread=compute)
    try:
        # Detection prompts: the fixture's random model answers them with tokens, so rows take steps.
        futures = [scheduler.submit(random_image(64, 64, seed), parse_prompt(text, "detect"), max_new_tokens=12)
                   for seed, text in enumerate(["cat", "car ; bus ; person ; bird", "cat"])]
        answers = [future.result(120) for future in futures]
    finally:
        scheduler.close()
        hook.remove()
    assert len(answers) == 3 and scheduler.stats.completed == 3 and scheduler.stats.steps > 0
    assert len(seen) > 3 and set(seen) == {compute.ident}
    # The loop has ended: the thread takes work again.
    assert not compute.occupied and compute.run(threading.get_ident) == compute.ident


def test_a_process_whose_compute_thread_is_occupied_still_exits():
    """A loop nobody closed (a server stopping) must not keep the interpreter from exiting."""
    import subprocess
    import sys

    code = ("import time\nfrom segmentation.model.compute import ComputeThread\n"
            "ComputeThread().occupy(lambda: time.sleep(600), 'a loop')\nprint('bye')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "bye", done.stderr[-2000:]
