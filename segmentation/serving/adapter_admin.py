"""LoRA adapters loaded and unloaded while serving (`SEG_RUNTIME_ADAPTERS=true`): vLLM's routes and bodies.

    POST /v1/load_lora_adapter    {"lora_name": "acme/cats", "lora_path": "cats-v2"}   (optional "base")
    POST /v1/unload_lora_adapter  {"lora_name": "acme/cats"}

The public tier (openai_api.py) checks the admin key (guard.py: `SEG_ADMIN_KEY`, never an API key) and the
body's shape, then sends the same body to every engine replica it knows (`POST /load_lora_adapter`,
`/unload_lora_adapter` with the engine token, trust.py) and reports each replica's answer. Each engine trusts
nobody and checks everything again here:

- `lora_name`: 1 to 128 characters of letters, digits and `._/-`, starting with a letter or digit, without
  `..` or `//` (it is a model id in `model` afterwards): else 400;
- `lora_path`: inside `SEG_ADAPTER_DIR` (`confine`): a relative name resolves inside it, an absolute path must
  resolve inside it; `..` is refused (400), a path that resolves outside (a symbolic link out, an absolute
  path elsewhere) is 403, a path that is missing or not a directory 400;
- the adapter itself against the loaded base (model/adapters.py `check_runtime_adapter`): 400 with the reason;
- a name already served (a model, an adapter) or still unloading: 409; no free slot: 409; an unknown name
  to unload: 404; an adapter attached at start (SEG_ADAPTERS): 409.

The engine answers its own routes 200 with the outcome inside (`{"status": 200, ...}` or `{"status": 4xx,
"error": ...}`), like its predictions, so the public tier can report every replica.

**Later replicas.** Every engine keeps the set it loaded at runtime in `SEG_ADAPTER_DIR/.seg-runtime-adapters.json`
(the manifest: `{"version": 1, "adapters": [{"name", "path", "base"}]}`, `path` relative to the directory)
and loads it when it starts, before it reports ready. Engines that share the directory (a volume mounted in
every replica) therefore start with the set loaded so far, whatever public tier was up then; the manifest
is rewritten atomically after every load and unload. A manifest entry that no longer loads is logged and
skipped (the engine still starts).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = ".seg-runtime-adapters.json"
# The public tier's adapter routes: only the admin key opens them (guard.py).
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
MANIFEST_VERSION = 1
MAX_NAME_CHARS = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")
MAX_PATH_CHARS = 1024


class AdminError(Exception):
    """A refused adapter operation: the HTTP status and a message fit for the admin (no server paths)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_name(value) -> str:
    """The adapter's name (`lora_name`) as clients will name it in `model`; AdminError(400) otherwise."""
    if not isinstance(value, str) or not value:
        raise AdminError("lora_name must be a non-empty string")
    if len(value) > MAX_NAME_CHARS or not _NAME.fullmatch(value) or ".." in value or "//" in value:
        raise AdminError(f"lora_name must be 1 to {MAX_NAME_CHARS} letters, digits and '._/-', starting with a "
                         "letter or digit, without '..' or '//'")
    return value


def check_body(body, *, load: bool) -> dict:
    """vLLM's body, checked for shape: `{"lora_name", "lora_path"}` to load (optional `base`: the served model
    it adapts, default the first), `{"lora_name"}` to unload. Unknown fields are refused (a typo is no
    silent default). Returns the fields; AdminError(400) says what is wrong."""
    if not isinstance(body, dict):
        raise AdminError("the body must be a JSON object")
    allowed = {"lora_name", "lora_path", "base"} if load else {"lora_name"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise AdminError(f"unknown field {unknown[0]!r}; accepted: {', '.join(sorted(allowed))}")
    fields = {"lora_name": check_name(body.get("lora_name"))}
    if load:
        path = body.get("lora_path")
        if not isinstance(path, str) or not path.strip() or len(path) > MAX_PATH_CHARS or "\x00" in path:
            raise AdminError(f"lora_path must be a non-empty path of at most {MAX_PATH_CHARS} characters")
        fields["lora_path"] = path
        base = body.get("base")
        if base is not None and (not isinstance(base, str) or not base):
            raise AdminError("base must be the id of a served model")
        fields["base"] = base
    return fields


def confine(root: Path, lora_path: str) -> Path:
    """The adapter directory `lora_path` names inside `root` (SEG_ADAPTER_DIR), resolved (symbolic links
    followed). AdminError: `..` anywhere (400), a path that resolves outside `root` (403), missing or not a
    directory (400)."""
    if ".." in Path(lora_path).parts:
        raise AdminError("lora_path may not contain '..'")
    top = root.resolve()
    candidate = Path(lora_path) if Path(lora_path).is_absolute() else top / lora_path
    resolved = candidate.resolve()
    if resolved != top and not resolved.is_relative_to(top):
        raise AdminError("lora_path resolves outside the adapter directory (SEG_ADAPTER_DIR): an absolute path "
                         "elsewhere or a symbolic link out", 403)
    if resolved == top:
        raise AdminError("lora_path names the adapter directory itself, not an adapter inside it")
    if not resolved.exists():
        raise AdminError(f"lora_path {lora_path!r} does not exist in the adapter directory")
    if not resolved.is_dir():
        raise AdminError(f"lora_path {lora_path!r} is not a directory (an adapter is a directory holding "
                         "adapter_config.json and adapter_model.safetensors)")
    return resolved


def admin_key_problem(settings) -> str | None:
    """Why the public tier must not start with these settings (runtime adapters without an admin key)."""
    if settings.runtime_adapters and not settings.admin_key:
        return ("SEG_RUNTIME_ADAPTERS=true needs SEG_ADMIN_KEY (or SEG_ADMIN_KEY_FILE): the key of the adapter "
                "routes, distinct from the API keys")
    return None


def checked_adapter_dir(path: Path) -> Path:
    """SEG_ADAPTER_DIR, which must be a directory (the engine refuses to start otherwise)."""
    if not path.is_dir():
        raise ValueError(f"SEG_ADAPTER_DIR {path} is not a directory")
    return path


def read_manifest(root: Path) -> list[dict]:
    """The manifest's entries (`name`, `path` relative to `root`, `base`); none when there is no manifest.
    A manifest that does not parse is logged and read as empty."""
    path = root / MANIFEST
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        entries = data["adapters"]
        return [{"name": str(e["name"]), "path": str(e["path"]), "base": e.get("base")} for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.error("the runtime adapter manifest %s is unreadable (%s): no adapter is loaded from it", path, exc)
        return []


def write_manifest(root: Path, entries: list[dict]) -> bool:
    """Replace the manifest atomically (a temporary file renamed over it); False (logged) when the directory
    is not writable: the adapters stay loaded here, later replicas will not know them."""
    path = root / MANIFEST
    temporary = root / f".{MANIFEST}.{os.getpid()}.tmp"
    try:
        temporary.write_text(json.dumps({"version": MANIFEST_VERSION, "adapters": entries}, indent=1))
        os.replace(temporary, path)
    except OSError as exc:
        logger.warning("cannot write the runtime adapter manifest %s (%s): engines started later will not load "
                       "the adapters loaded now", path, exc)
        return False
    return True


class RuntimeAdapters:
    """The engine's side: loads and unloads through the pool (`ModelPool.load_adapter`, `unload_adapter`),
    keeps the manifest, counts outcomes (`on_outcome(operation, status)`, metrics)."""

    def __init__(self, pool, root: Path, on_outcome=None) -> None:
        self.pool = pool
        self.root = root
        self.on_outcome = on_outcome or (lambda operation, status: None)

    async def load(self, body: dict) -> dict:
        return await self._answer("load", self._load(body))

    async def unload(self, body: dict) -> dict:
        return await self._answer("unload", self._unload(body))

    async def _answer(self, operation: str, work) -> dict:
        try:
            answer = await work
        except AdminError as exc:
            answer = {"status": exc.status, "error": str(exc)}
        except Exception:  # an adapter that passed the checks and still failed: the engine's fault, logged
            logger.exception("adapter %s failed", operation)
            answer = {"status": 500, "error": f"the engine failed to {operation} the adapter (its log says why)"}
        self.on_outcome(operation, answer["status"])
        return answer

    async def _load(self, body: dict) -> dict:
        fields = check_body(body, load=True)
        name = fields["lora_name"]
        directory = confine(self.root, fields["lora_path"])
        place = await self.pool.load_adapter(name, directory, base=fields["base"], label=fields["lora_path"],
                                             root=str(directory.relative_to(self.root.resolve())))
        persisted = self._save()
        return {"status": 200, "lora_name": name, "base": self.pool.adapters[name], "place": place,
                "persisted": persisted}

    async def _unload(self, body: dict) -> dict:
        name = check_body(body, load=False)["lora_name"]
        base = await self.pool.unload_adapter(name)
        persisted = self._save()
        return {"status": 200, "lora_name": name, "base": base, "persisted": persisted}

    def _save(self) -> bool:
        return write_manifest(self.root, [{"name": name, "path": path, "base": self.pool.adapters[name]}
                                          for name, path in self.pool.roots.items()])

    def restore(self, load) -> list[str]:
        """Load the manifest's adapters with `load(name, directory, base, label, root)` (synchronous: at
        start, on the engine's thread, before requests come); returns the names loaded. An entry that no
        longer loads is logged and skipped."""
        loaded = []
        for entry in read_manifest(self.root):
            try:
                check_name(entry["name"])
                directory = confine(self.root, entry["path"])
                load(entry["name"], directory, entry["base"], entry["path"],
                     str(directory.relative_to(self.root.resolve())))
            except Exception as exc:  # one bad entry must not keep the engine from starting
                logger.error("runtime adapter %s from the manifest not loaded: %s", entry["name"], exc)
                continue
            loaded.append(entry["name"])
        if loaded:
            logger.info("loaded %d runtime adapters from %s: %s", len(loaded), MANIFEST, ", ".join(loaded))
        return loaded


def summarize(operation: str, name: str, reports: list[dict]) -> tuple[int, dict | str]:
    """The public tier's answer to a load or unload sent to every replica (`RemoteEngines.broadcast`):
    (200, `{"object": "lora_adapter", "id", "status": "loaded"|"unloaded", "base", "replicas": [...]}`) when
    every replica did it; the replicas' own status and message when they all refused alike (one replica: its
    answer); else 502 and a message naming each replica's outcome (some did it, some not: the admin retries or
    unloads, the manifest holds what the last replica wrote)."""
    done = "loaded" if operation == "load" else "unloaded"
    brief = [{"replica": r["replica"], "status": r["status"], **({"error": r["error"]} if "error" in r else {}),
              **({"slot": r["place"].get("slot")} if isinstance(r.get("place"), dict) else {})} for r in reports]
    if not reports:
        return 503, "no engine replica is known to this tier; retry when one is ready"
    if all(r["status"] == 200 for r in reports):
        return 200, {"object": "lora_adapter", "id": name, "status": done, "base": reports[0].get("base"),
                     "replicas": brief}
    failed = [r for r in reports if r["status"] != 200]
    if len(failed) == len(reports) and len({(r["status"], r.get("error")) for r in failed}) == 1:
        return failed[0]["status"], failed[0].get("error") or f"the adapter was not {done}"
    outcomes = "; ".join(f"{r['replica']}: {r['status']}{' ' + r['error'] if 'error' in r else ''}" for r in reports)
    return 502, f"{name!r} was {done} on {len(reports) - len(failed)} of {len(reports)} engine replicas ({outcomes})"
