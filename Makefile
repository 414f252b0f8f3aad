# licensor: the two commands of the README, and the checks CI runs.
CARGO ?= cargo
# Where cargo builds: CARGO_TARGET_DIR when it is set, as cargo itself reads it.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
BIN := $(TARGET_DIR)/release/licensor

.PHONY: demo test test-tools test-build test-main test-node test-arm test-dist test-release deps test-static check bench bench-operator bench-platform bench-history crd image static dist dist-arm

## Seed the example account into the embedded store (licensor.db) and apply
## the example manifests, printing the plan, the outcome, the plan afterwards
## (0 to change) and the pools. tests/cli_output.rs runs the same steps twice.
demo:
	$(CARGO) build --release --quiet
	$(BIN) backend seed -f examples/account.yaml
	$(BIN) plan -f examples/licenses; code=$$?; \
	  echo "plan exit code: $$code (0: nothing to change, 2: changes, 1: refused)"; \
	  [ $$code -eq 0 ] || [ $$code -eq 2 ]
	$(BIN) apply -f examples/licenses
	$(BIN) plan -f examples/licenses
	$(BIN) status

## Every test: unit, property and end-to-end, including a real kube-apiserver
## and etcd built once from pinned Go modules (or taken from KUBEBUILDER_ASSETS),
## kstatus (sigs.k8s.io/cli-utils) built the same way, Prometheus and
## promtool from Debian's package (unpacked, not installed), the contract
## tools in a pinned Python virtualenv, and the page in
## Debian's headless Chromium with axe-core (pinned, from npm), and the chart
## installed on a real node (kubelet and kube-proxy from the same modules,
## Debian's containerd and runc) from `make image`'s image, and a release
## (`make dist`) checked as a download. Installs what it needs first (deps).
##
## Two lanes at once, so that a first run fits two cores: the tools the
## tests run (tests/tools.sh, mostly Go builds, cached) beside the Rust
## builds; once both are built, the tests (which wait on servers and leave
## a core mostly idle) beside the x86_64 release build and then the aarch64
## one; the install on a node once the image is built, the release's own
## tests once `make dist` is.
test: deps
	$(MAKE) --no-print-directory -j2 --output-sync=line test-node test-release

# What the tests' tools are, as `export` lines for the test runs to source.
TEST_ENV := $(TARGET_DIR)/test-tools.env
TEST_RUN = . $(TEST_ENV) && \
	  LICENSOR_TEST_IMAGE=$(abspath $(TARGET_DIR))/image/licensor.oci.tar \
	  LICENSOR_TEST_DIST=$(abspath $(DIST)) $(CARGO) test --locked
# Every test file but the two that wait for a build: tests/chart_on_node.rs
# (the image) and tests/release.rs (`make dist`).
TESTS := $(filter-out release chart_on_node,$(basename $(notdir $(wildcard tests/*.rs))))

test-tools:
	@mkdir -p $(TARGET_DIR)
	tests/tools.sh > $(TEST_ENV).tmp && mv $(TEST_ENV).tmp $(TEST_ENV)

test-build:
	$(CARGO) test --locked --no-run

test-main: test-tools test-build
	$(TEST_RUN) --lib --bins $(TESTS:%=--test %)
	$(TEST_RUN) --doc

test-node: test-main test-static image
	$(TEST_RUN) --test chart_on_node

# `make dist` within `make test`: the aarch64 build after the x86_64 one
# (so that the tests take the lane the tools leave), the rest once the
# image is built.
test-arm: test-tools static
	$(MAKE) --no-print-directory dist-arm
test-dist: test-arm image
	$(MAKE) --no-print-directory dist

test-release: test-dist
	$(TEST_RUN) --test release

## What the checks and tests need beyond Rust, Go and Python: rustfmt and
## clippy, the musl target and musl-gcc, the Python venv module (Debian
## packages as root or with sudo).
deps:
	tests/setup.sh

## The static (musl) binary the Dockerfile ships builds and works (deps
## installs the musl target and musl-gcc).
MUSL := x86_64-unknown-linux-musl
static:
	tests/setup.sh static
	$(CARGO) build --locked --release --target $(MUSL) --bin licensor
test-static: static
	tests/static-binary.sh $(TARGET_DIR)/$(MUSL)/release/licensor

## The OCI image the Dockerfile describes, built with no container engine:
## the static binary in an OCI image layout, one tar that `ctr images import`,
## `skopeo copy oci-archive:` and `podman load` read (README, "Install in a
## cluster").
IMAGE ?= ghcr.io/licensor-dev/licensor
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE_LABELS = --name $(IMAGE) --version $(VERSION) \
	  --revision $$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  --source https://github.com/licensor-dev/licensor \
	  --licenses $$(sed -n 's/^license = "\(.*\)"/\1/p' Cargo.toml)
EPOCH = $$(git log -1 --format=%ct 2>/dev/null || echo 0)
OCI_IMAGE = SOURCE_DATE_EPOCH=$(EPOCH) build/oci-image.py --dockerfile Dockerfile $(IMAGE_LABELS)
image: static
	$(OCI_IMAGE) --out $(TARGET_DIR)/image/licensor.oci.tar \
	  linux/amd64=$(TARGET_DIR)/$(MUSL)/release/licensor

## A release in target/dist/: for x86_64 and aarch64 Linux a static binary
## in licensor-VERSION-TARGET.tar.gz and its CycloneDX SBOM
## (licensor-VERSION-TARGET.cdx.json), the image for both platforms as one
## index (licensor.oci.tar), and SHA256SUMS over all of them. aarch64 is
## built with zig as its C toolchain; build/tools.sh installs zig,
## cargo-zigbuild and cargo-cyclonedx once. .github/workflows/release.yml
## runs this on a tag and publishes the result.
ARM := aarch64-unknown-linux-musl
DIST := $(TARGET_DIR)/dist
# aarch64 builds in a target directory of its own, so that it never waits
# for (or holds up) another cargo command on the main one: within `make
# test` it builds while the tests run.
CROSS_DIR := $(TARGET_DIR)/cross
RELEASE_BINS := $(MUSL)=$(TARGET_DIR)/$(MUSL)/release/licensor \
	$(ARM)=$(CROSS_DIR)/$(ARM)/release/licensor
# zig, cargo-zigbuild and cargo-cyclonedx, on PATH for the recipes below.
RELEASE_TOOLS = tools=$$(build/tools.sh) && export PATH="$$tools/bin:$$PATH"
# The aarch64 binary alone: within `make test` it starts as soon as the
# tests' tools are built, beside the x86_64 build.
dist-arm:
	$(RELEASE_TOOLS) && \
	  CARGO_TARGET_DIR=$(CROSS_DIR) $(CARGO) zigbuild --locked --release --target $(ARM) --bin licensor
dist: static dist-arm
	$(RELEASE_TOOLS) && \
	  rm -rf $(DIST) && mkdir -p $(DIST) && \
	  for built in $(RELEASE_BINS); do \
	    target=$${built%%=*} && \
	    SOURCE_DATE_EPOCH=$(EPOCH) build/tarball.sh $(DIST)/licensor-$(VERSION)-$$target \
	      $${built#*=} LICENSE README.md && \
	    $(CARGO) cyclonedx --format json --spec-version 1.5 --target $$target \
	      --override-filename licensor-$(VERSION)-$$target.cdx && \
	    mv licensor-$(VERSION)-$$target.cdx.json $(DIST)/ || exit 1; \
	  done
	$(OCI_IMAGE) --out $(DIST)/licensor.oci.tar \
	  linux/amd64=$(TARGET_DIR)/$(MUSL)/release/licensor \
	  linux/arm64=$(CROSS_DIR)/$(ARM)/release/licensor
	cd $(DIST) && sha256sum licensor-* licensor.oci.tar > SHA256SUMS

## Formatting and lints (the committed CRD is checked by a test).
check: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## Regenerate crds/ (and the chart's copy) from the Rust types.
crd:
	$(CARGO) run --quiet -- crd > crds/licensor.dev.yaml
	cp crds/licensor.dev.yaml charts/licensor/crds/

## The scale benchmark (100,000 manifests over 100,000 organizations; plan set
## against validate on the same files, each command's CPU time and peak RSS).
bench:
	N=100000 $(CARGO) bench --locked --bench scale

## The operator benchmark on a real control plane (1,000 objects to Ready
## against a plain-client floor; peak memory with 1,000 and 10,000 objects).
bench-operator: static
	assets=$$(tests/controlplane/build.sh) && KUBEBUILDER_ASSETS="$$assets" \
	  IMAGE_BIN=$(abspath $(TARGET_DIR))/$(MUSL)/release/licensor $(CARGO) bench --locked --bench operator

## The page's history over 100,000 audit records: time to answer and size
## for each range (targets 200 ms and 1 MB).
bench-history:
	$(CARGO) bench --locked --bench history

## The platform API load benchmark (writes and reads per second, p50/p99).
	$(CARGO) bench --locked --bench platform
