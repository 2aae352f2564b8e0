#!/usr/bin/env bash
# Build the OCI image of a built bento with buildah (no Docker engine needed), from the same build
# context the release workflow hands docker/build-push-action: scripts/bento_context.py.
#
#   scripts/image/build.sh BENTO_TAG        # `make image` runs `make build` first and passes its tag
#
# VARIANT=cpu (default) relocks the context for torch's CPU wheel (scripts/image/torch_variant.py),
# so that the image fits machines without GPUs; VARIANT=cuda13 keeps the bento's own lock, i.e. the
# release's GPU image. The base image comes from scripts/image/base.sh (built once, then reused).
# Writes build/image.json: image, bento, variant, CUDA version, build seconds and size.
set -euo pipefail
cd "$(dirname "$0")/../.."

bento=${1:?usage: scripts/image/build.sh BENTO_TAG}
IMAGE=${IMAGE:-localhost/paligemma-segmentation:local-cpu}
VARIANT=${VARIANT:-cpu}
PY=${PY:-.venv/bin/python}
CONTEXT=build/image-context
STORAGE=(--storage-driver vfs)

scripts/image/base.sh
rm -rf "$CONTEXT"
dockerfile=$("$PY" scripts/bento_context.py "$bento" "$CONTEXT")
case $VARIANT in
  cpu)
    torch=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements.txt)
    cuda=$("$PY" scripts/image/torch_variant.py "$CONTEXT" --torch "${torch%%+*}+cpu" \
      --find-links "${TORCH_WHEELS:-/opt/wheels}") ;;
  cuda13) cuda=$("$PY" scripts/image/torch_variant.py "$CONTEXT") ;;
  *) echo "VARIANT must be cpu or cuda13, not $VARIANT" >&2; exit 2 ;;
esac

previous=$(buildah "${STORAGE[@]}" images --quiet --no-trunc "$IMAGE" 2>/dev/null || true)
start=$(date +%s)
# --layers=false (buildah's default) commits one layer: vfs stores every layer as a full copy.
buildah "${STORAGE[@]}" bud --isolation chroot --layers=false --pull=never -f "$dockerfile" -t "$IMAGE" \
  --label "ai.bentoml.bento=$bento" \
  --label "paligemma-segmentation.variant=$VARIANT" \
  --label "paligemma-segmentation.cuda=$cuda" \
  "$CONTEXT"
seconds=$(( $(date +%s) - start ))
current=$(buildah "${STORAGE[@]}" images --quiet --no-trunc "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  buildah "${STORAGE[@]}" rmi "$previous" >/dev/null || true  # each stale image holds gigabytes
fi
size=$(buildah "${STORAGE[@]}" images --format '{{.Size}}' "$IMAGE")
rm -rf "$CONTEXT"
cat > build/image.json <<JSON
{"image": "$IMAGE", "bento": "$bento", "variant": "$VARIANT", "cuda": "$cuda", "build_seconds": $seconds, "size": "$size"}
JSON
echo "Built $IMAGE from $bento ($VARIANT, CUDA $cuda) in ${seconds}s: $size"
