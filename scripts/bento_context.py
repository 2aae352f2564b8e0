#!/usr/bin/env python
"""Write the Docker build context of a built bento: exactly what `bentoml containerize` builds.

`bentoml containerize` assembles its context in a temporary directory (the bento directory, the
models it records copied in from the model store under `models/`, and the final
`env/docker/Dockerfile`) and hands it to one local builder. Writing that context out instead lets any
builder take it: `docker buildx build` or docker/build-push-action, for several platforms at once,
with a layer cache and several tags (see .github/workflows/release.yml).

    python scripts/bento_context.py paligemma-segmentation:latest build/context
    docker buildx build --platform linux/amd64,linux/arm64 \
        -f build/context/env/docker/Dockerfile -t USER/paligemma-segmentation build/context

The bento comes from the store at $BENTOML_HOME; its models must still be in the model store. The
output directory must not exist yet (or be empty). Prints the Dockerfile's path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def write_context(bento_tag: str, out: Path) -> Path:
    """Write the build context of `bento_tag` into `out`; return the Dockerfile's path."""
    import bentoml

    # The function `bentoml containerize` and `bentoml.container.get_containerfile` use (1.4.x); the
    # public API only returns the Dockerfile, not the context with the models.
    from bentoml._internal.container import construct_containerfile

    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    bento = bentoml.bentos.get(bento_tag)
    with construct_containerfile(bento, enable_buildkit=True, add_header=True) as (context, dockerfile):
        relative = Path(dockerfile).relative_to(context)
        # Move rather than copy: the context holds every model's weights (gigabytes).
        for entry in Path(context).iterdir():
            shutil.move(str(entry), out / entry.name)
    return out / relative


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bento", help="bento tag, e.g. paligemma-segmentation:latest")
    parser.add_argument("out", type=Path, help="directory to write the build context to")
    args = parser.parse_args(argv)
    print(write_context(args.bento, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
