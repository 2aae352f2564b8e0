"""Scale out: the engine served alone, started as deploy/ starts it (the bento's `start-http-server
--service-name paligemma-engine`) with a shared token, and the public tier against it (`SEG_ENGINE_URL`), as
two real servers on 127.0.0.1, beside the one-server default; and what the engine accepts from anyone who
reaches its port."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image
from servers import engine_as_deployed, free_port, kill_tree, spawn_server, start_server

ADAPTERS = "acme/lora-a,acme/lora-b"
TOKEN = "engine-token-for-tests"
ENGINE_ENV = {"SEG_ADAPTERS": ADAPTERS, "SEG_ENGINE_TOKEN": TOKEN}
AUTH = {"authorization": f"Bearer {TOKEN}"}
HEAVY = ("torch", "transformers", "peft", "accelerate")


def png_b64(seed: int, size: tuple[int, int] = (160, 120)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def split_home(tmp_path_factory, tiny_fixtures, lora_adapters) -> Path:
    """The demo model and two random LoRA adapters: the public tier must stay torch-free with them."""
    from lora import ADAPTERS as NAMES
    from lora import import_adapter
    from servers import import_fixtures

    home = tmp_path_factory.mktemp("split-home")
    import_fixtures(home, tiny_fixtures)
    for adapter_id, name in NAMES.items():
        import_adapter(home, lora_adapters[name], adapter_id)
    return home


@pytest.fixture(scope="module")
def engine(split_home):
    srv = start_server(split_home, ENGINE_ENV, command=engine_as_deployed)
    yield srv
    kill_tree(srv.process.pid)


@pytest.fixture(scope="module")
def public(split_home, engine):
    srv = start_server(split_home, {**ENGINE_ENV, "SEG_ENGINE_URL": engine.url, "SEG_API_WORKERS": "1",
                                    "SEG_DEBUG_MODULES": "true"})
    yield srv
    kill_tree(srv.process.pid)


@pytest.fixture(scope="module")
def single(split_home):
    srv = start_server(split_home, {"SEG_ADAPTERS": ADAPTERS, "SEG_DEBUG_MODULES": "true"})
    yield srv
    kill_tree(srv.process.pid)


def requests_to_compare(tmp_path: Path) -> list[tuple[str, dict, int]]:
    upload = tmp_path / "upload.png"
    upload.write_bytes(base64.b64decode(png_b64(9, (333, 211))))
    return [
        ("json", {"route": "/segment", "body": {"image_base64": png_b64(1), "prompt": "cat ; dog"}}, 200),
        ("json", {"route": "/segment", "body": {"image_base64": png_b64(2, (97, 180)), "prompt": "car",
                                                "mask_format": "png", "return_input_image": True}}, 200),
        ("json", {"route": "/segment", "body": {"image_base64": png_b64(3), "prompt": "tree",
                                                "mask_format": "polygon", "model": "acme/lora-a"}}, 200),
        ("json", {"route": "/detect", "body": {"image_base64": png_b64(4), "prompt": "person ; bus",
                                               "model": "acme/lora-b", "labels_from_prompt": True}}, 200),
        ("json", {"route": "/segment_batch", "body": {"requests": [
            {"image_base64": png_b64(5), "prompt": "cat"},
            {"image_base64": png_b64(6), "prompt": "dog", "task": "detect", "model": "no/such-model"}]}}, 200),
        ("json", {"route": "/models", "body": {}}, 200),
        ("json", {"route": "/segment", "body": {"image_base64": png_b64(7), "prompt": "cat", "model": "nope"}}, 400),
        ("json", {"route": "/segment", "body": {"image_base64": "bm90IGFuIGltYWdl", "prompt": "cat"}}, 400),
        ("multipart", {"route": "/segment", "files": {"image": upload}, "data": {"prompt": "cat ; car"}}, 200),
        ("multipart", {"route": "/render", "files": {"image": upload}, "data": {"prompt": "cat"}}, 200),
    ]


def send(url: str, kind: str, spec: dict) -> httpx.Response:
    if kind == "json":
        return httpx.post(url + spec["route"], json=spec["body"], timeout=120)
    files = {name: (path.name, path.read_bytes(), "image/png") for name, path in spec["files"].items()}
    return httpx.post(url + spec["route"], files=files, data=spec["data"], timeout=120)


def test_two_tiers_answer_byte_for_byte_as_one_server(single, public, tmp_path):
    for kind, spec, status in requests_to_compare(tmp_path):
        one, two = send(single.url, kind, spec), send(public.url, kind, spec)
        assert one.status_code == status, (spec["route"], one.text[:300])
        assert (two.status_code, two.headers["content-type"]) == (status, one.headers["content-type"]), \
            (spec["route"], two.text[:300])
        if status == 200:
            assert two.content == one.content, (spec["route"], one.text[:300], two.text[:300])
        else:  # every error answer carries its own request id
            assert {**two.json(), "request_id": None} == {**one.json(), "request_id": None}, spec["route"]


def process_tree(server) -> list[psutil.Process]:
    parent = psutil.Process(server.process.pid)
    return [parent, *parent.children(recursive=True)]


def loads_libtorch(proc: psutil.Process) -> bool:
    return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()


def test_public_tier_never_loads_torch_or_transformers(public, engine, single):
    # From inside the worker that serves requests: its own sys.modules.
    for srv in (public, single):
        modules = httpx.get(srv.url + "/debug/modules", timeout=10).json()["modules"]
        assert "bentoml" in modules and "PIL" in modules  # the check sees what is loaded
        assert not [m for m in HEAVY if m in modules], (srv.url, [m for m in HEAVY if m in modules])
    # From outside: no process of the public tier (server and workers) has torch's library mapped,
    # while the engine's do (so the check can fail).
    assert not [p.pid for p in process_tree(public) if loads_libtorch(p)]
    assert any(loads_libtorch(p) for p in process_tree(engine))
    # The single server's public worker skips the model checks too; its engine worker loads torch.
    assert any(loads_libtorch(p) for p in process_tree(single))
    # The debug route is off unless asked for.
    assert httpx.get(engine.url + "/debug/modules", headers=AUTH, timeout=10).status_code == 404


def test_public_worker_starts_in_seconds(split_home, engine):
    """From `bentoml serve` to the public tier's first answer, and from its worker's process start."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**ENGINE_ENV, "SEG_ENGINE_URL": engine.url, "SEG_API_WORKERS": "1"}
    launched = time.time()
    servers: list = []
    starter = threading.Thread(target=lambda: servers.append(start_server(split_home, env, port=port)))
    starter.start()
    alive_at = None
    try:
        while alive_at is None and time.time() - launched < 60:
            try:
                if httpx.get(url + "/livez", timeout=0.5).status_code == 200:
                    alive_at = time.time()
            except httpx.HTTPError:
                time.sleep(0.02)
        starter.join(timeout=120)
        [srv] = servers
        [worker] = [p for p in psutil.Process(srv.process.pid).children(recursive=True)
                    if "--service-name" in p.cmdline()]
        worker_s, serve_s = alive_at - worker.create_time(), alive_at - launched
        print(f"\n[scale-out] public tier: first answer {serve_s:.2f} s after `bentoml serve`, "
              f"{worker_s:.2f} s after its worker process started")
        assert worker_s < 10 and serve_s < 20  # targets 2 s and a few s on idle cores; loose for busy CI
    finally:
        starter.join(timeout=120)
        for srv in servers:
            kill_tree(srv.process.pid)


def test_public_tier_metrics_and_engine_load_metrics(public, engine):
    httpx.post(public.url + "/segment", json={"image_base64": png_b64(11), "prompt": "cat"}, timeout=120)
    text = httpx.get(public.url + "/metrics", timeout=10).text
    for stage in ("decode_input", "encode"):
        assert re.search(rf'segmentation_stage_seconds_count{{stage="{stage}"}} [1-9]', text), stage
    engine_text = httpx.get(engine.url + "/metrics", timeout=10).text
    for stage in ("generate", "mask_decode"):
        assert re.search(rf'segmentation_stage_seconds_count{{stage="{stage}"}} [1-9]', engine_text), stage
    for gauge in ("seg_engine_requests_in_flight", "seg_engine_running_slots", "seg_engine_queue_length"):
        assert re.search(rf"^{gauge} 0\.0$", engine_text, re.M), gauge  # idle again
    assert re.search(r"^seg_engine_slots 16\.0$", engine_text, re.M)
    for name in ("seg_engine_time_to_first_step_seconds", "seg_engine_steps_per_request",
                 "seg_engine_tokens_per_second"):
        assert f"# TYPE {name}" in engine_text, name


async def fire(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response | None]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(body):
            async with limit:
                try:
                    return await client.post(url + "/segment", json=body)
                except httpx.HTTPError:
                    return None
        return await asyncio.gather(*(one(b) for b in bodies))


def test_a_full_engine_sheds_at_once_with_retry_after(split_home, engine):
    srv = start_server(split_home, {**ENGINE_ENV, "SEG_ENGINE_URL": engine.url, "SEG_ENGINE_MAX_IN_FLIGHT": "1"})
    try:
        bodies = [{"image_base64": png_b64(100 + i), "prompt": "cat ; dog"} for i in range(12)]
        started = time.perf_counter()
        responses = asyncio.run(fire(srv.url, bodies, concurrency=12))
        statuses = [r.status_code if r is not None else 0 for r in responses]
        assert set(statuses) == {200, 503}, statuses
        shed = [r for r in responses if r.status_code == 503]
        assert all(r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"] for r in shed)
        assert time.perf_counter() - started < 60
    finally:
        kill_tree(srv.process.pid)


def test_requests_spread_over_engine_replicas(split_home, engine):
    second = start_server(split_home, ENGINE_ENV, command=engine_as_deployed)
    srv = start_server(split_home, {**ENGINE_ENV, "SEG_ENGINE_URL": f"{engine.url},{second.url}"})
    try:
        def predicts(url: str) -> float:
            text = httpx.get(url + "/metrics", timeout=10).text
            return sum(float(v) for v in re.findall(
                r'^bentoml_service_request_total\{[^}]*endpoint="/predict"[^}]*\} (\S+)$', text, re.M))

        before = predicts(engine.url), predicts(second.url)
        bodies = [{"image_base64": png_b64(200 + i), "prompt": "cat"} for i in range(16)]
        responses = asyncio.run(fire(srv.url, bodies, concurrency=8))
        assert [r.status_code for r in responses] == [200] * 16
        served = predicts(engine.url) - before[0], predicts(second.url) - before[1]
        assert sum(served) == 16 and min(served) >= 4, served
    finally:
        kill_tree(srv.process.pid)
        kill_tree(second.process.pid)


@pytest.mark.slow
def test_a_killed_engine_is_answered_503_at_once_and_served_again_after_its_restart(split_home):
    port = free_port()
    engine_env = ENGINE_ENV
    first = start_server(split_home, engine_env, command=engine_as_deployed, port=port)
    public = start_server(split_home, {**engine_env, "SEG_ENGINE_URL": first.url})
    engines = [first]
    try:
        bodies = [{"image_base64": png_b64(300 + i), "prompt": "cat ; dog"} for i in range(6)]
        expected = [httpx.post(public.url + "/segment", json=b, timeout=120).content for b in bodies]
        results: list[tuple[int, int, bytes, str | None]] = []
        stop = threading.Event()

        def load(worker: int) -> None:  # a bounded loop: each client sends until stopped, at most 150
            with httpx.Client(timeout=120) as client:
                for n in range(150):
                    if stop.is_set():
                        return
                    i = (worker + n) % len(bodies)
                    r = client.post(public.url + "/segment", json=bodies[i])
                    results.append((i, r.status_code, r.content, r.headers.get("retry-after")))
                    if r.status_code == 503:
                        time.sleep(0.2)

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        kill_tree(first.process.pid)
        killed = time.perf_counter()
        first_503 = None
        while time.perf_counter() - killed < 5:
            r = httpx.post(public.url + "/segment", json=bodies[0], timeout=10)
            if r.status_code == 503:
                first_503 = time.perf_counter() - killed
                assert r.headers["retry-after"] == "1"
                break
        assert first_503 is not None and first_503 < 1.0, first_503
        engines.append(start_server(split_home, engine_env, command=engine_as_deployed, port=port))
        restarted = time.perf_counter()
        recovered = None
        while time.perf_counter() - restarted < 60:
            if httpx.post(public.url + "/segment", json=bodies[1], timeout=60).status_code == 200:
                recovered = time.perf_counter() - restarted
                break
            time.sleep(0.2)
        assert recovered is not None, public.logs()
        time.sleep(2)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        statuses = [status for _, status, _, _ in results]
        print(f"\n[scale-out] engine kill: first 503 after {first_503:.3f} s; served again {recovered:.1f} s after the "
              f"engine was ready; load loop {len(results)} requests: "
              f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }")
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) > 0 and statuses.count(200) > 0
        assert all(retry == "1" for _, status, _, retry in results if status == 503)
        wrong = [i for i, status, content, _ in results if status == 200 and content != expected[i]]
        assert not wrong, f"{len(wrong)} answers differ from their request's own"
        assert httpx.get(public.url + "/readyz", timeout=5).status_code == 200
    finally:
        kill_tree(public.process.pid)
        for srv in engines:
            kill_tree(srv.process.pid)


# --- what the engine accepts from anyone who reaches its port ---------------------------------------


class Exploit:
    """A pickle that runs a command when loaded: it must never be loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def engine_item(seed: int = 1, **changes) -> dict:
    from segmentation.model.images import model_input
    from segmentation.serving.bento import EngineItem

    picture = model_input(Image.open(io.BytesIO(base64.b64decode(png_b64(seed)))), 224)
    item = EngineItem(model="demo/paligemma2-tiny-random", image=picture, task="segment", classes=["cat"])
    return {**item.model_dump(mode="json"), **changes}


def engine_call(url: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    from segmentation.serving.trust import WIRE_VERSION

    return httpx.post(url + path, json=body, timeout=120,
                      headers={**AUTH, "x-seg-wire-version": WIRE_VERSION, **(headers or {})})


def unix_socket_of_engine(single) -> str:
    """The Unix socket the one server's engine worker listens on (BentoML's private directory)."""
    [worker] = [p for p in process_tree(single) if "paligemma-engine" in p.cmdline()]
    [path] = {c.laddr for c in worker.net_connections(kind="unix") if c.laddr and c.laddr.endswith(".sock")}
    return path


def test_no_pickle_runs_on_any_engine(engine, single, tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    body = pickle.dumps(Exploit(marker))
    deployed = httpx.Client(base_url=engine.url, timeout=30)
    socket_path = unix_socket_of_engine(single)
    one_server = httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://engine", timeout=30)
    for client in (deployed, one_server):
        for path in ("/predict", "/describe"):
            for headers in ({}, AUTH):
                response = client.post(path, content=body,
                                       headers={"content-type": "application/vnd.bentoml+pickle", **headers})
                assert response.status_code in (401, 415), (path, response.status_code, response.text)
                assert response.status_code == 415 or not headers
    time.sleep(1)
    assert not marker.exists()
    assert httpx.get(engine.url + "/readyz", timeout=10).status_code == 200  # and it still serves


def test_the_engine_needs_its_token_but_not_for_probes_and_metrics(engine):
    from segmentation.serving.trust import WIRE_VERSION

    for headers in ({}, {"authorization": "Bearer not-the-token"}, {"authorization": TOKEN}):
        response = httpx.post(engine.url + "/describe", json={}, timeout=30,
                              headers={"x-seg-wire-version": WIRE_VERSION, **headers})
        assert response.status_code == 401 and "SEG_ENGINE_TOKEN" in response.json()["error"]
    assert engine_call(engine.url, "/describe", {}).status_code == 200
    assert engine_call(engine.url, "/describe", {}, {"x-seg-wire-version": ""}).status_code == 409
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(engine.url + path, timeout=10).status_code == 200, path
    assert httpx.request("TRACE", engine.url + "/livez", timeout=10).status_code == 405


def test_the_engine_checks_every_field_again(engine):
    url = engine.url
    refused_whole = [
        {"items": [engine_item(max_new_tokens=10**9)]},
        {"items": [engine_item(task="caption")]},
        {"items": [engine_item(classes=[])]},
        {"items": [engine_item(classes=["x"] * 300)]},
        {"items": [engine_item(image="not base64 at all")]},
        {"items": [engine_item(image=base64.b64encode(b"P6\n60000 60000\n255\n" + b"\0" * 64).decode())]},
        {"items": [engine_item(image=png_b64(1))]},  # a PNG: only the PPM the public tier writes is read
        {"items": [engine_item(unexpected="field")]},
        {"items": "many"},
    ]
    for body in refused_whole:
        response = engine_call(url, "/predict", body)
        assert response.status_code == 400, (str(body)[:200], response.status_code, response.text[:300])
    # Items that parse but break a limit are refused one by one; their neighbours are answered.
    refused_alone = [
        engine_item(classes=["<loc0001><seg012> cat"]),
        engine_item(classes=["<image>"]),
        engine_item(max_new_tokens=100_000),  # over the server's SEG_MAX_NEW_TOKENS (512)
        engine_item(classes=[f"class {i}" for i in range(33)]),
        engine_item(classes=["a" * 2000]),
        engine_item(classes=[" cat "]),
        engine_item(classes=["cat ; dog"]),
        engine_item(model="no/such-model"),
        engine_item(model="../../etc/passwd"),
    ]
    good = engine_item(seed=2)
    response = engine_call(url, "/predict", {"items": [*refused_alone, good]})
    assert response.status_code == 200, response.text[:300]
    outcomes = response.json()
    for item, outcome in zip(refused_alone, outcomes):
        assert outcome["status"] == 400 and outcome["error"], (item["classes"], item.get("model"), outcome)
        assert "Traceback" not in outcome["error"]
    assert outcomes[-1]["status"] == 200 and outcomes[-1]["prediction"]["text"]


def test_a_public_tier_with_a_wrong_token_is_not_ready_and_says_why(split_home, engine):
    srv = spawn_server(split_home, {"SEG_ADAPTERS": ADAPTERS, "SEG_ENGINE_URL": engine.url,
                                    "SEG_ENGINE_TOKEN": "not-the-token"})
    try:
        reason = None
        deadline = time.monotonic() + 60
        while reason is None and time.monotonic() < deadline:
            try:
                ready = httpx.get(srv.url + "/readyz", timeout=5)
                if ready.status_code == 503 and "SEG_ENGINE_TOKEN" in ready.text:
                    reason = ready.json()["reason"]
            except httpx.HTTPError:
                time.sleep(0.5)
        assert reason, srv.logs()
        response = httpx.post(srv.url + "/segment", json={"image_base64": png_b64(3), "prompt": "cat"}, timeout=60)
        assert response.status_code == 503 and "SEG_ENGINE_TOKEN" in response.json()["error"]
        assert "refused this public tier" in srv.logs()
    finally:
        kill_tree(srv.process.pid)


def test_a_streamed_completion_across_the_tiers(public, engine, single):
    """The OpenAI-compatible API of a public tier streams from the engine served as deployed, over TCP with
    the token: the same answer as one server's /segment, in pieces; a stream cancelled midway frees the
    engine's slot."""
    import openai

    image = png_b64(21)
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
               {"type": "text", "text": "cat ; dog ; car ; bus"}]
    want = httpx.post(single.url + "/segment", json={"image_base64": image, "prompt": "cat ; dog ; car ; bus",
                                                     "model": "acme/lora-a"}, timeout=120).json()
    with openai.OpenAI(base_url=public.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        pieces, final = [], None
        for piece in client.chat.completions.create(model="acme/lora-a", stream=True,
                                                    messages=[{"role": "user", "content": content}]):
            if piece.choices and piece.choices[0].delta.content:
                pieces.append(piece.choices[0].delta.content)
            if piece.choices and piece.choices[0].finish_reason:
                final = piece.choices[0].delta.segmentation
        assert len(pieces) >= 5 and "".join(pieces) == want["text"]
        assert final == want

        finished = engine_gauges(engine)[2]
        stream = client.chat.completions.create(
            model="demo/paligemma2-tiny-random", stream=True, messages=[{"role": "user", "content": [
                content[0], {"type": "text", "text": "cat ; dog ; car ; bus ; person ; bird ; tree ; sky"}]}])
        for count, _ in enumerate(stream):
            if count == 3:
                break
        assert engine_gauges(engine)[:2] == (1.0, 1.0)  # its row is in the engine's running batch
        stream.close()
    deadline = time.monotonic() + 30
    while engine_gauges(engine)[:2] != (0.0, 0.0):
        assert time.monotonic() < deadline, engine_gauges(engine)
        time.sleep(0.1)
    assert engine_gauges(engine)[2] == finished  # it left without finishing


def engine_gauges(engine) -> tuple[float, float, float]:
    """The engine's running rows, requests in flight, and rows finished so far."""
    text = httpx.get(engine.url + "/metrics", timeout=10).text
    return tuple(float(re.search(rf"^{name} (\S+)$", text, re.M)[1]) for name in (
        "seg_engine_running_slots", "seg_engine_requests_in_flight", "seg_engine_steps_per_request_count"))
