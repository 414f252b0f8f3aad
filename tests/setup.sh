#!/usr/bin/env bash
# Installs what `make check` and `make test` need beyond a Rust toolchain,
# Go and Python 3, on a fresh Debian machine: rustfmt and clippy, the musl
# target and musl-gcc for the static binary, the Python virtualenv module
# for the contract tools, Debian's PostgreSQL server, and Debian's Chromium
# with chromedriver for the page tests, and containerd, runc, the CNI
# plugins and iptables for the test node, qemu-user and shellcheck for the
# release test. `setup.sh static` installs only
# what the static binary needs (musl-gcc, the musl target), as a release
# build on Debian or Ubuntu does. Debian packages need root (or sudo); what
# is already there is left alone, so a second run does nothing.
set -euo pipefail

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else
    echo "setup.sh: installing Debian packages needs root: $*" >&2
    return 1
  fi
}

packages=()
command -v musl-gcc >/dev/null 2>&1 || packages+=(musl-tools)
if [ "${1:-}" != static ]; then
  # The PostgreSQL server the store tests start (as an unprivileged user).
  compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || packages+=(postgresql)
  # Debian's Chromium and its WebDriver, for the page tests (nothing downloads
  # a browser of its own).
  command -v chromium >/dev/null 2>&1 || packages+=(chromium)
  # The documentation's walkthroughs (tests/readme.rs) wait for a server with it.
  command -v curl >/dev/null 2>&1 || packages+=(curl)
  command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
  # The test node (tests/node): Debian's containerd, runc and CNI plugins, and
  # iptables for kube-proxy's Service rules.
  command -v containerd >/dev/null 2>&1 || packages+=(containerd)
  command -v runc >/dev/null 2>&1 || packages+=(runc)
  [ -x /usr/lib/cni/bridge ] || packages+=(containernetworking-plugins)
  command -v iptables >/dev/null 2>&1 || packages+=(iptables)
  # The release test (tests/release.rs): qemu-aarch64 runs the aarch64
  # binary; actionlint runs shellcheck on the workflows' shell.
  command -v qemu-aarch64 >/dev/null 2>&1 || packages+=(qemu-user)
  command -v shellcheck >/dev/null 2>&1 || packages+=(shellcheck)
  probe=$(mktemp -d)
  python3 -m venv "$probe/v" >/dev/null 2>&1 || packages+=(python3-venv)
  rm -rf "$probe"
fi
if ((${#packages[@]})); then
  echo "setup.sh: installing ${packages[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi

if command -v rustup >/dev/null 2>&1; then
  if [ "${1:-}" != static ]; then
    installed=$(rustup component list --installed 2>/dev/null || true)
    for c in rustfmt clippy; do
      grep -q "^$c" <<<"$installed" || rustup component add "$c" >&2
    done
  fi
  rustup target list --installed | grep -qx x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl >&2
fi
