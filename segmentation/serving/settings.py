"""Service settings, read from environment variables when the service module is imported.

BentoML's own config overrides never reach `max_batch_size` / `max_latency_ms` (they are fixed when
the service class is decorated), so every setting comes from the environment: it works for
`bentoml serve`, a built bento and a container alike. Each variable, its default and its meaning
are listed in `ENV_DOCS` (and in the README).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_MODEL = "google/paligemma2-3b-mix-448"
VAE_TAG = "vae-oid"
ENGINES = ("auto", "graph", "fast", "hf-generate")
SCHEDULERS = ("auto", "steps", "batches")
PREFILL_ATTENTIONS = ("auto", "flex", "eager")  # segmentation/model/graph/prefill.py
DTYPES = ("auto", "float32", "bfloat16")

ENV_DOCS: dict[str, tuple[str, str]] = {
    "SEG_MODELS": (DEFAULT_MODEL, "comma-separated model ids to serve; the first is the default"),
    "SEG_ADAPTERS": ("", "comma-separated LoRA adapter ids to serve (imported with `import_models.py --adapter`); "
                         "each adapter's base must be in SEG_MODELS"),
    "SEG_MODEL_SOURCE": ("store", "`store`: models from the BentoML model store (baked into a bento); "
                                  "`hub`: download at start into the Hugging Face cache (HF_HOME)"),
    "SEG_VAE_TAG": (VAE_TAG, "BentoML model tag of the vae-oid.npz mask decoder"),
    "SEG_MAX_BATCH_SIZE": ("16", "largest batch the engine runs (the running batch's slots with step-level "
                                 "batching)"),
    "SEG_MAX_LATENCY_MS": ("20000", "longest a request may wait for a slot (step-level batching) or for and in "
                                    "its batch (adaptive batches) before it is shed with 503, ms"),
    "SEG_DEVICE": ("auto", "`auto` (GPU when present), `cuda`, `cuda:N` or `cpu`"),
    "SEG_MAX_NEW_TOKENS": ("512", "ceiling on generated tokens per image"),
    "SEG_OBJECTS_PER_CLASS": ("5", "objects per class the token budget leaves room for"),
    "SEG_CONSTRAINED": ("true", "grammar-constrained decoding (well-formed objects only)"),
    "SEG_ENGINE": ("auto", "`graph`: a fixed-shape decode step over a static KV cache with the grammar on the device, "
                           "one CUDA graph per batch bucket on GPUs; `fast`: the engine's own eager loop; "
                           "`hf-generate`: transformers' `generate` (the same tokens, slowest); `auto`: `graph`"),
    "SEG_SCHEDULER": ("auto", "`steps`: requests join and leave the running batch between decode steps (graph engine); "
                              "`batches`: BentoML's adaptive batches, each run to its longest row; `auto`: `steps` "
                              "with the graph engine"),
    "SEG_GRAPH_BUCKETS": ("", "batch sizes the graph engine keeps a step (a CUDA graph) for, comma-separated; "
                              "default: 1, 2, 4, … up to SEG_MAX_BATCH_SIZE (the largest is the number of slots)"),
    "SEG_SYNC_EVERY": ("", "graph engine: decode steps between the host's checks for finished rows "
                           "(default 1 on CPUs, 8 on GPUs)"),
    "SEG_GRAPH_PROMPT_TOKENS": ("128", "graph engine: prompt text tokens its cache holds beside the image "
                                      "(longer prompts run the `fast` loop)"),
    "SEG_REQUIRE_GRAPHS": ("false", "graph engine: capture a CUDA graph for every bucket or stop the server at "
                                    "start with the reason (also on CPUs, where capture fails); `false`: a bucket "
                                    "whose capture failed is logged and steps eagerly "
                                    "(`seg_engine_steps_total{path=\"fixed\"}`)"),
    "SEG_PREFILL_ATTENTION": ("auto", "graph engine: the prefill's attention kernel: `flex` (compiled flex_attention "
                                      "with a soft-capping score modifier and a block mask per shape bucket), "
                                      "`eager` (the grouped eager kernel), `auto`: `flex` on GPUs, `eager` on CPUs "
                                      "(faster there); where flex does not compile the engine uses `eager` and "
                                      "/models says why"),
    "SEG_MAX_ADAPTERS": ("8", "graph engine: most LoRA adapters held in the decode step's stacked weights (a slot "
                              "each; base rows use a zero slot); further adapters step through PEFT's hooks"),
    "SEG_MAX_LORA_RANK": ("16", "graph engine: highest adapter rank the stacked weights hold (the slots take the "
                                "highest attached rank, lower ones padded); higher ranks step through PEFT's hooks"),
    "SEG_RUNTIME_ADAPTERS": ("false", "graph engine: LoRA adapters loaded and unloaded while serving "
                                      "(`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`, vLLM's routes and "
                                      "bodies) into the SEG_MAX_ADAPTERS slots of rank SEG_MAX_LORA_RANK, reserved at "
                                      "start; needs SEG_ADAPTER_DIR and SEG_ADMIN_KEY"),
    "SEG_ADAPTER_DIR": ("", "the only directory `lora_path` may name (relative names resolve inside it; `..`, "
                            "and symbolic links or absolute paths that lead outside it, are refused); the "
                            "engines keep the loaded set in `.seg-runtime-adapters.json` there and load it when "
                            "they start"),
    "SEG_ADMIN_KEY": ("", "the key of the adapter routes (`Authorization: Bearer <key>`); API keys do not open "
                          "them, and it may not be one of them"),
    "SEG_ADMIN_KEY_FILE": ("", "file holding SEG_ADMIN_KEY (a mounted secret)"),
    "SEG_BATCH_INVARIANT": ("false", "batch-invariant kernels on GPUs (and one padded prompt length): a request's "
                                     "answer is the same bits in any batch; opt-in (H200: decode step x1.0 at 16 "
                                     "rows, x1.29 alone) (docs/batch-invariance.md)"),
    "SEG_SHARE_IMAGES": ("true", "run the vision tower once per distinct picture of a batch (`fast` engine)"),
    "SEG_DTYPE": ("auto", "model weights: `auto` (bfloat16 on GPUs; on CPUs bfloat16 only with native bfloat16, AMX "
                          "or AVX-512 BF16, where the graph engine keeps batched ≡ solo; float32 elsewhere), "
                          "`float32`, or `bfloat16` (different answers from float32; slower on CPUs without native "
                          "bfloat16) (/models says which and why)"),
    "SEG_MAX_IMAGE_BYTES": (str(20 * 1024 * 1024), "largest accepted image upload or download, bytes"),
    "SEG_MAX_PIXELS": ("40000000", "largest accepted image, pixels (decompression-bomb guard)"),
    "SEG_MAX_PROMPT_CHARS": ("1000", "longest accepted prompt"),
    "SEG_MAX_CLASSES": ("32", "most classes per prompt"),
    "SEG_MAX_BATCH_IMAGES": ("16", "most images in one /segment_batch request"),
    "SEG_URL_ALLOWLIST": ("", "comma-separated hosts, IPs or CIDR networks that image_url may reach "
                              "even though they are private or loopback"),
    "SEG_FETCH_TIMEOUT_S": ("10", "connect and read timeout for image_url downloads, seconds"),
    "SEG_REQUEST_TIMEOUT_S": ("300", "longest a request may take before the server answers 504"),
    "SEG_MAX_CONCURRENCY": ("64", "requests handled at once; more are answered 429 at once. BentoML gives each "
                                  "public worker ceil(N / SEG_API_WORKERS) of them and connections do not spread "
                                  "evenly over workers, so 429s can start below N"),
    "SEG_API_KEY": ("", "comma-separated API keys; when set, API routes need `Authorization: Bearer <key>`"),
    "SEG_API_KEY_FILE": ("", "file holding the API keys (a mounted secret), one per line or comma-separated"),
    "SEG_METRICS_PUBLIC": ("true", "serve /metrics without an API key"),
    "SEG_ENGINE_URL": ("", "serve the public tier only, against engine tiers served alone (`bentoml serve "
                           "service:SegmentationEngine`): comma-separated `http://host:port` URLs; a host name "
                           "stands for every address it resolves to (a headless Kubernetes Service). Empty: "
                           "the engine runs in this server"),
    "SEG_ENGINE_TOKEN": ("", "shared secret between the public tier and the engine: the engine refuses every "
                             "request without `Authorization: Bearer <token>` (401) except probes and metrics; "
                             "the public tier sends it. Needed by an engine served alone on a non-loopback address"),
    "SEG_ENGINE_TOKEN_FILE": ("", "file holding SEG_ENGINE_TOKEN (a mounted secret)"),
    "SEG_ENGINE_INSECURE": ("false", "let an engine served alone listen on a non-loopback address without a token "
                                     "(only where the network itself keeps strangers out)"),
    "SEG_ENGINE_MAX_IN_FLIGHT": ("", "requests one engine replica may hold open from one public worker before "
                                     "it answers 503 at once (default: 2 x SEG_MAX_BATCH_SIZE)"),
    "SEG_DEBUG_MODULES": ("false", "answer `GET /debug/modules` (this worker's imported modules; for tests)"),
    "SEG_API_WORKERS": ("", "worker processes of the public service (default: half the machine's cores, "
                            "1 to 8)"),
}


def _env(name: str) -> str:
    return os.environ.get(name, ENV_DOCS[name][0]).strip()


def _flag(name: str) -> bool:
    return _env(name).lower() in ("1", "true", "yes", "on")


def model_tag(model_id: str) -> str:
    """The BentoML model-store name of a model id: `google/paligemma2-3b-mix-448` -> `paligemma2-3b-mix-448`."""
    name = model_id.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9_.-]", "-", name).strip("-_.")
    if not name:
        raise ValueError(f"cannot make a model tag from {model_id!r}")
    return name


def adapter_tag(adapter_id: str) -> str:
    """The BentoML model-store name of a LoRA adapter id: `acme/cat-lora` -> `lora-cat-lora`.

    The `lora-` prefix keeps adapters apart from models whose ids end alike.
    """
    return "lora-" + model_tag(adapter_id)


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    adapters: tuple[str, ...] = field(default_factory=tuple)
    model_source: str = "store"
    vae_tag: str = VAE_TAG
    max_batch_size: int = 16
    max_latency_ms: int = 20000
    device: str = "auto"
    max_new_tokens: int = 512
    objects_per_class: int = 5
    constrained: bool = True
    engine: str = "graph"
    scheduler: str = "steps"
    graph_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    sync_every: int | None = None
    graph_prompt_tokens: int = 128
    require_graphs: bool = False
    prefill_attention: str = "auto"
    max_adapters: int = 8
    max_lora_rank: int = 16
    runtime_adapters: bool = False
    adapter_dir: Path | None = None
    admin_key: str | None = field(default=None, repr=False)
    batch_invariant: bool = False
    share_images: bool = True
    dtype: str = "auto"
    max_image_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_prompt_chars: int = 1000
    max_classes: int = 32
    max_batch_images: int = 16
    url_allowlist: tuple[str, ...] = field(default_factory=tuple)
    fetch_timeout_s: float = 10.0
    request_timeout_s: float = 300.0
    max_concurrency: int = 64
    api_keys: tuple[str, ...] = field(default_factory=tuple, repr=False)
    metrics_public: bool = True
    engine_urls: tuple[str, ...] = field(default_factory=tuple)
    engine_max_in_flight: int = 32
    engine_token: str | None = field(default=None, repr=False)
    engine_insecure: bool = False
    api_workers: int = 1
    debug_modules: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        models = tuple(m.strip() for m in _env("SEG_MODELS").split(",") if m.strip())
        if not models:
            raise ValueError("SEG_MODELS names no model")
        source = _env("SEG_MODEL_SOURCE").lower()
        if source not in ("store", "hub"):
            raise ValueError(f"SEG_MODEL_SOURCE must be 'store' or 'hub', not {source!r}")
        adapters = tuple(a.strip() for a in _env("SEG_ADAPTERS").split(",") if a.strip())
        if set(adapters) & set(models):
            raise ValueError(f"SEG_ADAPTERS and SEG_MODELS share ids: {sorted(set(adapters) & set(models))}")
        engine, dtype = _env("SEG_ENGINE").lower(), _env("SEG_DTYPE").lower()
        if engine not in ENGINES:
            raise ValueError(f"SEG_ENGINE must be one of {', '.join(ENGINES)}, not {engine!r}")
        engine = "graph" if engine == "auto" else engine
        scheduler = _env("SEG_SCHEDULER").lower()
        if scheduler not in SCHEDULERS:
            raise ValueError(f"SEG_SCHEDULER must be one of {', '.join(SCHEDULERS)}, not {scheduler!r}")
        if scheduler == "steps" and engine != "graph":
            raise ValueError(f"SEG_SCHEDULER=steps needs SEG_ENGINE=graph (it is {engine!r})")
        scheduler = ("steps" if engine == "graph" else "batches") if scheduler == "auto" else scheduler
        max_batch_size = int(_env("SEG_MAX_BATCH_SIZE"))
        buckets = _env("SEG_GRAPH_BUCKETS")
        try:
            graph_buckets = tuple(sorted({int(b) for b in buckets.split(",") if b.strip()})) if buckets else \
                tuple(2**i for i in range(max_batch_size.bit_length()) if 2**i < max_batch_size) + (max_batch_size,)
        except ValueError:
            raise ValueError(f"SEG_GRAPH_BUCKETS must be comma-separated batch sizes, not {buckets!r}") from None
        if not graph_buckets or graph_buckets[0] < 1:
            raise ValueError(f"SEG_GRAPH_BUCKETS must name batch sizes of 1 or more, not {buckets!r}")
        if dtype not in DTYPES:
            raise ValueError(f"SEG_DTYPE must be one of {', '.join(DTYPES)}, not {dtype!r}")
        prefill_attention = _env("SEG_PREFILL_ATTENTION").lower()
        if prefill_attention not in PREFILL_ATTENTIONS:
            raise ValueError(f"SEG_PREFILL_ATTENTION must be one of {', '.join(PREFILL_ATTENTIONS)}, "
                             f"not {prefill_attention!r}")
        max_adapters, max_lora_rank = int(_env("SEG_MAX_ADAPTERS")), int(_env("SEG_MAX_LORA_RANK"))
        if max_adapters < 1 or max_lora_rank < 1:
            raise ValueError(f"SEG_MAX_ADAPTERS and SEG_MAX_LORA_RANK must be 1 or more, not {max_adapters} and "
                             f"{max_lora_rank}")
        runtime_adapters, admin_key = _flag("SEG_RUNTIME_ADAPTERS"), read_secret("SEG_ADMIN_KEY", "SEG_ADMIN_KEY_FILE")
        api_keys = tuple(k for k in re.split(r"[,\s]+", read_secret("SEG_API_KEY", "SEG_API_KEY_FILE") or "") if k)
        adapter_dir = Path(_env("SEG_ADAPTER_DIR")) if _env("SEG_ADAPTER_DIR") else None
        if runtime_adapters and engine != "graph":
            raise ValueError(f"SEG_RUNTIME_ADAPTERS=true needs SEG_ENGINE=graph (it is {engine!r}): adapters load "
                             "into the graph engine's stacked weights")
        if runtime_adapters and adapter_dir is None:
            raise ValueError("SEG_RUNTIME_ADAPTERS=true needs SEG_ADAPTER_DIR, the directory adapters may be "
                             "loaded from")
        if admin_key and admin_key in api_keys:
            raise ValueError("SEG_ADMIN_KEY is also one of the API keys (SEG_API_KEY): give the adapter routes a "
                             "key of their own")
        return cls(
            models=models,
            adapters=adapters,
            model_source=source,
            vae_tag=_env("SEG_VAE_TAG"),
            max_batch_size=max_batch_size,
            max_latency_ms=int(_env("SEG_MAX_LATENCY_MS")),
            device=_env("SEG_DEVICE").lower(),
            max_new_tokens=int(_env("SEG_MAX_NEW_TOKENS")),
            objects_per_class=int(_env("SEG_OBJECTS_PER_CLASS")),
            constrained=_flag("SEG_CONSTRAINED"),
            engine=engine,
            scheduler=scheduler,
            graph_buckets=graph_buckets,
            sync_every=int(_env("SEG_SYNC_EVERY")) if _env("SEG_SYNC_EVERY") else None,
            graph_prompt_tokens=int(_env("SEG_GRAPH_PROMPT_TOKENS")),
            require_graphs=_flag("SEG_REQUIRE_GRAPHS"),
            prefill_attention=prefill_attention,
            max_adapters=max_adapters,
            max_lora_rank=max_lora_rank,
            runtime_adapters=runtime_adapters,
            adapter_dir=adapter_dir,
            admin_key=admin_key,
            batch_invariant=_flag("SEG_BATCH_INVARIANT"),
            share_images=_flag("SEG_SHARE_IMAGES"),
            dtype=dtype,
            max_image_bytes=int(_env("SEG_MAX_IMAGE_BYTES")),
            max_pixels=int(_env("SEG_MAX_PIXELS")),
            max_prompt_chars=int(_env("SEG_MAX_PROMPT_CHARS")),
            max_classes=int(_env("SEG_MAX_CLASSES")),
            max_batch_images=int(_env("SEG_MAX_BATCH_IMAGES")),
            url_allowlist=tuple(h.strip() for h in _env("SEG_URL_ALLOWLIST").split(",") if h.strip()),
            fetch_timeout_s=float(_env("SEG_FETCH_TIMEOUT_S")),
            request_timeout_s=float(_env("SEG_REQUEST_TIMEOUT_S")),
            max_concurrency=int(_env("SEG_MAX_CONCURRENCY")),
            api_keys=api_keys,
            metrics_public=_flag("SEG_METRICS_PUBLIC"),
            engine_urls=tuple(parse_engine_urls(_env("SEG_ENGINE_URL"))),
            engine_token=read_secret("SEG_ENGINE_TOKEN", "SEG_ENGINE_TOKEN_FILE"),
            engine_insecure=_flag("SEG_ENGINE_INSECURE"),
            engine_max_in_flight=int(_env("SEG_ENGINE_MAX_IN_FLIGHT") or 2 * int(_env("SEG_MAX_BATCH_SIZE"))),
            debug_modules=_flag("SEG_DEBUG_MODULES"),
            api_workers=int(_env("SEG_API_WORKERS") or default_api_workers()),
        )

    def engine_max_body_bytes(self) -> int:
        """The largest body the engine reads: a batch of items, each a model-input picture of at most
        1024 px a side as base64 PPM (bento.py MAX_ITEM_SIDE), and 64 KiB for the rest."""
        return self.max_batch_size * ((1024 * 1024 * 3 + 64) * 4 // 3 + 4 + 64 * 1024) + 64 * 1024

    def max_body_bytes(self, images: int = 1) -> int:
        """The largest request body for `images` images: each one's base64 (4/3 of its bytes, and room for
        a data: URL prefix) with 64 KiB for its other fields (prompt, URL and model at their longest,
        even escaped), and 64 KiB for the rest: a body the schema allows is never over the cap."""
        return images * (4 * -(-self.max_image_bytes // 3) + 256 + 64 * 1024) + 64 * 1024

    @property
    def torch_device(self) -> str | None:
        """None lets the engine pick (GPU when present)."""
        return None if self.device == "auto" else self.device


def default_api_workers() -> int:
    """Half the cores this process may run on (the engine and the event loops need the rest), 1 to 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) // 2))


def parse_engine_urls(value: str) -> list[str]:
    """`SEG_ENGINE_URL`: comma-separated `http(s)://host:port` URLs; ValueError says what is wrong."""
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise ValueError(f"SEG_ENGINE_URL entries must look like http://host:port, not {url}")
    return urls


def read_secret(value_env: str, file_env: str) -> str | None:
    """A secret from `value_env`, or from the file named by `file_env` (a mounted Kubernetes secret)."""
    value = os.environ.get(value_env, "").strip()
    path = os.environ.get(file_env, "").strip()
    if not value and path:
        value = Path(path).read_text().strip()
    return value or None
