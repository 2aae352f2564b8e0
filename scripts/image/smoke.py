#!/usr/bin/env python
"""Start check of a running image: wait until `/readyz` answers 200, then segment one uploaded image.

The release workflow runs it against the amd64 image it just built before pushing anything;
`make image-test` runs it against the locally built container.

    python scripts/image/smoke.py http://127.0.0.1:3000 --timeout 1800

Exit status 0 when the server got ready in time and `/segment` answered a well-formed 200; otherwise 1
with the reason. Prints the seconds until ready.
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import httpx
from PIL import Image

WIDTH, HEIGHT = 96, 64


def wait_ready(url: str, timeout_s: float) -> float:
    """Poll `url`/readyz until it answers 200; return the seconds waited. Raises TimeoutError."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            # A loading server may hang on /readyz: a short timeout per try.
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/readyz did not answer 200 within {timeout_s:.0f} s")


def segment_once(url: str, timeout_s: float) -> dict:
    """Upload a WIDTH×HEIGHT PNG to `url`/segment; return the answer. Raises ValueError on a bad one."""
    buffer = io.BytesIO()
    Image.new("RGB", (WIDTH, HEIGHT), (180, 40, 40)).save(buffer, format="PNG")
    response = httpx.post(url + "/segment", files={"image": ("smoke.png", buffer.getvalue(), "image/png")},
                          data={"prompt": "cat ; dog"}, timeout=timeout_s)
    if response.status_code != 200:
        raise ValueError(f"/segment answered {response.status_code}: {response.text[:1000]}")
    body = response.json()
    if (body.get("width"), body.get("height")) != (WIDTH, HEIGHT) or not isinstance(body.get("objects"), list):
        raise ValueError(f"/segment answered an unexpected body: {response.text[:1000]}")
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="base URL of the server, e.g. http://127.0.0.1:3000")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for /readyz (default 1800)")
    parser.add_argument("--segment-timeout", type=float, default=600, help="seconds for the /segment call")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    try:
        waited = wait_ready(url, args.timeout)
        print(f"ready after {waited:.1f} s")
        body = segment_once(url, args.segment_timeout)
    except (TimeoutError, ValueError, httpx.HTTPError) as exc:
        print(f"start check failed: {exc}", file=sys.stderr)
        return 1
    print(f"/segment: model {body.get('model')}, {len(body['objects'])} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
