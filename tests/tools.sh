#!/usr/bin/env bash
# Builds or fetches, once each (every one is cached by its own script), the
# outside tools the tests run, and prints where they are as `export` lines
# for the test run to source (`make test` writes them to
# target/test-tools.env):
#   the control plane and the node's binaries (controlplane/build.sh),
#   kstatus, helm and actionlint (Go modules), promtool and Prometheus
#     (Debian's package, unpacked),
#   the contract tools' virtualenv and axe-core (fetched meanwhile, as they
#   wait on the network more than on the processor).
# A test run without these variables builds what it needs itself, the same
# way, when it first needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tests/contract/venv.sh > "$work/venv" &
venv=$!
tests/page/axe.sh > "$work/axe" &
axe=$!

say() { printf "export %s='%s'\n" "$1" "$2"; }
say KUBEBUILDER_ASSETS "$(tests/controlplane/build.sh)"
say LICENSOR_TEST_KSTATUS "$(tests/go-tool.sh tests/kstatus)"
tests/controlplane/build-helm.sh >/dev/null
tests/go-tool.sh tests/actionlint github.com/rhysd/actionlint/cmd/actionlint >/dev/null
prometheus=$(tests/prometheus.sh)
say LICENSOR_TEST_PROMTOOL "$prometheus/promtool"
say LICENSOR_TEST_PROMETHEUS "$prometheus/prometheus"
wait "$venv" || { echo "tools.sh: tests/contract/venv.sh failed" >&2; exit 1; }
say LICENSOR_TEST_VENV "$(cat "$work/venv")"
wait "$axe" || { echo "tools.sh: tests/page/axe.sh failed" >&2; exit 1; }
say LICENSOR_TEST_AXE "$(cat "$work/axe")"
