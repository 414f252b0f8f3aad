#!/usr/bin/env bash
# Builds the kstatus judge (main.go: sigs.k8s.io/cli-utils' status.Compute,
# as Flux and kpt use it) from the pinned Go modules beside this script into
# a cache keyed by them, so a second run is instant. Prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(cat "$here"/build.sh "$here"/main.go "$here"/go.mod "$here"/go.sum | sha256sum | cut -c1-16)
cache=${LICENSOR_KSTATUS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/licensor/kstatus}
out=$cache/$key/kstatus
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "build.sh: Go is needed to build the kstatus judge" >&2; exit 1; }
mkdir -p "$cache/$key"
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
(cd "$here" && go build -trimpath -ldflags=-s -o "$out.tmp" .)
mv "$out.tmp" "$out"
echo "$out"
