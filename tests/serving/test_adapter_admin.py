"""The adapter routes' own checks (segmentation/serving/adapter_admin.py): names, bodies, `lora_path` confined
to SEG_ADAPTER_DIR (no `..`, no symbolic link or absolute path out), the manifest, the public tier's summary
of the replicas' answers, and the admin key apart from the API keys (guard.py, settings.py)."""

from __future__ import annotations

import asyncio
import functools
import os

import pytest

from segmentation.serving.adapter_admin import (
    MANIFEST,
    AdminError,
    check_body,
    check_name,
    confine,
    read_manifest,
    summarize,
    write_manifest,
)
from segmentation.serving.guard import RequestGuard
from segmentation.serving.settings import Settings


@pytest.fixture
def adapter_dir(tmp_path):
    root = tmp_path / "adapters"
    (root / "cats" / "v2").mkdir(parents=True)
    (root / "file.txt").write_text("not an adapter")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "out").symlink_to(outside, target_is_directory=True)  # a symbolic link out of the directory
    (root / "inside").symlink_to(root / "cats", target_is_directory=True)  # one that stays inside
    return root


def refusal(fn, *args) -> tuple[int, str]:
    with pytest.raises(AdminError) as caught:
        fn(*args)
    return caught.value.status, str(caught.value)


def test_relative_and_absolute_paths_inside_the_directory_resolve(adapter_dir):
    assert confine(adapter_dir, "cats") == (adapter_dir / "cats").resolve()
    assert confine(adapter_dir, "cats/v2") == (adapter_dir / "cats" / "v2").resolve()
    assert confine(adapter_dir, str(adapter_dir / "cats")) == (adapter_dir / "cats").resolve()
    assert confine(adapter_dir, "inside/v2") == (adapter_dir / "cats" / "v2").resolve()


@pytest.mark.parametrize(("path", "status", "words"), [
    ("../elsewhere", 400, "'..'"),
    ("cats/../../elsewhere", 400, "'..'"),
    ("out", 403, "outside the adapter directory"),
    ("/etc", 403, "outside the adapter directory"),
    ("missing", 400, "does not exist"),
    ("file.txt", 400, "not a directory"),
    (".", 400, "the adapter directory itself"),
])
def test_paths_out_of_the_directory_or_not_adapters_are_refused(adapter_dir, path, status, words):
    got, message = refusal(confine, adapter_dir, path)
    assert got == status and words in message
    assert str(adapter_dir.parent) not in message  # no server path in the answer


def test_an_absolute_path_elsewhere_is_refused_even_through_a_link(adapter_dir, tmp_path):
    status, _ = refusal(confine, adapter_dir, str(adapter_dir / "out"))
    assert status == 403


@pytest.mark.parametrize("name", ["acme/cats", "cats-v2.1", "a", "x" * 128])
def test_names_like_model_ids_are_accepted(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 129, "../cats", "acme//cats", "-cats", "cats v2", "cät", None, 3])
def test_other_names_are_refused(name):
    status, message = refusal(check_name, name)
    assert status == 400 and "lora_name" in message


def test_bodies_are_vllm_s_and_nothing_else():
    assert check_body({"lora_name": "a", "lora_path": "cats"}, load=True) == {
        "lora_name": "a", "lora_path": "cats", "base": None}
    assert check_body({"lora_name": "a"}, load=False) == {"lora_name": "a"}
    for body, load, words in [
        ([], True, "JSON object"),
        ({"lora_name": "a"}, True, "lora_path"),
        ({"lora_name": "a", "lora_path": ""}, True, "lora_path"),
        ({"lora_name": "a", "lora_path": 3}, True, "lora_path"),
        ({"lora_name": "a", "lora_path": "x", "lora_int_id": 1}, True, "unknown field 'lora_int_id'"),
        ({"lora_name": "a", "lora_path": "x"}, False, "unknown field 'lora_path'"),
    ]:
        status, message = refusal(functools.partial(check_body, body, load=load))
        assert status == 400 and words in message, (body, message)


def test_the_manifest_round_trips_and_a_broken_one_reads_as_empty(tmp_path):
    entries = [{"name": "acme/cats", "path": "cats/v2", "base": "demo/base"}]
    assert write_manifest(tmp_path, entries)
    assert read_manifest(tmp_path) == entries
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]  # the temporary file was renamed over it
    (tmp_path / MANIFEST).write_text("{not json")
    assert read_manifest(tmp_path) == []
    assert read_manifest(tmp_path / "nowhere") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_directory_keeps_no_manifest_and_says_so(tmp_path):
    tmp_path.chmod(0o555)
    try:
        assert not write_manifest(tmp_path, [])
    finally:
        tmp_path.chmod(0o755)


def test_the_summary_of_the_replicas_answers():
    ok = {"replica": "http://a", "status": 200, "base": "demo", "place": {"slot": 1}}
    ok2 = {**ok, "replica": "http://b", "place": {"slot": 2}}
    full = {"replica": "http://b", "status": 409, "error": "no free slot"}
    status, body = summarize("load", "cats", [ok, ok2])
    assert status == 200 and body["status"] == "loaded" and [r["slot"] for r in body["replicas"]] == [1, 2]
    assert summarize("load", "cats", [full]) == (409, "no free slot")
    status, message = summarize("load", "cats", [ok, full])
    assert status == 502 and "1 of 2" in message and "http://b: 409 no free slot" in message
    assert summarize("unload", "cats", [])[0] == 503


def test_settings_refuse_an_admin_key_that_is_an_api_key(monkeypatch, tmp_path):
    monkeypatch.setenv("SEG_RUNTIME_ADAPTERS", "true")
    monkeypatch.setenv("SEG_ADAPTER_DIR", str(tmp_path))
    monkeypatch.setenv("SEG_API_KEY", "k1,k2")
    monkeypatch.setenv("SEG_ADMIN_KEY", "k2")
    with pytest.raises(ValueError, match="SEG_ADMIN_KEY is also one of the API keys"):
        Settings.from_env()
    monkeypatch.setenv("SEG_ADMIN_KEY", "s3cret-admin")
    settings = Settings.from_env()
    assert settings.runtime_adapters and settings.admin_key == "s3cret-admin" and "s3cret" not in repr(settings)
    monkeypatch.delenv("SEG_ADAPTER_DIR")
    with pytest.raises(ValueError, match="SEG_ADAPTER_DIR"):
        Settings.from_env()


def call(guard: RequestGuard, path: str, key: str | None) -> int:
    statuses = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    headers.append((b"content-length", b"0"))
    guard.app = app
    asyncio.run(guard(
        {"type": "http", "path": path, "method": "POST", "headers": headers}, receive, send))
    return statuses[0]


def test_only_the_admin_key_opens_the_adapter_routes():
    guard = RequestGuard(None, api_keys=("api",), admin_key="admin",
                         admin_paths=frozenset({"/v1/load_lora_adapter"}))
    assert call(guard, "/v1/load_lora_adapter", "admin") == 200
    assert call(guard, "/v1/load_lora_adapter", "api") == 401  # an API key is no admin key
    assert call(guard, "/v1/load_lora_adapter", None) == 401
    assert call(guard, "/segment", "admin") == 401  # and the admin key is no API key
    assert call(guard, "/segment", "api") == 200
