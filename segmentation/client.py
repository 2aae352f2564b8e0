"""A Python client for a running segmentation server that answers what the library answers.

    from segmentation.client import RemoteSegmenter
    with RemoteSegmenter("http://127.0.0.1:3000") as segmenter:
        [result] = segmenter.segment(["docs/example.png"], "cat ; car")
    for obj in result.objects:
        print(obj.label, obj.score, obj.box, obj.mask.shape)   # mask: bool [H, W]

`RemoteSegmenter.segment()` / `detect()` take the arguments of `Segmenter.segment()` / `detect()`
(`labels_from_prompt` included) and return the same `SegmentationResult` / `DetectedObject` types,
with masks decoded to numpy booleans (`mask64`, the decoder's raw output, stays on the server: it is
None here). Images may be PIL images, paths or encoded bytes. `AsyncRemoteSegmenter` is the asyncio
twin for concurrent use.

`encode(mask, label, box=None)` is `segmentation.encoder.encode_object` done by the server's VAE: a
mask (bool/uint8 numpy `[H, W]`, a COCO RLE dict, or a mask image as path/bytes/PIL) and its label to
PaliGemma's training text `<loc…>×4<seg…>×16 label`; `encoding()` returns the server's whole answer
(`{"text", "locs", "codes", "label", "height", "width"}`).

Predictions are pure, so a request is retried with exponential backoff when the server sheds load
(429, 502, 503) or the connection drops; a 4xx raises `RequestRejected` carrying the server's message.
A client's first call that finds no server at its URL (connection refused, unknown host) raises
`ServerUnreachable` at once, without retries; `check_server(url)` asks the same before any work.

Needs only numpy, pillow, httpx and pycocotools (`pip install "paligemma-segmentation[client]"`):
importing this module loads no torch, JAX or BentoML.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from .model.results import DetectedObject, SegmentationResult

ImageInput = Image.Image | str | Path | bytes
Task = Literal["segment", "detect"]
Images = ImageInput | Sequence[ImageInput]  # one image, or several
Prompts = Sequence[str] | str  # one prompt per image, or one for all

RETRY_STATUSES = frozenset({429, 502, 503})
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RETRIES = 6
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
DEFAULT_CONCURRENCY = 8


class RemoteError(Exception):
    """A request the server did not answer with a result. `status` is None for a lost connection."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.message = message
        self.status = status


class RequestRejected(RemoteError):
    """The server refused the request (4xx); `message` is the server's own explanation."""


class ServerUnavailable(RemoteError):
    """The server stayed overloaded, failed (5xx) or unreachable after every retry."""


START_HINT = ("start one with `make demo` (the demo model) or `make serve` in the project's folder, "
              "or give the URL of a running server")


class ServerUnreachable(ServerUnavailable):
    """Nothing answers at `url` (connection refused, unknown host, no answer in time): raised by
    `check_server` and by a client's first call, at once. Later calls of a client that has reached its
    server retry lost connections instead (a restarting server)."""

    def __init__(self, url: str, reason: str, hint: str = START_HINT):
        super().__init__(f"no server answering at {url} ({reason}): {hint}")
        self.url = url
        self.reason = reason


def _reason(exc: Exception) -> str:
    """The innermost OS error's words (`Connection refused`, `Name or service not known`), else the
    error's own text or kind (the sync and async transports word the same failure differently)."""
    cause, seen, found = exc, set(), None
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno is not None:
            found = cause
        cause = cause.__cause__ or cause.__context__
    if found is not None:
        return os.strerror(found.errno) if found.errno > 0 else str(found.strerror or found)
    return str(exc).strip() or type(exc).__name__


def check_url(url: str) -> str:
    """The server URL without a trailing slash; ValueError for one that is not http(s)://host[:port]."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"the server URL must look like http://127.0.0.1:3000, not {url!r}")
    return url.rstrip("/")


CHECK_TIMEOUT = httpx.Timeout(30.0, connect=10.0)


def check_server(url: str, hint: str = START_HINT, timeout: httpx.Timeout = CHECK_TIMEOUT) -> None:
    """Raise `ServerUnreachable` unless something answers HTTP at `url`. It asks `GET /livez` (open
    without an API key, answered at once, also while the models load); any HTTP answer will do."""
    url = check_url(url)
    try:
        httpx.get(f"{url}/livez", timeout=timeout)
    except httpx.TransportError as exc:
        raise ServerUnreachable(url, _reason(exc), hint) from None


def image_bytes(image: ImageInput) -> bytes:
    """The encoded image to upload: a file's bytes as they are, a PIL image as lossless PNG."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str | Path):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"an image must be a PIL image, a path or bytes, not {type(image).__name__}")


def request_body(data: bytes, prompt: str, model: str | None, task: Task, labels_from_prompt: bool = False) -> dict:
    """The JSON body of /segment or /detect (base64 avoids BentoML's JSON decoding of multipart text).
    `labels_from_prompt` is sent only when true, so servers older than the field still answer."""
    body = {"image_base64": base64.b64encode(data).decode("ascii"), "prompt": prompt}
    if model is not None:
        body["model"] = model
    if task == "segment":
        body["mask_format"] = "rle"
    if labels_from_prompt:
        body["labels_from_prompt"] = True
    return body


MaskInput = np.ndarray | dict | Image.Image | str | Path | bytes


def encode_request_body(mask: MaskInput, label: str, box: Sequence[float] | None = None) -> dict:
    """The JSON body of /encode. A numpy mask `[H, W]` (bool, or integers with nonzero = object) goes
    as compressed COCO RLE: exact, and far smaller than a PNG for object masks; a dict is taken as a
    COCO RLE `{"size": [h, w], "counts": str | bytes | list}`; a path, bytes or PIL image is a mask
    image (nonzero = object) sent as it is. `box` is (y1, x1, y2, x2) in 0..1, None for the mask's
    tight box."""
    if isinstance(mask, np.ndarray):
        if mask.ndim != 2:
            raise ValueError(f"a mask array must be [H, W], got shape {mask.shape}")
        rle = coco_mask.encode(np.asfortranarray(mask != 0, dtype=np.uint8))
        body = {"rle": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}}
    elif isinstance(mask, dict):
        counts = mask.get("counts")
        counts = counts.decode("ascii") if isinstance(counts, bytes) else counts
        body = {"rle": {**mask, "counts": counts}}
    else:
        try:
            data = image_bytes(mask)
        except TypeError:
            raise TypeError("a mask must be a numpy [H, W] array, a COCO RLE dict, or a mask image "
                            f"(PIL image, path or bytes), not {type(mask).__name__}") from None
        body = {"mask_base64": base64.b64encode(data).decode("ascii")}
    body["label"] = label
    if box is not None:
        body["box"] = [float(v) for v in box]
    return body


def decode_mask(mask: dict | None) -> np.ndarray | None:
    """A server mask `{"format": "rle", "size": [h, w], "counts": str}` as a bool [h, w] array."""
    if mask is None:
        return None
    if mask.get("format") != "rle":
        raise ValueError(f"expected an RLE mask, got format {mask.get('format')!r}")
    rle = {"size": list(mask["size"]), "counts": mask["counts"].encode("ascii")}
    return coco_mask.decode(rle).astype(bool)


def parse_answer(body: dict) -> SegmentationResult:
    """The server's JSON answer (see `segmentation.model.bodies.response_body`) as library types."""
    objects = [
        DetectedObject(
            label=o["label"],
            score=float(o["score"]),
            box=tuple(int(v) for v in o["box"]),
            box_normalized=tuple(float(v) for v in o["box_normalized"]),
            mask=decode_mask(o.get("mask")),
        )
        for o in body["objects"]
    ]
    return SegmentationResult(
        prompt=body["prompt"], text=body["text"], width=int(body["width"]), height=int(body["height"]),
        objects=objects,
    )


def error_message(response: httpx.Response) -> str:
    """The server's explanation: `{"error": msg}`, BentoML's `[{"error": msg}]`, or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return response.text.strip()


def retry_delay(attempt: int, response: httpx.Response | None, backoff_s: float) -> float:
    """Seconds to wait before try `attempt + 1`: the server's Retry-After if it sent one, else
    exponential backoff with full jitter (so clients shed together do not return together)."""
    if response is not None:
        retry_after = response.headers.get("retry-after", "")
        if retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), MAX_BACKOFF_S)
    return random.uniform(0, min(backoff_s * 2**attempt, MAX_BACKOFF_S))


def outcome(response: httpx.Response) -> dict | ServerUnavailable:
    """The JSON body of a successful answer, or the failure to retry after (429, 502, 503); raises
    `RequestRejected` for other 4xx and `ServerUnavailable` for other 5xx."""
    if response.status_code == 200:
        return response.json()
    if response.status_code in RETRY_STATUSES:
        return ServerUnavailable(error_message(response), response.status_code)
    if 400 <= response.status_code < 500:
        raise RequestRejected(error_message(response), response.status_code)
    raise ServerUnavailable(error_message(response), response.status_code)


def as_batch(images: Images, prompts: Prompts) -> list[tuple[ImageInput, str]]:
    """Pairs of (image, prompt): one prompt per image, or one prompt for all (as `Segmenter.segment`)."""
    if isinstance(images, Image.Image | str | Path | bytes):
        images = [images]
    images = list(images)
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt per image, or one string")
    return list(zip(images, prompts))


def check_soft(soft: bool) -> None:
    if soft:
        raise ValueError("the server answers hard masks only; soft=True needs the local Segmenter")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


# A dropped or refused connection: safe to retry. A read timeout is not retried (the server is
# working on it; a second try would double the load).
_RETRY_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
                 httpx.RemoteProtocolError, httpx.PoolTimeout)
# No connection at all: on a client's first call, nothing answers at its URL.
_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


class _Remote:
    """What the sync and async clients share: settings, the request, the retry rule."""

    default_concurrency = DEFAULT_CONCURRENCY

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        concurrency: int | None = None,
    ):
        self.url = check_url(url)
        self.model = model
        self.retries = retries
        self.backoff_s = backoff_s
        self.concurrency = max(1, concurrency or self.default_concurrency)
        self._http_options = dict(
            base_url=self.url, headers=_headers(api_key), timeout=timeout_s,
            limits=httpx.Limits(max_connections=self.concurrency),
        )
        self._reached = False  # set by the first HTTP answer

    def _connection_failed(self, exc: httpx.TransportError) -> ServerUnavailable:
        """The failure to retry after a lost connection; raises `ServerUnreachable` when this client
        never reached its server and could not connect now."""
        if not self._reached and isinstance(exc, _CONNECT_ERRORS):
            raise ServerUnreachable(self.url, _reason(exc)) from None
        return ServerUnavailable(f"connection failed: {exc!r}")

    def _body(self, data: bytes, prompt: str, task: Task, labels_from_prompt: bool) -> dict:
        return request_body(data, prompt, self.model, task, labels_from_prompt)

    def _wait_before_retry(self, attempt: int, result, response: httpx.Response | None) -> float | None:
        """None when `result` is the answer; else the seconds to wait before trying again. Raises the
        failure when the tries are used up."""
        if not isinstance(result, RemoteError):
            return None
        if attempt >= self.retries:
            raise result
        return retry_delay(attempt, response, self.backoff_s)


class RemoteSegmenter(_Remote):
    """`Segmenter`'s `segment()` and `detect()` against a server at `url`.

    Several images are sent `concurrency` at a time (default 8), so the server can batch them.
    `retries` is how many times a shed request (429/502/503) or a dropped connection is tried again.
    """

    def __init__(self, url: str, api_key: str | None = None, **options):
        super().__init__(url, api_key, **options)
        self._http = httpx.Client(**self._http_options)

    def segment(self, images: Images, prompts: Prompts, *, task: Task = "segment",
                soft: bool = False, labels_from_prompt: bool = False) -> list[SegmentationResult]:
        """Objects with boxes and masks for each image (`prompts`: one per image, or one for all).
        `labels_from_prompt`: every label is one of the prompt's classes, as in `Segmenter.segment`."""
        check_soft(soft)
        pairs = as_batch(images, prompts)
        options = {"task": task, "labels_from_prompt": labels_from_prompt}
        if len(pairs) <= 1 or self.concurrency == 1:
            return [self.segment_one(image, prompt, **options) for image, prompt in pairs]
        with ThreadPoolExecutor(min(self.concurrency, len(pairs))) as pool:
            return list(pool.map(lambda pair: self.segment_one(*pair, **options), pairs))

    def detect(self, images: Images, prompts: Prompts, *, labels_from_prompt: bool = False) -> list[SegmentationResult]:
        """Boxes only (no masks)."""
        return self.segment(images, prompts, task="detect", labels_from_prompt=labels_from_prompt)

    def segment_one(self, image: ImageInput, prompt: str, *, task: Task = "segment",
                    labels_from_prompt: bool = False) -> SegmentationResult:
        """One image, one request, retried while the server sheds load or the connection drops."""
        return parse_answer(self.answer(image, prompt, task=task, labels_from_prompt=labels_from_prompt))

    def answer(self, image: ImageInput, prompt: str, *, task: Task = "segment",
               labels_from_prompt: bool = False) -> dict:
        """The server's JSON answer for one image (masks as COCO RLE), retried like `segment_one`."""
        return self._post(f"/{task}", self._body(image_bytes(image), prompt, task, labels_from_prompt))

    def encode(self, mask: MaskInput, label: str, box: Sequence[float] | None = None) -> str:
        """The training text of one object, as `segmentation.encoder.encode_object` gives it with the
        server's VAE (see `encode_request_body` for the mask forms)."""
        return self.encoding(mask, label, box)["text"]

    def encoding(self, mask: MaskInput, label: str, box: Sequence[float] | None = None) -> dict:
        """The server's whole /encode answer: `{"text", "locs", "codes", "label", "height", "width"}`."""
        return self._post("/encode", encode_request_body(mask, label, box))

    def _post(self, route: str, body: dict) -> dict:
        """The JSON answer of `route`, retried while the server sheds load or the connection drops."""
        for attempt in range(self.retries + 1):
            response = None
            try:
                response = self._http.post(route, json=body)
                self._reached = True
                result = outcome(response)
            except _RETRY_ERRORS as exc:
                result = self._connection_failed(exc)
            if (delay := self._wait_before_retry(attempt, result, response)) is None:
                return result
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def models(self) -> list[dict]:
        """The served models: `{"id", "image_size", "default"}` each."""
        try:
            response = self._http.post("/models", json={})
        except _CONNECT_ERRORS as exc:
            raise self._connection_failed(exc) from None
        self._reached = True
        if response.status_code != 200:
            raise RequestRejected(error_message(response), response.status_code)
        return response.json()["models"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteSegmenter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRemoteSegmenter(_Remote):
    """The asyncio twin of `RemoteSegmenter`: `await segmenter.segment(...)`; safe to call from many
    tasks at once (at most `concurrency` requests, default 32, are in flight per client)."""

    default_concurrency = 32

    def __init__(self, url: str, api_key: str | None = None, **options):
        super().__init__(url, api_key, **options)
        self._http = httpx.AsyncClient(**self._http_options)
        self._slots = asyncio.Semaphore(self.concurrency)

    async def segment(self, images: Images, prompts: Prompts, *, task: Task = "segment",
                      soft: bool = False, labels_from_prompt: bool = False) -> list[SegmentationResult]:
        """Objects with boxes and masks for each image, the images sent concurrently."""
        check_soft(soft)
        pairs = as_batch(images, prompts)
        return list(await asyncio.gather(*(
            self.segment_one(image, prompt, task=task, labels_from_prompt=labels_from_prompt)
            for image, prompt in pairs
        )))

    async def detect(self, images: Images, prompts: Prompts, *,
                     labels_from_prompt: bool = False) -> list[SegmentationResult]:
        """Boxes only (no masks)."""
        return await self.segment(images, prompts, task="detect", labels_from_prompt=labels_from_prompt)

    async def segment_one(self, image: ImageInput, prompt: str, *, task: Task = "segment",
                          labels_from_prompt: bool = False) -> SegmentationResult:
        """One image, one request, retried while the server sheds load or the connection drops."""
        answer = await self.answer(image, prompt, task=task, labels_from_prompt=labels_from_prompt)
        # Decoding masks is CPU work: off the event loop, so other answers keep flowing.
        return await asyncio.to_thread(parse_answer, answer)

    async def answer(self, image: ImageInput, prompt: str, *, task: Task = "segment",
                     labels_from_prompt: bool = False) -> dict:
        """The server's JSON answer for one image (masks as COCO RLE), retried like `segment_one`."""
        data = image if isinstance(image, bytes) else await asyncio.to_thread(image_bytes, image)
        return await self._post(f"/{task}", self._body(data, prompt, task, labels_from_prompt))

    async def encode(self, mask: MaskInput, label: str, box: Sequence[float] | None = None) -> str:
        """The training text of one object (see `RemoteSegmenter.encode`)."""
        return (await self.encoding(mask, label, box))["text"]

    async def encoding(self, mask: MaskInput, label: str, box: Sequence[float] | None = None) -> dict:
        """The server's whole /encode answer (see `RemoteSegmenter.encoding`)."""
        body = await asyncio.to_thread(encode_request_body, mask, label, box)
        return await self._post("/encode", body)

    async def _post(self, route: str, body: dict) -> dict:
        """The JSON answer of `route`, retried while the server sheds load or the connection drops."""
        for attempt in range(self.retries + 1):
            response = None
            try:
                async with self._slots:
                    response = await self._http.post(route, json=body)
                self._reached = True
                result = outcome(response)
            except _RETRY_ERRORS as exc:
                result = self._connection_failed(exc)
            if (delay := self._wait_before_retry(attempt, result, response)) is None:
                return result
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRemoteSegmenter:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
