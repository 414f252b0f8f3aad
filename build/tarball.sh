#!/usr/bin/env bash
# Writes DIR.tar.gz holding DIR's name as its one top directory, with the
# binary (as `licensor`) and the files given beside it. Reproducible: the
# entries are owned by 0:0, in name order, dated SOURCE_DATE_EPOCH, and gzip
# stores no name or time.
#   tarball.sh DIR BINARY FILE...
set -euo pipefail
dir=${1:?usage: tarball.sh DIR BINARY FILE...}
binary=${2:?usage: tarball.sh DIR BINARY FILE...}
shift 2
name=$(basename "$dir")
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir "$stage/$name"
install -m 0755 "$binary" "$stage/$name/licensor"
install -m 0644 "$@" "$stage/$name/"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@${SOURCE_DATE_EPOCH:-0}" \
  --mode=go-w -C "$stage" -cf - "$name" | gzip -9 -n > "$dir.tar.gz"
