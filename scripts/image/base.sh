#!/usr/bin/env bash
# Build the base image BentoML's generated Dockerfile names (python:3.11-slim) from Debian's own
# packages and tag it in buildah's local vfs storage, for machines that cannot pull images.
#
#   scripts/image/base.sh            # reuses the local base when present; FORCE=1 rebuilds it
#
# Debian bookworm's python3 is 3.11. The generated Dockerfile expects bash, groupadd/useradd, apt-get
# and a `pip` that can install uv. The host's CA bundle goes in, because package-index traffic from
# these machines is only trusted with it (pip/uv inside the build see none of the host's settings);
# PIP_BREAK_SYSTEM_PACKAGES lets pip install uv into Debian's "externally managed" Python.
set -euo pipefail

BASE=${BASE_IMAGE:-python:3.11-slim}
STORAGE=(--storage-driver vfs)
LABEL=paligemma-segmentation.local-base

if [ -z "${FORCE:-}" ] && [ "$(buildah "${STORAGE[@]}" inspect --type image \
    --format "{{index .OCIv1.Config.Labels \"$LABEL\"}}" "$BASE" 2>/dev/null)" = bookworm ]; then
  echo "Reusing the local base image $BASE (FORCE=1 rebuilds it)"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$work/host-ca.crt"
# The customize hook's $1 is the root filesystem, expanded by mmdebstrap, not by this shell.
# shellcheck disable=SC2016
mmdebstrap --quiet --variant=minbase --include=python3,python3-pip,python-is-python3,ca-certificates,passwd \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  bookworm "$work/rootfs.tar"
cat > "$work/Containerfile" <<CONTAINERFILE
FROM scratch
ADD rootfs.tar /
COPY host-ca.crt /etc/ssl/host-ca.crt
ENV LANG=C.UTF-8 \\
    PIP_BREAK_SYSTEM_PACKAGES=1 \\
    PIP_CERT=/etc/ssl/host-ca.crt \\
    SSL_CERT_FILE=/etc/ssl/host-ca.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/host-ca.crt \\
    UV_NATIVE_TLS=true
LABEL $LABEL=bookworm
CMD ["python3"]
CONTAINERFILE
buildah "${STORAGE[@]}" bud --isolation chroot --quiet -t "$BASE" -f "$work/Containerfile" "$work"
echo "Built the local base image $BASE"
