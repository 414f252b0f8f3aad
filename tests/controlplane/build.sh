#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kubectl from the pinned Go modules beside
# this script, and the node's and the cluster's controllers from the same
# release (kubelet, kube-proxy, kube-controller-manager, kube-scheduler; see
# tests/node), into a cache keyed by those pins, so a second run is instant.
# Prints the directory that holds them (the envtest KUBEBUILDER_ASSETS layout).
# If KUBEBUILDER_ASSETS already names a directory with all of them, that is used.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bins=(etcd kube-apiserver kubectl kubelet kube-proxy kube-controller-manager kube-scheduler)

complete() {
  local dir=$1 b
  for b in "${bins[@]}"; do [ -x "$dir/$b" ] || return 1; done
}

if [ -n "${KUBEBUILDER_ASSETS:-}" ] && complete "$KUBEBUILDER_ASSETS"; then
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

key=$(cat "$here"/build.sh "$here"/kube/go.mod "$here"/kube/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum | sha256sum | cut -c1-16)
cache=${LICENSOR_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/licensor/controlplane}
out=$cache/$key
if complete "$out"; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: Go is needed to build the control plane" >&2; exit 1; }
tmp=$(mktemp -d "$cache.build.XXXXXX" 2>/dev/null || { mkdir -p "$cache"; mktemp -d "$cache.build.XXXXXX"; })
trap 'rm -rf "$tmp"' EXIT
echo "building etcd and ${bins[*]:1} into $out (first run only; several minutes)" >&2
# No DWARF: the binaries are stripped (-s) anyway, and not writing it is an
# eighth less to compile.
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -gcflags=all=-dwarf=false"
# The release the kube module pins, stamped in so `kubectl version` and the
# API server's /version tell the truth.
release=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/kube/go.mod")
minor=$(echo "$release" | cut -d. -f2)
stamp="-s"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  stamp="$stamp -X $pkg.gitVersion=$release -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
(cd "$here/etcd" && go build -trimpath -ldflags=-s -o "$tmp/etcd" .)
(cd "$here/kube" && go build -trimpath -ldflags="$stamp" -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl k8s.io/kubernetes/cmd/kubelet \
  k8s.io/kubernetes/cmd/kube-proxy k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler)
mkdir -p "$cache"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
