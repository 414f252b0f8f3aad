#!/usr/bin/env bash
# Builds a Go program from the pinned module in DIR (tests/kstatus,
# tests/actionlint) into a cache keyed by that module's files and this
# script, so a second run is instant, and prints the binary's path.
# PACKAGE is the package to build: "." (the default) for a program of our
# own, or a tool the module's go.mod names.
#   tests/go-tool.sh DIR [PACKAGE]
set -euo pipefail
dir=$(cd "${1:?usage: go-tool.sh DIR [PACKAGE]}" && pwd)
package=${2:-.}
# The binary is named after the package built (a tool of the module), or
# after the module's directory (a program of our own).
if [ "$package" = . ]; then name=$(basename "$dir"); else name=$(basename "$package"); fi
key=$( (cat "$0" "$dir"/go.mod "$dir"/go.sum; echo "$package"; cat "$dir"/*.go 2>/dev/null || true) \
  | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/licensor/go-tools
out=$cache/$key/$name
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "go-tool.sh: Go is needed to build $name" >&2; exit 1; }
mkdir -p "$cache/$key"
# No DWARF: the binaries are stripped (-s) anyway, and not writing it is an
# eighth less to compile.
export CGO_ENABLED=0 GOFLAGS="-buildvcs=false -gcflags=all=-dwarf=false"
# Built under a name of this process's own, then renamed into place: tests
# that ask for the same tool at once each get a whole binary.
(cd "$dir" && go build -trimpath -ldflags=-s -o "$out.tmp.$$" "$package")
mv -f "$out.tmp.$$" "$out"
echo "$out"
