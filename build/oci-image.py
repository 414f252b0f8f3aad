#!/usr/bin/env python3
"""Writes licensor's OCI image, with no container engine: an OCI image layout
(oci-layout, index.json, blobs) packed into one tar, as `ctr images import`,
`skopeo copy oci-archive:` and `podman load` read it.

The image is the Dockerfile's last stage: its one COPY (the static binary at
/licensor), USER, EXPOSE, ENTRYPOINT and CMD are read from the Dockerfile, so
the two cannot describe different images. One manifest per platform, all in
one image index, so the same file serves `make image` (the machine's own
platform) and `make dist` (x86_64 and aarch64).

Reproducible: every timestamp is SOURCE_DATE_EPOCH (the commit's time when
the Makefile runs it), the tar entries are owned by 0:0 in a fixed order and
gzip writes no name or time, so one commit and one binary give one digest.

    oci-image.py --dockerfile Dockerfile --out target/image/licensor.oci.tar \\
        --name ghcr.io/licensor-dev/licensor --version 0.1.0 --revision SHA \\
        --source URL --licenses Apache-2.0 linux/amd64=target/.../licensor
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import sys
import tarfile
from datetime import datetime, timezone

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def final_stage(path):
    """The last stage of a Dockerfile: its instructions as (KEYWORD, args)."""
    lines, current = [], ""
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not current and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            lines.append((current + line).strip())
            current = ""
    stage = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage = []
        stage.append((keyword, rest.strip()))
    return stage


def exec_form(text, what):
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        sys.exit(f"oci-image: {what} {text} must be in the JSON (exec) form")
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        sys.exit(f"oci-image: {what} {text} must be a JSON list of strings")
    return value


def describe(dockerfile):
    """What the Dockerfile's last stage says of the image."""
    stage = final_stage(dockerfile)
    if not stage or stage[0] != ("FROM", "scratch"):
        sys.exit(f"oci-image: the last stage of {dockerfile} must be FROM scratch")
    image = {"copy": None, "User": None, "ExposedPorts": {}, "Entrypoint": None, "Cmd": None}
    for keyword, args in stage[1:]:
        if keyword == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            if len(words) != 2 or image["copy"]:
                sys.exit(f"oci-image: expected one COPY of one file, found COPY {args}")
            image["copy"] = words[1]
        elif keyword == "USER":
            image["User"] = args
        elif keyword == "EXPOSE":
            for port in args.split():
                image["ExposedPorts"][port if "/" in port else f"{port}/tcp"] = {}
        elif keyword == "ENTRYPOINT":
            image["Entrypoint"] = exec_form(args, "ENTRYPOINT")
        elif keyword == "CMD":
            image["Cmd"] = exec_form(args, "CMD")
        else:
            sys.exit(f"oci-image: {keyword} in the last stage is not something this builder writes")
    if not image["copy"] or not image["copy"].startswith("/"):
        sys.exit("oci-image: the last stage must COPY the binary to an absolute path")
    return image


class Blobs:
    """Content-addressed blobs, each written once."""

    def __init__(self):
        self.blobs = {}

    def add(self, data, media_type, **extra):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def add_json(self, value, media_type, **extra):
        data = json.dumps(value, indent=None, separators=(",", ":"), sort_keys=True).encode()
        return self.add(data, media_type, **extra)


def layer(binary, path, epoch):
    """One layer: the binary at `path`, 0755, root-owned, at `epoch`."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        with open(binary, "rb") as f:
            data = f.read()
        info = tarfile.TarInfo(path.lstrip("/"))
        info.size, info.mode, info.mtime = len(data), 0o755, epoch
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))
    uncompressed = raw.getvalue()
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0, filename="") as gz:
        gz.write(uncompressed)
    return compressed.getvalue(), "sha256:" + hashlib.sha256(uncompressed).hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dockerfile", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True, help="repository, as the chart names it")
    p.add_argument("--version", required=True)
    p.add_argument("--revision", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--licenses", required=True)
    p.add_argument("binaries", nargs="+", metavar="OS/ARCH=BINARY")
    args = p.parse_args()

    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    created = datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    image = describe(args.dockerfile)
    labels = {
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": args.licenses,
        "org.opencontainers.image.revision": args.revision,
        "org.opencontainers.image.source": args.source,
        "org.opencontainers.image.title": "licensor",
        "org.opencontainers.image.version": args.version,
    }
    blobs = Blobs()
    manifests = []
    for spec in args.binaries:
        platform, sep, binary = spec.partition("=")
        if not sep or not re.fullmatch(r"linux/[a-z0-9]+", platform):
            sys.exit(f"oci-image: {spec}: expected linux/ARCH=PATH")
        arch = platform.split("/")[1]
        gz, diff_id = layer(binary, image["copy"], epoch)
        config = {
            "created": created,
            "architecture": arch,
            "os": "linux",
            "config": {
                "User": image["User"],
                "ExposedPorts": image["ExposedPorts"],
                "Entrypoint": image["Entrypoint"],
                "Cmd": image["Cmd"],
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": created, "created_by": f"COPY licensor {image['copy']}"}],
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": blobs.add_json(config, CONFIG),
            "layers": [blobs.add(gz, LAYER)],
            "annotations": labels,
        }
        manifests.append(
            blobs.add_json(manifest, MANIFEST, platform={"architecture": arch, "os": "linux"})
        )
    reference = f"{args.name}:{args.version}"
    index = blobs.add_json(
        {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests, "annotations": labels},
        INDEX,
        annotations={
            "io.containerd.image.name": reference,
            "org.opencontainers.image.ref.name": args.version,
        },
    )
    top = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [index]}

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def put(name, data):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, epoch
            tar.addfile(info, io.BytesIO(data))

        put("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        put("index.json", json.dumps(top, separators=(",", ":"), sort_keys=True).encode())
        for digest in sorted(blobs.blobs):
            put("blobs/sha256/" + digest.split(":")[1], blobs.blobs[digest])
    os.replace(tmp, args.out)
    print(f"{args.out}: {reference} ({', '.join(b.split('=')[0] for b in args.binaries)}), {index['digest']}")


if __name__ == "__main__":
    main()
