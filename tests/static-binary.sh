#!/usr/bin/env bash
# Checks the static (musl) binary the Dockerfile ships: it is statically
# linked, runs with no libraries around it, and does a real job on the
# embedded store. LICENSOR_RUN_WITH names what runs a binary built for
# another machine (qemu-aarch64 for the aarch64 release binary).
#   static-binary.sh BINARY
set -euo pipefail
bin=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
here=$(cd "$(dirname "$0")/.." && pwd)
ldd_out=$(ldd "$bin" 2>&1 || true)
case "$ldd_out" in
  *"not a dynamic executable"*|*"statically linked"*) ;;
  *) echo "static-binary: $bin is dynamically linked: $ldd_out" >&2; exit 1 ;;
esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
emulator=()
[ -z "${LICENSOR_RUN_WITH:-}" ] || emulator=("$(command -v "$LICENSOR_RUN_WITH")")
# An empty environment, as in the scratch image.
run() { env -i "${emulator[@]}" "$bin" --backend "sqlite:$work/licensor.db" "$@"; }
run --version
run backend seed -f "$here/examples/account.yaml" >/dev/null
set +e
run plan -f "$here/examples/licenses" >/dev/null
code=$?
set -e
[ "$code" -eq 2 ] || { echo "static-binary: plan exited $code, expected 2 (changes)" >&2; exit 1; }
run apply -f "$here/examples/licenses" >/dev/null
run plan -f "$here/examples/licenses" >/dev/null
run crd | grep -q "kind: CustomResourceDefinition"
echo "static-binary: $(basename "$bin") is static ($(du -h "$bin" | cut -f1)) and applies the examples"
