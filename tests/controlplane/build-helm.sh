#!/usr/bin/env bash
# Builds helm from the pinned module in helm/ into a cache keyed by the pin,
# so a second run is instant. Prints the path of the helm binary.
# (Kept apart from build.sh so that a helm bump does not rebuild the control plane.)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
key=$(cat "$here"/build-helm.sh "$here"/helm/go.mod "$here"/helm/go.sum | sha256sum | cut -c1-16)
cache=${LICENSOR_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/licensor/controlplane}
out=$cache/helm-$key
if [ -x "$out/helm" ]; then
  echo "$out/helm"
  exit 0
fi
command -v go >/dev/null || { echo "build-helm.sh: Go is needed to build helm" >&2; exit 1; }
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/helm.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
release=$(awk '$1 == "helm.sh/helm/v3" {print $2}' "$here/helm/go.mod")
echo "building helm $release into $out (first run only; a few minutes)" >&2
# No DWARF: the binaries are stripped (-s) anyway, and not writing it is an
# eighth less to compile.
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -gcflags=all=-dwarf=false"
(cd "$here/helm" && go build -trimpath -ldflags="-s -X helm.sh/helm/v3/internal/version.version=$release" -o "$tmp/helm" helm.sh/helm/v3/cmd/helm)
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out/helm"
