#!/usr/bin/env bash
# Install the system tools a make target needs that this machine lacks, with Debian's apt-get.
#
#   scripts/system_tools.sh COMMAND=PACKAGE ...
#
# COMMAND is a program looked up on PATH, or an absolute path that must be executable (the browser
# the tests use: ${CHROMIUM:-/usr/bin/chromium}). As root the missing packages are installed at once;
# otherwise the script prints the exact command to run and fails, so `make` stops before the tests.
set -euo pipefail

missing=()
for pair in "$@"; do
  command=${pair%%=*}
  package=${pair#*=}
  if [[ $command == /* ]]; then
    [ -x "$command" ] || missing+=("$package")
  else
    command -v "$command" >/dev/null || missing+=("$package")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

install="apt-get install -y -q ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing system tools: ${missing[*]}. Install them, then run make again:" >&2
  echo "  sudo apt-get update && sudo $install" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "Missing system tools: ${missing[*]}, and this machine has no apt-get: install them yourself." >&2
  exit 1
fi
echo "Installing missing system tools: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
$install
