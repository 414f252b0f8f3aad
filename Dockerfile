# syntax=docker/dockerfile:1
# A static (musl) licensor binary in an empty image, run as a non-root user.
#   docker build -t ghcr.io/licensor-dev/licensor:0.1.0 .
# `make image` writes the same image (build/oci-image.py reads this file's last
# stage) with no container engine, to target/image/licensor.oci.tar.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --locked --release --target x86_64-unknown-linux-musl --bin licensor \
 && cp target/x86_64-unknown-linux-musl/release/licensor /licensor

FROM scratch
COPY --from=build /licensor /licensor
# The chart mounts the embedded store at /data and runs with a read-only root.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/licensor"]
CMD ["operator"]
