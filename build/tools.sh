#!/usr/bin/env bash
# Installs, once, the tools `make dist` needs beyond Rust and Python, into a
# cache keyed by the pins below, and prints the directory whose bin/ goes on
# PATH:
#   zig (PyPI's ziglang), the C compiler and linker for aarch64 musl, for
#     SQLite and ring's C and assembly;
#   cargo-zigbuild (its PyPI wheel), which builds a Rust target with zig as
#     its C toolchain;
#   cargo-cyclonedx (crates.io), which writes the CycloneDX SBOM from
#     Cargo's own graph.
# Also adds the aarch64 musl target to the Rust toolchain.
set -euo pipefail
ZIG=0.17.1
ZIGBUILD=0.24.1
CYCLONEDX=0.5.9
TARGET=aarch64-unknown-linux-musl

key=$( (cat "$0"; echo "$ZIG $ZIGBUILD $CYCLONEDX") | sha256sum | cut -c1-16)
out=${XDG_CACHE_HOME:-$HOME/.cache}/licensor/build-tools/$key
if ! rustup target list --installed | grep -qx "$TARGET"; then
  rustup target add "$TARGET" >&2
fi
if [ -e "$out/.complete" ]; then
  echo "$out"
  exit 0
fi
echo "installing the release tools into $out (first run only)" >&2
# A virtualenv records its own path, so it is built where it will live; a
# half-built one (no .complete) is started again.
rm -rf "$out"
mkdir -p "$out/bin"
python3 -m venv "$out/venv" >&2
# zig and cargo-zigbuild come built, as wheels; cargo-cyclonedx is built
# from crates.io meanwhile, unoptimised: it reads Cargo's metadata in half a
# second either way, and builds in half the CPU time (90 s instead of 170).
CARGO_PROFILE_RELEASE_OPT_LEVEL=0 cargo install --quiet --locked --root "$out/cyclonedx" --version "$CYCLONEDX" cargo-cyclonedx >&2 &
cyclonedx=$!
"$out/venv/bin/pip" install --quiet --disable-pip-version-check --no-input \
  "ziglang==$ZIG" "cargo-zigbuild==$ZIGBUILD" >&2
printf '#!/bin/sh\nexec "%s" -m ziglang "$@"\n' "$out/venv/bin/python" > "$out/bin/zig"
chmod +x "$out/bin/zig"
ln -s ../venv/bin/cargo-zigbuild "$out/bin/cargo-zigbuild"
wait "$cyclonedx"
ln -s ../cyclonedx/bin/cargo-cyclonedx "$out/bin/cargo-cyclonedx"
[ "$("$out/bin/zig" version)" = "$ZIG" ] || { echo "tools.sh: zig did not install" >&2; exit 1; }
touch "$out/.complete"
echo "$out"
