#!/usr/bin/env bash
# Creates, once, a Python virtualenv with the pinned contract tools
# (schemathesis, openapi-spec-validator) in a cache keyed by the pins, and
# prints its path. If LICENSOR_TEST_VENV names a virtualenv that has both,
# that one is used.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

complete() {
  [ -x "$1/bin/schemathesis" ] && [ -x "$1/bin/openapi-spec-validator" ] && [ -e "$1/.complete" ]
}

if [ -n "${LICENSOR_TEST_VENV:-}" ] && [ -x "$LICENSOR_TEST_VENV/bin/schemathesis" ] \
  && [ -x "$LICENSOR_TEST_VENV/bin/openapi-spec-validator" ]; then
  echo "$LICENSOR_TEST_VENV"
  exit 0
fi
key=$(cat "$here/requirements.txt" "$here/venv.sh" | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/licensor/venv
out=$cache/$key
if complete "$out"; then
  echo "$out"
  exit 0
fi
command -v python3 >/dev/null || { echo "venv.sh: python3 is needed" >&2; exit 1; }
echo "installing the contract tools into $out (first run only)" >&2
mkdir -p "$cache"
# A virtualenv records its own path, so it is built where it will live; a
# half-built one (no .complete) is started again.
rm -rf "$out"
python3 -m venv "$out" >&2
"$out/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$here/requirements.txt" >&2 \
  || { rm -rf "$out"; echo "venv.sh: pip could not install $here/requirements.txt" >&2; exit 1; }
touch "$out/.complete"
complete "$out" || { echo "venv.sh: the tools did not install" >&2; exit 1; }
echo "$out"
