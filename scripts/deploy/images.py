#!/usr/bin/env python3
"""Test images for scripts/test-deploy: made from random bytes, pushed to a
real registry (distribution 2.8) over its HTTP API, and checked after they
were pulled through regcache. Standard library only.

  images.py push REGISTRY SET EXPECTED.json [--user U --password P]
      builds the images of SET (hub, ghcr or priv), pushes them to
      http://REGISTRY and records their digests in EXPECTED.json (merged).
  images.py get EXPECTED.json KEY FIELD
      prints one recorded value (digest, manifest, config, repo, tag, ...).
  images.py verify-dir EXPECTED.json KEY DIR
      checks a `skopeo copy ... dir:DIR` of KEY: the manifest is the expected
      (platform) manifest byte for byte and every blob hashes to its name.
"""

import base64
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# SET -> images: key, repository, tag, format, layer sizes (an index has one
# entry per platform).
SETS = {
    # the Docker Hub stand-in: what `docker pull alpine:3.20` asks for
    "hub": [
        ("alpine", "library/alpine", "3.20", "index", {"amd64": [384 << 10], "arm64": [128 << 10]}),
        ("hello", "library/hello", "latest", "docker", [16 << 10]),
    ],
    # the ghcr.io stand-in
    "ghcr": [
        ("app", "org/app", "1.0", "oci", [32 << 10, 256 << 10, 1536 << 10]),
    ],
    # the private registry (HTTP Basic auth)
    "priv": [
        ("secret", "team/secret", "1.0", "docker", [64 << 10, 8 << 10]),
    ],
}


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer(size, name):
    """A gzipped tar holding one file of random bytes: (blob, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(f"regcache-ci/{name}.bin")
        info.size = size
        info.mtime = 0
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    tar_bytes = raw.getvalue()
    blob = gzip.compress(tar_bytes, mtime=0)
    return blob, sha256(tar_bytes)


class Registry:
    def __init__(self, addr, user=None, password=None):
        self.base = f"http://{addr}"
        self.auth = None
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.auth = f"Basic {token}"

    def request(self, method, url, data=None, headers=None):
        if not url.startswith("http"):
            url = self.base + url
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.auth:
            req.add_header("Authorization", self.auth)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            raise SystemExit(f"{method} {url}: {e.code} {e.read()[:300]!r}")

    def push_blob(self, repo, blob):
        digest = sha256(blob)
        _, headers, _ = self.request("POST", f"/v2/{repo}/blobs/uploads/", data=b"")
        location = headers["Location"]
        if not location.startswith("http"):
            location = self.base + location
        sep = "&" if "?" in location else "?"
        self.request(
            "PUT",
            f"{location}{sep}digest={digest}",
            data=blob,
            headers={"Content-Type": "application/octet-stream"},
        )
        return digest

    def push_manifest(self, repo, ref, body, media_type):
        self.request("PUT", f"/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media_type})
        return sha256(body)


def image(reg, repo, name, sizes, fmt, arch="amd64"):
    """Pushes the blobs and the manifest (by digest) of one platform image."""
    docker = fmt == "docker"
    layers, diff_ids = [], []
    for i, size in enumerate(sizes):
        blob, diff_id = layer(size, f"{name}-{arch}-{i}")
        layers.append({
            "mediaType": DOCKER_LAYER if docker else OCI_LAYER,
            "size": len(blob),
            "digest": reg.push_blob(repo, blob),
        })
        diff_ids.append(diff_id)
    config = json.dumps({
        "architecture": arch,
        "os": "linux",
        "created": "2026-01-01T00:00:00Z",
        "config": {"Cmd": ["/regcache-ci/none"], "Labels": {"org.regcache.ci": name}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2026-01-01T00:00:00Z", "created_by": f"regcache-ci layer {i}"} for i in range(len(sizes))],
    }, sort_keys=True).encode()
    config_desc = {
        "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
        "size": len(config),
        "digest": reg.push_blob(repo, config),
    }
    manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
                "config": config_desc, "layers": layers}
    body = json.dumps(manifest, indent=3).encode()
    media_type = manifest["mediaType"]
    digest = reg.push_manifest(repo, sha256(body), body, media_type)
    return {
        "manifest": digest,
        "manifest_media_type": media_type,
        "manifest_size": len(body),
        "config": config_desc["digest"],
        "layers": [l["digest"] for l in layers],
        "diff_ids": diff_ids,
    }


def push(addr, set_name, expected_path, user=None, password=None):
    reg = Registry(addr, user, password)
    expected = {}
    if os.path.exists(expected_path):
        with open(expected_path) as f:
            expected = json.load(f)
    for key, repo, tag, fmt, sizes in SETS[set_name]:
        rec = {"registry": addr, "repo": repo, "tag": tag, "format": fmt}
        if fmt == "index":
            children = {arch: image(reg, repo, key, s, "oci", arch) for arch, s in sizes.items()}
            index = {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {"mediaType": c["manifest_media_type"], "size": c["manifest_size"], "digest": c["manifest"],
                     "platform": {"architecture": arch, "os": "linux"}}
                    for arch, c in children.items()
                ],
            }
            body = json.dumps(index, indent=3).encode()
            rec["digest"] = reg.push_manifest(repo, tag, body, OCI_INDEX)
            rec.update({k: children["amd64"][k] for k in ("manifest", "config", "layers", "diff_ids")})
        else:
            one = image(reg, repo, key, sizes, fmt)
            body_digest = one["manifest"]
            # Tag the very same bytes.
            status, _, body = reg.request("GET", f"/v2/{repo}/manifests/{body_digest}",
                                          headers={"Accept": one["manifest_media_type"]})
            rec["digest"] = reg.push_manifest(repo, tag, body, one["manifest_media_type"])
            assert rec["digest"] == body_digest
            rec.update({k: one[k] for k in ("manifest", "config", "layers", "diff_ids")})
        expected[key] = rec
        print(f"pushed {addr}/{repo}:{tag} {rec['digest']}")
    with open(expected_path, "w") as f:
        json.dump(expected, f, indent=2)


def verify_dir(expected_path, key, d):
    with open(expected_path) as f:
        rec = json.load(f)[key]
    with open(os.path.join(d, "manifest.json"), "rb") as f:
        body = f.read()
    if sha256(body) != rec["manifest"]:
        raise SystemExit(f"{key}: manifest {sha256(body)} != expected {rec['manifest']}")
    for digest in [rec["config"], *rec["layers"]]:
        path = os.path.join(d, digest.split(":", 1)[1])
        with open(path, "rb") as f:
            got = sha256(f.read())
        if got != digest:
            raise SystemExit(f"{key}: blob {digest} hashes to {got}")
    print(f"{key}: manifest {rec['manifest']} and {1 + len(rec['layers'])} blobs verified")


def main(argv):
    if len(argv) >= 4 and argv[0] == "push":
        user = password = None
        rest = argv[4:]
        if rest:
            opts = dict(zip(rest[::2], rest[1::2]))
            user, password = opts["--user"], opts["--password"]
        push(argv[1], argv[2], argv[3], user, password)
    elif len(argv) == 4 and argv[0] == "get":
        with open(argv[1]) as f:
            value = json.load(f)[argv[2]][argv[3]]
        print(" ".join(value) if isinstance(value, list) else value)
    elif len(argv) == 4 and argv[0] == "verify-dir":
        verify_dir(argv[1], argv[2], argv[3])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
