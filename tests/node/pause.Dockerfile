# The test node's pod sandbox image (tests/node/mod.rs builds it with
# build/oci-image.py from pause.c, compiled static with musl-gcc).
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
