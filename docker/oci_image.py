#!/usr/bin/env python3
"""Writes a single-layer OCI image archive (an OCI image layout in a tar) without a daemon.

`docker/build-images.sh` uses it to build the project's images where no Docker engine or
registry exists; `ctr images import` (or `skopeo copy oci-archive:...`) reads the result. The
layout follows the OCI image spec: `oci-layout`, `index.json`, and content-addressed blobs
(config, manifest, one gzip layer). Output is reproducible: every file has mtime 0 and owner
root, entries are sorted, gzip carries no timestamp, so the same inputs give the same digests.

    oci_image.py --out agent.tar --name ghcr.io/x/agent:0.1.0 --base nonroot \
        --file target/.../klm-agent:/usr/local/bin/klm-agent:0755 \
        --user 65532:65532 --entrypoint /usr/local/bin/klm-agent --expose 8080
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

# The files distroless/static:nonroot provides that a static binary may read: the users
# (root, nonroot 65532, nobody), the name-service order, CA certificates, and writable /tmp.
PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
    "nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n"
)
GROUP = "root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n"
NSSWITCH = "passwd: files\ngroup: files\nhosts: files dns\n"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def add_dir(tar, path, mode=0o755, uid=0):
    info = tarfile.TarInfo(path.lstrip("/"))
    info.type = tarfile.DIRTYPE
    info.mode = mode
    info.uid = info.gid = uid
    tar.addfile(info)


def add_bytes(tar, path, data, mode=0o644):
    info = tarfile.TarInfo(path.lstrip("/"))
    info.size = len(data)
    info.mode = mode
    tar.addfile(info, io.BytesIO(data))


def layer_tar(files, dirs, base):
    """The layer as an uncompressed tar (bytes). files: [(src, dest, mode)]; dirs: [(dest, mode, uid)]."""
    entries = {}  # dest -> ("dir", mode, uid) | ("file", bytes, mode)
    if base == "nonroot":
        for d in ("/etc", "/etc/ssl", "/etc/ssl/certs", "/home", "/usr", "/usr/local", "/usr/local/bin", "/usr/bin"):
            entries[d] = ("dir", 0o755, 0)
        entries["/home/nonroot"] = ("dir", 0o700, 65532)
        entries["/tmp"] = ("dir", 0o1777, 0)
        entries["/etc/passwd"] = ("file", PASSWD.encode(), 0o644)
        entries["/etc/group"] = ("file", GROUP.encode(), 0o644)
        entries["/etc/nsswitch.conf"] = ("file", NSSWITCH.encode(), 0o644)
        if not os.path.isfile(CA_BUNDLE):
            sys.exit(f"oci_image.py: {CA_BUNDLE} is missing (Debian: apt-get install ca-certificates)")
        with open(CA_BUNDLE, "rb") as f:
            entries[CA_BUNDLE] = ("file", f.read(), 0o644)
    for dest, mode, uid in dirs:
        entries[dest] = ("dir", mode, uid)
    for src, dest, mode in files:
        with open(src, "rb") as f:
            entries[dest] = ("file", f.read(), mode)
        # Parent directories, so the layer stands on its own.
        parent = os.path.dirname(dest)
        while parent not in ("", "/") and parent not in entries:
            entries[parent] = ("dir", 0o755, 0)
            parent = os.path.dirname(parent)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dest in sorted(entries):
            kind = entries[dest]
            if kind[0] == "dir":
                add_dir(tar, dest, kind[1], kind[2])
            else:
                add_bytes(tar, dest, kind[1], kind[2])
    return buf.getvalue()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the OCI archive to write (.tar)")
    ap.add_argument("--name", action="append", required=True, help="full image reference; repeatable")
    ap.add_argument("--base", choices=["nonroot", "scratch"], default="scratch",
                    help="nonroot: distroless/static's users, CA bundle, /tmp; scratch: nothing")
    ap.add_argument("--file", action="append", default=[], help="SRC:DEST:MODE (octal)")
    ap.add_argument("--dir", action="append", default=[], help="DEST:MODE[:UID]")
    ap.add_argument("--user", default="")
    ap.add_argument("--entrypoint", action="append", default=[], help="one argv word; repeatable")
    ap.add_argument("--cmd", action="append", default=[], help="one argv word; repeatable")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE; repeatable")
    ap.add_argument("--expose", action="append", default=[], help="TCP port; repeatable")
    args = ap.parse_args()

    files = []
    for spec in args.file:
        src, dest, mode = spec.rsplit(":", 2)
        files.append((src, dest, int(mode, 8)))
    dirs = []
    for spec in args.dir:
        parts = spec.split(":")
        dirs.append((parts[0], int(parts[1], 8), int(parts[2]) if len(parts) > 2 else 0))

    layer = layer_tar(files, dirs, args.base)
    layer_gz = gzip.compress(layer, compresslevel=6, mtime=0)
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] + args.env
    config = {
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": args.user,
            "Env": env,
            "Entrypoint": args.entrypoint or None,
            "Cmd": args.cmd or None,
            "WorkingDir": "/",
            "ExposedPorts": {f"{p}/tcp": {} for p in args.expose} or None,
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "docker/oci_image.py"}],
    }
    config["config"] = {k: v for k, v in config["config"].items() if v}
    config_b = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256(config_b), "size": len(config_b)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256(layer_gz), "size": len(layer_gz)}],
    }
    manifest_b = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": sha256(manifest_b),
                "size": len(manifest_b),
                "platform": {"architecture": "amd64", "os": "linux"},
                # containerd names an imported image by the first; other tools by the tag.
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
            }
            for name in args.name
        ],
    }
    index_b = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(tar, "index.json", index_b)
        add_dir(tar, "blobs")
        add_dir(tar, "blobs/sha256")
        for blob in sorted((config_b, manifest_b, layer_gz), key=sha256):
            add_bytes(tar, "blobs/sha256/" + sha256(blob).split(":")[1], blob)
    os.replace(tmp, args.out)
    print(f"{args.out}: {', '.join(args.name)} layer {len(layer_gz)} B compressed, "
          f"{len(layer)} B uncompressed, manifest {sha256(manifest_b)}")


if __name__ == "__main__":
    main()
