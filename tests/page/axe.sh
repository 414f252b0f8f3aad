#!/usr/bin/env bash
# Fetches, once, axe-core (the accessibility checker, from the npm registry)
# at the pinned version, checks the tarball against the pinned integrity, and
# prints the path of its axe.min.js. The page tests run it in Chromium. If
# LICENSOR_TEST_AXE names an axe.min.js, that one is used.
set -euo pipefail
version=4.14.1
integrity=sha512-FHfa+lmNjQZfJz1q8wKqIDwC6DExcHt/pkjNQb09a3NPjCKg2rhu5qb2S4r76ASyFNNtuFooJpZe37OgudVGtQ==

if [ -n "${LICENSOR_TEST_AXE:-}" ] && [ -f "$LICENSOR_TEST_AXE" ]; then
  echo "$LICENSOR_TEST_AXE"
  exit 0
fi
out=${XDG_CACHE_HOME:-$HOME/.cache}/licensor/axe-core-$version
if [ -f "$out/axe.min.js" ]; then
  echo "$out/axe.min.js"
  exit 0
fi
command -v npm >/dev/null || { echo "axe.sh: npm is needed to fetch axe-core" >&2; exit 1; }
echo "fetching axe-core $version into $out (first run only)" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "axe-core@$version" >/dev/null)
tarball=$work/axe-core-$version.tgz
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$got" != "$integrity" ]; then
  echo "axe.sh: axe-core $version does not match its pinned integrity ($got)" >&2
  exit 1
fi
tar -xzf "$tarball" -C "$work" package/axe.min.js
mkdir -p "$out"
mv "$work/package/axe.min.js" "$out/axe.min.js"
echo "$out/axe.min.js"
