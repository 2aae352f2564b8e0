"""LoRA adapters loaded and unloaded while a real `bentoml serve` serves (SEG_RUNTIME_ADAPTERS=true): vLLM's
routes and bodies behind the admin key, lora_path confined to SEG_ADAPTER_DIR, answers equal to the same
adapter attached at start (the shared adapter server), requests in flight kept to their end while an unload
refuses new ones (404), the slots' limits as clear 4xx, the manifest; and the routes absent when disabled."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import threading
import time

import httpx
import openai
import pytest
from answers import same_answer
from servers import DEMO_MODEL, kill_tree, start_server
from test_engine_paths import steps
from test_openai import LONG_PROMPT, collect, messages, png_b64
from test_serve_adapters import image_b64

API_KEY, ADMIN_KEY = "api-key-1", "admin-key-1"
API = {"authorization": f"Bearer {API_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, lora_adapters, tiny_fixtures):
    """SEG_ADAPTER_DIR: adapters a and b, one of rank 16 (the slots hold 8), one of another base's shapes,
    and a symbolic link out of the directory."""
    import torch
    from lora import write_random_adapter
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("runtime-adapters")
    shutil.copytree(lora_adapters["a"], root / "a")
    shutil.copytree(lora_adapters["b"], root / "team" / "b")
    write_random_adapter(tiny_fixtures / "paligemma", root / "rank16", seed=7, rank=16)
    shutil.copytree(lora_adapters["a"], root / "wide")
    tensors = load_file(root / "wide" / "adapter_model.safetensors")
    tensors = {k: torch.zeros(v.shape[0], v.shape[1] + 8) if ".lora_A." in k else v for k, v in tensors.items()}
    save_file(tensors, root / "wide" / "adapter_model.safetensors")
    (root / "out").symlink_to(lora_adapters["b"], target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def runtime_server(server_home, adapter_dir):
    srv = start_server(server_home, {"SEG_RUNTIME_ADAPTERS": "true", "SEG_ADAPTER_DIR": str(adapter_dir),
                                     "SEG_ADMIN_KEY": ADMIN_KEY, "SEG_API_KEY": API_KEY,
                                     "SEG_MAX_ADAPTERS": "2", "SEG_MAX_LORA_RANK": "8"})
    yield srv
    kill_tree(srv.process.pid)


def admin(url: str, route: str, body, headers=ADMIN, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/{route}_lora_adapter", json=body, headers=headers, timeout=120, **kwargs)


def adapter_metrics(url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(op, outcome): float(v) for op, outcome, v in re.findall(
        r'^seg_engine_adapter_operations_total\{operation="(\w+)",outcome="(\d+)"\} (\S+)$', text, re.M)}


def test_an_adapter_loads_serves_as_attached_at_start_and_unloads(runtime_server, adapter_server, adapter_dir):
    url = runtime_server.url
    loaded = admin(url, "load", {"lora_name": "live/a", "lora_path": "a"})
    assert loaded.status_code == 200, loaded.text
    body = loaded.json()
    assert body["object"] == "lora_adapter" and body["status"] == "loaded" and body["base"] == DEMO_MODEL
    assert [r["status"] for r in body["replicas"]] == [200] and body["replicas"][0]["slot"] == 1
    # /models and /v1/models list it with its base and directory, and the slots left.
    models = {m["id"]: m for m in httpx.post(url + "/models", json={}, headers=API, timeout=30).json()["models"]}
    assert models["live/a"]["base"] == DEMO_MODEL and models["live/a"]["root"] == "a"
    assert models[DEMO_MODEL]["lora_slots"] == {"slots": 2, "slot_rank": 8, "free": 1, "runtime_adapters": True}
    cards = {m["id"]: m for m in httpx.get(url + "/v1/models", headers=API, timeout=30).json()["data"]}
    assert cards["live/a"]["parent"] == DEMO_MODEL and cards["live/a"]["root"] == "a"
    assert json.loads((adapter_dir / ".seg-runtime-adapters.json").read_text())["adapters"] == [
        {"name": "live/a", "path": "a", "base": DEMO_MODEL}]

    # Base and adapter requests at once: the adapter's answers equal those of the same adapter attached at
    # start (the shared adapter server, acme/lora-a), the base's are the base's; no step through PEFT.
    bodies = [{"image_base64": image_b64(seed), "prompt": prompt, "model": model}
              for seed, prompt in ((0, "cat"), (1, "dog ; car")) for model in (DEMO_MODEL, "live/a")]
    before = steps(url)
    together = asyncio_post(url, bodies)
    stepped = {path: n - before[path] for path, n in steps(url).items()}
    assert [r.status_code for r in together] == [200] * len(bodies), [r.text[:300] for r in together]
    assert stepped["peft"] == 0 and stepped["fixed"] > 0, stepped
    for request, response in zip(bodies, together):
        reference = {**request, "model": "acme/lora-a" if request["model"] == "live/a" else DEMO_MODEL}
        expected = httpx.post(adapter_server.url + "/segment", json=reference, timeout=120).json()
        assert same_answer({**response.json(), "model": reference["model"]}, expected), request

    unloaded = admin(url, "unload", {"lora_name": "live/a"})
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded", unloaded.text
    gone = httpx.post(url + "/segment", json=bodies[1], headers=API, timeout=60)
    assert gone.status_code == 404 and 'unknown model "live/a"' in gone.json()["error"], gone.text
    chat = httpx.post(url + "/v1/chat/completions", headers=API, timeout=60, json={
        "model": "live/a", "messages": messages(image_b64(0), "cat")})
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
    assert "live/a" not in {m["id"] for m in httpx.get(url + "/v1/models", headers=API, timeout=30).json()["data"]}
    assert json.loads((adapter_dir / ".seg-runtime-adapters.json").read_text())["adapters"] == []
    counts = adapter_metrics(url)
    assert counts[("load", "200")] >= 1 and counts[("unload", "200")] >= 1


def asyncio_post(url: str, bodies: list[dict]) -> list[httpx.Response]:
    """Every body sent to /segment at once (with the API key)."""
    async def send():
        async with httpx.AsyncClient(timeout=300, headers=API) as client:
            return await asyncio.gather(*(client.post(url + "/segment", json=b) for b in bodies))

    return asyncio.run(send())


def test_a_request_in_flight_keeps_its_adapter_through_an_unload(runtime_server):
    url = runtime_server.url
    assert admin(url, "load", {"lora_name": "live/b", "lora_path": "team/b"}).status_code == 200
    with openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300) as client:
        request = dict(model="live/b", messages=messages(png_b64(6), LONG_PROMPT))
        alone = client.chat.completions.create(**request).choices[0].message.content
        stream = client.chat.completions.create(stream=True, **request)
        first = next(iter(stream))  # the request runs on the engine now
        answers: list[httpx.Response] = []
        unload = threading.Thread(target=lambda: answers.append(admin(url, "unload", {"lora_name": "live/b"})))
        unload.start()
        # New requests for the adapter are refused while the streamed one still decodes with it.
        deadline = time.monotonic() + 60
        while (refused := httpx.post(url + "/segment", headers=API, timeout=60, json={
                "image_base64": image_b64(1), "prompt": "cat", "model": "live/b"})).status_code != 404:
            assert refused.status_code == 200 and time.monotonic() < deadline, refused.text
            time.sleep(0.05)
        assert unload.is_alive()  # the unload waits for the request in flight
        rest = collect(stream)
        unload.join(120)
    assert (first.choices[0].delta.content or "") + "".join(rest["contents"]) == alone
    assert len(alone) > 100  # long enough to be cut by the unload, had it cut
    assert answers[0].status_code == 200, answers[0].text


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"lora_name": "x", "lora_path": "../a"}, 400, "'..'"),
    ({"lora_name": "x", "lora_path": "out"}, 403, "outside the adapter directory"),
    ({"lora_name": "x", "lora_path": "/etc"}, 403, "outside the adapter directory"),
    ({"lora_name": "x", "lora_path": "nothing"}, 400, "does not exist"),
    ({"lora_name": "x", "lora_path": "rank16"}, 400, "rank 16 exceeds the slot rank 8"),
    ({"lora_name": "x", "lora_path": "wide"}, 400, "not an adapter of this base"),
    ({"lora_name": "../x", "lora_path": "a"}, 400, "lora_name must be"),
    ({"lora_name": "x"}, 400, "lora_path"),
    ({"lora_name": "x", "lora_path": "a", "extra": 1}, 400, "unknown field 'extra'"),
    ({"lora_name": DEMO_MODEL, "lora_path": "a"}, 409, "already served"),
])
def test_refused_loads_say_why(runtime_server, body, status, words):
    response = admin(runtime_server.url, "load", body)
    assert response.status_code == status and words in response.json()["error"]["message"], response.text
    assert str(runtime_server.home) not in response.text


def test_keys_media_types_and_the_slots_limits(runtime_server, adapter_dir):
    url = runtime_server.url
    body = {"lora_name": "k/a", "lora_path": "a"}
    assert admin(url, "load", body, headers=API).status_code == 401  # an API key is no admin key
    assert admin(url, "load", body, headers={}).status_code == 401
    assert httpx.post(url + "/segment", headers=ADMIN, json={}, timeout=30).status_code == 401  # nor the reverse
    raw = httpx.post(url + "/v1/load_lora_adapter", headers=ADMIN, content=b"lora_name=x", timeout=30)
    assert raw.status_code == 415
    broken = httpx.post(url + "/v1/load_lora_adapter", headers={**ADMIN, "content-type": "application/json"},
                        content=b"{not json", timeout=30)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    assert httpx.get(url + "/v1/load_lora_adapter", headers=ADMIN, timeout=30).status_code == 405
    missing = admin(url, "unload", {"lora_name": "k/none"})
    assert missing.status_code == 404 and "no adapter 'k/none'" in missing.json()["error"]["message"]
    # Two slots: a third adapter waits for an unload (409), as does a name already loaded.
    assert admin(url, "load", body).status_code == 200
    assert admin(url, "load", {"lora_name": "k/b", "lora_path": "team/b"}).status_code == 200
    full = admin(url, "load", {"lora_name": "k/c", "lora_path": str(adapter_dir / "a")})
    assert full.status_code == 409 and "no free slot" in full.json()["error"]["message"], full.text
    assert admin(url, "load", body).status_code == 409
    for name in ("k/a", "k/b"):
        assert admin(url, "unload", {"lora_name": name}).status_code == 200
    counts = adapter_metrics(url)
    assert counts[("load", "409")] >= 1 and counts[("unload", "404")] >= 1


def test_without_runtime_adapters_the_routes_do_not_exist(server):
    response = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a"},
                          timeout=30)
    assert response.status_code == 404


def test_the_readme_s_commands_work(runtime_server, adapter_dir, lora_adapters):
    from servers import ROOT

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- readme-adapters -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    code = (block.replace("http://127.0.0.1:3000", runtime_server.url)
            .replace(".fixtures/tiny/my-lora", str(lora_adapters["a"])))
    env = {**os.environ, "SEG_ADAPTER_DIR": str(adapter_dir), "SEG_ADMIN_KEY": ADMIN_KEY, "SEG_API_KEY": API_KEY}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert '"status":"loaded"' in result.stdout and '"acme/my-lora"' in result.stdout
    assert '"status":"unloaded"' in result.stdout and '"objects"' in result.stdout


# --- two tiers: every replica, and a replica that starts later --------------------------------------------

TOKEN = "engine-token-for-runtime-adapters"
TIER_ENV = {"SEG_RUNTIME_ADAPTERS": "true", "SEG_ENGINE_TOKEN": TOKEN, "SEG_MAX_ADAPTERS": "2",
            "SEG_MAX_LORA_RANK": "8"}


def test_two_tiers_load_on_every_replica_and_a_later_replica_loads_the_same_set(
        server_home, tmp_path, lora_adapters):
    from servers import engine_as_deployed, free_port

    shared = tmp_path / "shared-adapters"  # the volume every engine replica mounts
    shutil.copytree(lora_adapters["a"], shared / "a")
    env = {**TIER_ENV, "SEG_ADAPTER_DIR": str(shared)}
    first = start_server(server_home, env, command=engine_as_deployed)
    later_port = free_port()
    servers = [first]
    try:
        public = start_server(server_home, {**env, "SEG_ADMIN_KEY": ADMIN_KEY, "SEG_API_WORKERS": "1",
                                            "SEG_ENGINE_URL": f"{first.url},http://127.0.0.1:{later_port}"})
        servers.append(public)
        # The second replica is not up: the load reaches one of two, and the answer says so.
        partial = admin(public.url, "load", {"lora_name": "tier/a", "lora_path": "a"})
        assert partial.status_code == 502, partial.text
        message = partial.json()["error"]["message"]
        assert "loaded on 1 of 2 engine replicas" in message and f"{first.url}: 200" in message
        # The engine's own route: its token first (EngineGate), like every engine route.
        assert httpx.post(first.url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "a"},
                          timeout=30).status_code == 401
        later = start_server(server_home, env, command=engine_as_deployed, port=later_port)
        servers.append(later)
        from segmentation.serving.trust import WIRE_VERSION

        described = httpx.post(later.url + "/describe", json={}, timeout=30, headers={
            "authorization": f"Bearer {TOKEN}", "x-seg-wire-version": WIRE_VERSION}).json()
        assert {m["id"]: m.get("root") for m in described}["tier/a"] == "a"  # loaded from the manifest at start
        body = {"image_base64": image_b64(4), "prompt": "cat", "model": "tier/a"}
        answers = [httpx.post(public.url + "/segment", json=body, timeout=120) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4 and len({a.json()["text"] for a in answers}) == 1
        unloaded = admin(public.url, "unload", {"lora_name": "tier/a"})
        assert unloaded.status_code == 200 and [r["status"] for r in unloaded.json()["replicas"]] == [200, 200]
        assert json.loads((shared / ".seg-runtime-adapters.json").read_text())["adapters"] == []
    finally:
        for srv in servers:
            kill_tree(srv.process.pid)


@pytest.mark.parametrize(("env", "words"), [
    ({"SEG_API_KEY": API_KEY}, "SEG_RUNTIME_ADAPTERS=true needs SEG_ADMIN_KEY"),
    ({"SEG_API_KEY": API_KEY, "SEG_ADMIN_KEY": API_KEY}, "SEG_ADMIN_KEY is also one of the API keys"),
])
def test_the_server_refuses_to_start_without_an_admin_key_of_its_own(server_home, tmp_path, env, words):
    from test_serve_adapters import serve_until_exit

    home = tmp_path / "home"
    shutil.copytree(server_home / "models", home / "models", symlinks=True)
    result = serve_until_exit(home, {"SEG_RUNTIME_ADAPTERS": "true", "SEG_ADAPTER_DIR": str(tmp_path), **env})
    assert result.returncode != 0 and words in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
