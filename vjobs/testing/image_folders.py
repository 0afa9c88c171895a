"""Image folders for tests (vjobs/images/rootfs/folders.py): a tiny unpacked root file system (the host's static
busybox, a few links, ``/etc/os-release``), and OCI image layouts written here from tar layers a test builds
member by member, hostile ones included, or made by ``umoci`` where it is installed."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

OS_RELEASE = 'NAME="vjobs tiny"\nID=vjobs-tiny\n'
COMMANDS = ("sh", "cat", "echo", "ls", "stat", "id")
# What the guest agent mounts or binds over in the payload's root (vjobs/guest/agent/payload-ns.sh).
MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp")
MTIME = 1700000000
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"


def tiny_root(folder: Path, os_release: str = OS_RELEASE) -> Path:
    """A root file system tree in ``folder``: busybox-static as ``/bin/busybox`` with links for ``COMMANDS``."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    (folder / "bin").mkdir(parents=True)
    shutil.copy(busybox, folder / "bin" / "busybox")
    for command in COMMANDS:
        (folder / "bin" / command).symlink_to("busybox")
    (folder / "etc").mkdir()
    (folder / "etc" / "os-release").write_text(os_release)
    for name in MOUNT_POINTS:
        (folder / name).mkdir()
    return folder


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", *, mode: int | None = None,
           linkname: str = "", uid: int = 0, gid: int = 0, devmajor: int = 0) -> tuple[tarfile.TarInfo, bytes | None]:
    """One tar member as a layer holds it: a file with ``data``, or a folder, link, device... (``kind``)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.uid, info.gid, info.mtime = kind, linkname, uid, gid, MTIME
    info.mode = mode if mode is not None else (0o755 if kind == tarfile.DIRTYPE else 0o644)
    info.devmajor = devmajor
    if kind != tarfile.REGTYPE:
        return info, None
    info.size = len(data)
    return info, data


def layer(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A layer's tar (uncompressed) holding ``members`` in that order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def tree_layer(root: Path) -> bytes:
    """A layer holding the tree ``root`` (names relative to it, owned by root)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for folder, dirs, files in os.walk(root):
            for name in sorted(dirs + files):
                path = Path(folder, name)
                info = tar.gettarinfo(str(path), arcname=str(path.relative_to(root)))
                info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
                if info.isreg():
                    with open(path, "rb") as data:
                        tar.addfile(info, data)
                else:
                    tar.addfile(info)
    return out.getvalue()


def write_layout(folder: Path, layers: list[bytes], tags: tuple[str, ...] = ("latest",), *, compress: bool = True,
                 architecture: str = "amd64", layer_type: str | None = None) -> str:
    """An OCI image layout in ``folder`` whose one image has ``layers`` (gzip, or plain tar), under ``tags``;
    more images may be added by calling it again. ``layer_type``: a media type to give the layers instead
    (their bytes as they are). Returns the image's manifest digest."""
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def blob(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    if layer_type:
        descriptors = [blob(data, layer_type) for data in layers]
    else:
        descriptors = [blob(gzip.compress(data, mtime=0), f"{LAYER_TYPE}+gzip") if compress else
                       blob(data, LAYER_TYPE) for data in layers]
    diff_ids = [f"sha256:{hashlib.sha256(data).hexdigest()}" for data in layers]
    config = blob(json.dumps({"architecture": architecture, "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode(),
                  "application/vnd.oci.image.config.v1+json")
    manifest = blob(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                "config": config, "layers": descriptors}).encode(),
                    "application/vnd.oci.image.manifest.v1+json")
    (folder / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index_file = folder / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] += [{**manifest, "annotations": {REF_NAME: tag}} for tag in tags]
    index_file.write_text(json.dumps(index))
    return manifest["digest"]


def layer_blobs(folder: Path, tag: str | None = None) -> list[Path]:
    """The layer files of the image ``tag`` (the first one by default) of the layout in ``folder``."""
    index = json.loads((folder / "index.json").read_text())["manifests"]
    chosen = next(entry for entry in index if tag in (None, entry["annotations"][REF_NAME]))
    manifest = json.loads((folder / "blobs" / "sha256" / chosen["digest"][7:]).read_text())
    return [folder / "blobs" / "sha256" / entry["digest"][7:] for entry in manifest["layers"]]


def umoci_layout(root: Path, folder: Path, tag: str, *, removed: tuple[str, ...] = ()) -> None:
    """A layout made by umoci: ``root`` inserted as one layer, then a whiteout layer per path in ``removed``."""
    def umoci(*words: str) -> None:
        subprocess.run(["umoci", *words], check=True, capture_output=True, timeout=120)

    umoci("init", "--layout", str(folder))
    umoci("new", "--image", f"{folder}:{tag}")
    umoci("insert", "--image", f"{folder}:{tag}", str(root), "/")
    for path in removed:
        umoci("insert", "--image", f"{folder}:{tag}", "--whiteout", path)
