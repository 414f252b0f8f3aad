#!/usr/bin/env bash
# Fetches, once, Debian's prometheus package (Prometheus and promtool) and
# unpacks its two programs into a cache keyed by the package's version,
# without installing it (no service starts, no root needed), and prints the
# directory that holds them. The chart test runs promtool on the alerts;
# the dashboard test runs Prometheus against the operator. If
# LICENSOR_TEST_PROMTOOL and LICENSOR_TEST_PROMETHEUS are set, the tests
# take those instead.
set -euo pipefail
version=$(apt-cache policy prometheus 2>/dev/null | awk '$1 == "Candidate:" {print $2}')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  echo "prometheus.sh: Debian's prometheus package is not in the package lists (run apt-get update as root)" >&2
  exit 1
fi
out=${XDG_CACHE_HOME:-$HOME/.cache}/licensor/prometheus-$version
if [ -x "$out/promtool" ] && [ -x "$out/prometheus" ]; then
  echo "$out"
  exit 0
fi
echo "fetching Debian's prometheus $version into $out (first run only)" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "prometheus=$version" >/dev/null 2>"$work/log") || {
  echo "prometheus.sh: apt-get download prometheus=$version failed:" >&2
  cat "$work/log" >&2
  exit 1
}
dpkg-deb -x "$work"/prometheus_*.deb "$work/unpacked"
mkdir -p "$work/out"
cp "$work/unpacked/usr/bin/promtool" "$work/unpacked/usr/bin/prometheus" "$work/out/"
mkdir -p "$(dirname "$out")"
rm -rf "$out"
mv "$work/out" "$out"
echo "$out"
