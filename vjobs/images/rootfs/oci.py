"""OCI image layouts, read and unpacked on the host without privilege, as hostile input.

A layout is a folder with ``oci-layout``, ``index.json`` and ``blobs/sha256/`` (what ``skopeo copy
docker://... oci:DIR:TAG`` and ``umoci`` write). ``read_layout`` picks one image from its index (by the tag
``org.opencontainers.image.ref.name``, or the only one; in a multi-platform index, the host's platform) and
reads its manifest; ``unpack`` applies its layers, in order, into an empty folder. What is read is never
trusted:

- a blob is only ever the file its descriptor's ``sha256:`` digest names, never through a link, and is
  refused unless its size and sha256 are the descriptor's; a layer is hashed while it is unpacked, into a
  folder nobody else can reach, which is thrown away if the sum is wrong;
- a layer member whose name is absolute or climbs (``..``), a hard link to a name outside the image, a
  symbolic link whose relative target climbs above the image's root, a device node, a FIFO or a member of any
  other type refuse the layout, naming the layer and the member. An absolute symbolic link is kept as it is:
  in the guest it resolves inside the image;
- nothing is written through a link: every folder on the way is opened relative to the one above it with
  ``O_NOFOLLOW``, and where an earlier layer put a link there (``lib -> usr/lib``), the link is followed as the
  guest would, but inside the folder only (its ``/`` is the folder, and ``..`` stops there);
- bounded: the unpacked files' bytes and the number of members (the site's ``limits.bind_mib`` and the bind
  entry count), the tar streams' bytes, the size of any one tar header, JSON documents;
- whiteouts (``.wh.NAME`` removes NAME from the layers below, ``.wh..wh..opq`` all of its folder's) are
  applied, never written.

Layers are tar streams, plain or gzip; zstd is refused (Python reads no zstd before 3.14; ``skopeo copy
--dest-compress-format gzip`` rewrites a layout). The files on disk are this account's; the owners and modes
the layers give go into the image as mksquashfs pseudo definitions (``Unpacked.pseudo_definitions``).
Extended attributes (file capabilities) are dropped.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from vjobs.errors import ImageError, LimitExceeded
from vjobs.host.tools import disk_full_from

INDEX_TYPES = {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
MANIFEST_TYPES = {"application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json"}
REF_NAME = "org.opencontainers.image.ref.name"
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
MAX_JSON_BYTES = 4 << 20  # an index, a manifest or a config
MAX_READ_BYTES = 8 << 20  # a tar header (pax, GNU long name) larger than this is refused before it is read
MAX_LINKS = 40  # links followed on the way to one member, as the kernel's own bound
CHUNK = 1 << 20
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
KINDS = {"dir": stat.S_IFDIR, "file": stat.S_IFREG, "link": stat.S_IFLNK}


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    compression: str | None  # None or "gzip"


@dataclass(frozen=True)
class OciImage:
    """One image of a layout: ``manifest_digest`` names its content (the layers' digests are in it)."""

    layout: Path
    label: str  # how messages name it: "image /srv/layout:12"
    manifest_digest: str
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int  # of the files unpacked, all layers together
    max_entries: int  # members, all layers together
    setting: str  # where the limit is set, for messages: "limits.bind_mib in /etc/vjobs/site.toml"


# --- the layout --------------------------------------------------------------------------------------------

def read_layout(layout: Path, tag: str | None, label: str) -> OciImage:
    """The image ``tag`` of the layout in ``layout`` (the only one when ``tag`` is None), its manifest and
    config checked; raises ``ImageError`` naming what is wrong and, where a tag is missing, the tags there."""
    version = _json_file(layout / "oci-layout", label).get("imageLayoutVersion")
    if not isinstance(version, str) or not version.startswith("1."):
        raise ImageError(f"{label}: {layout / 'oci-layout'} says imageLayoutVersion {version!r}; vjobs reads "
                         "OCI image layouts of version 1.x")
    index = _json_file(layout / "index.json", label)
    descriptor = _chosen(_descriptors(index, f"{layout / 'index.json'}", label), tag, layout, label)
    for _nested in range(2):  # an index entry may be a multi-platform index itself
        if descriptor.get("mediaType") not in INDEX_TYPES:
            break
        nested = _blob_json(layout, descriptor, label)
        descriptor = _for_this_host(_descriptors(nested, f"the index {descriptor['digest']}", label), label)
    manifest = _blob_json(layout, descriptor, label)
    media_type = manifest.get("mediaType", descriptor.get("mediaType"))
    if media_type not in MANIFEST_TYPES:
        raise ImageError(f"{label}: {descriptor['digest']} is a {media_type or 'document of no mediaType'}, not "
                         f"an image manifest ({', '.join(sorted(MANIFEST_TYPES))})")
    if isinstance(manifest.get("config"), dict):
        _check_platform(_blob_json(layout, manifest["config"], label), label)
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ImageError(f"{label}: the manifest {descriptor['digest']} lists no layers")
    return OciImage(layout, label, descriptor["digest"], tuple(_layer(entry, label) for entry in layers))


def _descriptors(index: dict, where: str, label: str) -> list[dict]:
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise ImageError(f"{label}: {where} lists no images (its \"manifests\" is empty or not a list of "
                         "descriptors)")
    return entries


def _tags(entries: list[dict]) -> list[str]:
    return sorted({str(tag) for entry in entries if (tag := (entry.get("annotations") or {}).get(REF_NAME))})


def _chosen(entries: list[dict], tag: str | None, layout: Path, label: str) -> dict:
    tags = ", ".join(_tags(entries)) or "none"
    if tag is None:
        if len({entry.get("digest") for entry in entries}) == 1:  # one image, maybe under several tags
            return entries[0]
        raise ImageError(f"{label}: the layout {layout} holds {len(entries)} images; name one as "
                         f"{layout}:TAG (tags: {tags})")
    chosen = [entry for entry in entries if (entry.get("annotations") or {}).get(REF_NAME) == tag]
    if not chosen:
        raise ImageError(f"{label}: the layout {layout} has no image tagged {tag!r} (tags: {tags})",
                         code="image_not_found")
    return chosen[0]


def _host_platform() -> str:
    machine = platform.machine()
    return f"linux/{GOARCH.get(machine, machine)}"


def _for_this_host(entries: list[dict], label: str) -> dict:
    def platform_of(entry: dict) -> str:
        given = entry.get("platform") or {}
        return f"{given.get('os', '?')}/{given.get('architecture', '?')}" if isinstance(given, dict) else "?/?"

    for entry in entries:
        if platform_of(entry) == _host_platform():
            return entry
    if len(entries) == 1 and not entries[0].get("platform"):
        return entries[0]
    raise ImageError(f"{label}: no image for {_host_platform()} in its index (there: "
                     f"{', '.join(sorted(platform_of(entry) for entry in entries))})")


def _check_platform(config: dict, label: str) -> None:
    """A config that names another OS or architecture is refused here, not as an exec format error in the guest."""
    given = f"{config.get('os', 'linux')}/{config.get('architecture', _host_platform().split('/')[1])}"
    if given != _host_platform():
        raise ImageError(f"{label}: the image is for {given}; this host's guests run {_host_platform()}")


def _layer(entry: object, label: str) -> Layer:
    if not isinstance(entry, dict):
        raise ImageError(f"{label}: the manifest has a layer that is not a descriptor: {entry!r:.80}")
    digest, size = _digest_and_size(entry, label)
    media_type = str(entry.get("mediaType", ""))
    if media_type.endswith("tar"):
        return Layer(digest, size, None)
    if media_type.endswith(("tar+gzip", "tar.gzip")):
        return Layer(digest, size, "gzip")
    if media_type.endswith("zstd"):
        raise ImageError(f"{label}: layer {digest} is zstd-compressed, which vjobs cannot read yet; rewrite the "
                         "layout with gzip layers: skopeo copy --dest-compress-format gzip oci:IN:TAG oci:OUT:TAG")
    raise ImageError(f"{label}: layer {digest} has the media type {media_type!r}; vjobs reads tar layers, plain "
                     "or gzip")


def _digest_and_size(descriptor: dict, label: str) -> tuple[str, int]:
    digest, size = descriptor.get("digest"), descriptor.get("size")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ImageError(f"{label}: a descriptor's digest {digest!r:.80} is not sha256:<64 hex digits>; vjobs "
                         "reads blobs named by sha256 only")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ImageError(f"{label}: the descriptor of {digest} has no valid size ({size!r:.40})")
    return digest, size


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def _open_regular(path: Path, label: str) -> int:
    """``path`` opened for reading, never through a link, and only if it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(f"{label}: {path} is missing; the layout is incomplete (copy it again with skopeo "
                         "or umoci)") from None
    except OSError as exc:
        why = "is a symbolic link, which vjobs does not follow" if exc.errno == errno.ELOOP else exc.strerror
        raise ImageError(f"{label}: cannot read {path}: {why}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageError(f"{label}: {path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _json_file(path: Path, label: str) -> dict:
    fd = _open_regular(path, label)
    with open(fd, "rb") as handle:
        data = handle.read(MAX_JSON_BYTES + 1)
    return _parsed(data, path, label)


def _blob_json(layout: Path, descriptor: dict, label: str) -> dict:
    digest, size = _digest_and_size(descriptor, label)
    path = blob_path(layout, digest)
    if size > MAX_JSON_BYTES:
        raise ImageError(f"{label}: {path} would be {size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB vjobs "
                         "reads of a JSON document")
    fd = _open_regular(path, label)
    with open(fd, "rb") as handle:
        data = handle.read(MAX_JSON_BYTES + 1)
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest.removeprefix("sha256:"):
        raise ImageError(f"{label}: {path} is not the blob its descriptor names ({size} bytes, {digest}): the "
                         "layout is damaged or was changed by hand")
    return _parsed(data, path, label)


def _parsed(data: bytes, path: Path, label: str) -> dict:
    if len(data) > MAX_JSON_BYTES:
        raise ImageError(f"{label}: {path} is larger than the {MAX_JSON_BYTES >> 20} MiB vjobs reads of a JSON "
                         "document")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{label}: {path} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ImageError(f"{label}: {path} is not a JSON object")
    return document


# --- the layers ---------------------------------------------------------------------------------------------

def unpack(image: OciImage, tree: Path, limits: UnpackLimits) -> Unpacked:
    """Apply ``image``'s layers in order into the empty folder ``tree`` (this account's, reachable by nobody
    else). Raises ``ImageError`` for what the module docstring refuses, ``LimitExceeded`` past ``limits``,
    ``DiskFull`` when the host's disk fills."""
    total = sum(layer.size for layer in image.layers)
    if total > limits.max_bytes:
        raise LimitExceeded(f"{image.label}: its layers take {total >> 20} MiB compressed, more than the "
                            f"{limits.max_bytes >> 20} MiB an image made from a folder may hold ({limits.setting})")
    unpacked = Unpacked(tree, limits, image.label)
    try:
        budget = _Budget(2 * limits.max_bytes + limits.max_entries * 1024, limits, image.label)
        for number, layer in enumerate(image.layers, 1):
            where = f"{image.label}: layer {number} of {len(image.layers)} ({layer.digest[:19]}…)"
            _apply(image.layout, layer, unpacked, budget, where)
    except OSError as exc:
        full = disk_full_from(exc, doing=f"unpacking {image.label}", where=tree)
        if full:
            raise full from exc
        raise
    finally:
        unpacked.close()
    return unpacked


class _Budget:
    """The bytes all the layers' tar streams may hold together, uncompressed: a gzip bomb stops here."""

    def __init__(self, max_bytes: int, limits: UnpackLimits, label: str):
        self.left, self.limits, self.label = max_bytes, limits, label

    def spend(self, count: int) -> None:
        self.left -= count
        if self.left < 0:
            raise LimitExceeded(f"{self.label}: its tar streams hold more than the {self.limits.max_bytes >> 20} MiB "
                                f"of files and {self.limits.max_entries} members an image made from a folder may "
                                f"hold ({self.limits.setting})")


def _apply(layout: Path, layer: Layer, unpacked: Unpacked, budget: _Budget, where: str) -> None:
    path = blob_path(layout, layer.digest)
    fd = _open_regular(path, where)
    with open(fd, "rb") as raw:
        if os.fstat(fd).st_size != layer.size:
            raise ImageError(f"{where}: {path} is {os.fstat(fd).st_size} bytes, its descriptor says {layer.size}: "
                             "the layout is damaged")
        hashing = _Hashing(raw)
        stream = gzip.GzipFile(fileobj=hashing, mode="rb") if layer.compression == "gzip" else hashing
        reader = _Forward(stream, budget, where)
        try:
            with tarfile.open(fileobj=reader, mode="r:") as tar:
                unpacked.start_layer(where)
                while (member := tar.next()) is not None:
                    tar.members.clear()  # tarfile keeps every member it read; vjobs needs none of them again
                    unpacked.apply(member, tar)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            hashing.drain()  # a damaged blob is named as such, not as the tar error it causes
            hashing.check(layer, path, where)
            raise ImageError(f"{where}: {path} is not a readable tar{' (gzip)' if layer.compression else ''}: "
                             f"{exc}") from None
        hashing.drain()
        hashing.check(layer, path, where)


class _Hashing:
    """The blob as it is read: hashed and counted on the way."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha256, self.count = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.count += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def check(self, layer: Layer, path: Path, where: str) -> None:
        if self.count != layer.size or f"sha256:{self.sha256.hexdigest()}" != layer.digest:
            raise ImageError(f"{where}: {path} is not the blob its descriptor names ({layer.size} bytes, "
                             f"{layer.digest}): the layout is damaged or was changed by hand")


class _Forward:
    """The uncompressed tar stream as tarfile reads it: forward only (a seek reads and discards, so every byte
    of the blob is hashed), no one read larger than ``MAX_READ_BYTES`` (tarfile reads a pax header or a GNU
    long name whole, whatever size its header claims), every byte spent from ``budget``."""

    def __init__(self, stream, budget: _Budget, where: str):
        self.stream, self.budget, self.where, self.position = stream, budget, where, 0

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_READ_BYTES:
            raise ImageError(f"{self.where}: a tar header of {size} bytes at offset {self.position}, more than the "
                             f"{MAX_READ_BYTES >> 20} MiB vjobs reads of one")
        data = self.stream.read(size)
        self.position += len(data)
        self.budget.spend(len(data))
        return data

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        target = offset if whence == os.SEEK_SET else self.position + offset
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < self.position:
            raise tarfile.ReadError("a layer is read forward only")
        while self.position < target and self.read(min(CHUNK, target - self.position)):
            pass
        return self.position


@dataclass
class _Entry:
    kind: str  # a key of KINDS
    mode: int  # permission bits, setuid, setgid and sticky included
    uid: int
    gid: int
    mtime_ns: int


class _Refused(Exception):
    """What is wrong with one member; ``Unpacked.apply`` names the layer and the member."""


@dataclass
class Unpacked:
    """The folder the layers are applied to, and what the layers said of each entry in it (the files on disk
    are this account's, folders 0700 and files 0600, so that it can write and read them all)."""

    tree: Path
    limits: UnpackLimits
    label: str
    entries: dict[str, _Entry] = field(default_factory=dict)  # "usr/bin/env" -> what the layers said
    file_bytes: int = 0
    members: int = 0

    def __post_init__(self):
        self.root_fd = os.open(self.tree, DIR_FLAGS)
        self.where = self.label
        self.added: set[str] = set()  # what the current layer put there: whiteouts spare it

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def start_layer(self, where: str) -> None:
        self.where, self.added = where, set()

    # --- one member ---

    def apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self.members += 1
        if self.members > self.limits.max_entries:
            raise LimitExceeded(f"{self.where}: more than {self.limits.max_entries} members in the layers, more than "
                                f"an image made from a folder may hold ({self.limits.setting})")
        try:
            parts = _name_parts(member.name)
            if not parts:
                if not member.isdir():
                    raise _Refused("the image's root is not a folder")
                return
            opened = self._walk(parts[:-1], create=not parts[-1].startswith(".wh."))
            if opened is None:  # a whiteout in a folder no layer made: nothing to remove
                return
            folder_fd, folder = opened
            try:
                self._apply_at(member, tar, folder_fd, folder, parts[-1])
            finally:
                os.close(folder_fd)
        except _Refused as refusal:
            raise ImageError(f"{self.where}: member {member.name!r}: {refusal}; the image is refused") from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise
            raise ImageError(f"{self.where}: member {member.name!r} cannot be unpacked: {exc.strerror}") from None

    def _apply_at(self, member: tarfile.TarInfo, tar: tarfile.TarFile, folder_fd: int, folder: tuple[str, ...],
                  name: str) -> None:
        if name == ".wh..wh..opq":
            self._clear_lower(folder_fd, folder)
            return
        if name.startswith(".wh..wh."):  # aufs' own bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content
            return
        if name.startswith(".wh."):
            hidden = name[4:]
            if hidden not in ("", ".", "..") and _key(folder + (hidden,)) not in self.added:
                self._remove(folder_fd, hidden)
            return
        key = _key(folder + (name,))
        entry = _Entry("dir", _mode(member), _id(member.uid), _id(member.gid), _mtime_ns(member))
        if member.isdir():
            if not self._is_folder(folder_fd, name):
                self._remove(folder_fd, name)
                os.mkdir(name, 0o700, dir_fd=folder_fd)
        elif member.isreg():
            entry.kind = "file"
            self._write_file(member, tar, folder_fd, name, entry.mtime_ns)
        elif member.issym():
            entry.kind, entry.mode = "link", 0o777
            _check_link_target(member.linkname, folder)
            self._remove(folder_fd, name)
            os.symlink(member.linkname, name, dir_fd=folder_fd)
            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=folder_fd, follow_symlinks=False)
        elif member.islnk():
            entry = self._hard_link(member.linkname, folder_fd, name, key)
        elif member.ischr() or member.isblk():
            raise _Refused("a device node; an image's /dev is the guest's own, so vjobs takes no device from a "
                           "layer")
        else:
            raise _Refused("a FIFO" if member.isfifo() else f"a tar member of type {member.type!r}, which an "
                           "image made by vjobs cannot hold")
        self.entries[key] = entry
        self.added.add(key)

    def _write_file(self, member: tarfile.TarInfo, tar: tarfile.TarFile, folder_fd: int, name: str,
                    mtime_ns: int) -> None:
        self.file_bytes += member.size
        if self.file_bytes > self.limits.max_bytes:
            raise LimitExceeded(f"{self.where}: member {member.name!r} ({member.size >> 20} MiB) takes the image's "
                                f"files past the {self.limits.max_bytes >> 20} MiB an image made from a folder may "
                                f"hold ({self.limits.setting})")
        self._remove(folder_fd, name)  # never written through: another name may be a hard link to it
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=folder_fd)
        with open(fd, "wb") as target:
            source = tar.extractfile(member)
            while chunk := source.read(CHUNK):
                target.write(chunk)
            target.flush()
            os.utime(fd, ns=(mtime_ns, mtime_ns))

    def _hard_link(self, linkname: str, folder_fd: int, name: str, key: str) -> _Entry:
        try:
            parts = _name_parts(linkname)
        except _Refused as refusal:
            raise _Refused(f"a hard link to {linkname!r}, outside the image ({refusal})") from None
        opened = self._walk(parts[:-1], create=False) if parts else None
        if opened is None:
            raise _Refused(f"a hard link to {linkname!r}, which no layer before it made")
        source_fd, source_folder = opened
        try:
            source_key = _key(source_folder + (parts[-1],))
            try:
                info = os.stat(parts[-1], dir_fd=source_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise _Refused(f"a hard link to {linkname!r}, which no layer before it made") from None
            if stat.S_ISDIR(info.st_mode):
                raise _Refused(f"a hard link to the folder {linkname!r}")
            if source_key != key:
                self._remove(folder_fd, name)
                os.link(parts[-1], name, src_dir_fd=source_fd, dst_dir_fd=folder_fd, follow_symlinks=False)
        finally:
            os.close(source_fd)
        return self.entries.get(source_key) or _Entry("file", 0o644, 0, 0, info.st_mtime_ns)

    # --- the folder, never through a link ---

    def _walk(self, parts: tuple[str, ...], *, create: bool) -> tuple[int, tuple[str, ...]] | None:
        """The folder ``parts`` names, opened, and its path in the tree: each folder on the way opened with
        O_NOFOLLOW in the one above; a link on the way followed as the guest would, but inside the tree only (an
        absolute target starts at the tree, ``..`` stops there). Missing folders are made with ``create`` (as
        container engines do, 0755 root), else the answer is None."""
        pending, resolved, followed = list(parts), [], 0
        fd = os.dup(self.root_fd)
        try:
            while pending:
                part = pending.pop(0)
                if part in ("", "."):
                    continue
                if part == "..":
                    if resolved:
                        resolved.pop()
                        fd = _replace(fd, os.open("..", DIR_FLAGS, dir_fd=fd))
                    continue
                try:
                    fd = _replace(fd, os.open(part, DIR_FLAGS, dir_fd=fd))
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(part, 0o700, dir_fd=fd)
                    made = _key((*resolved, part))
                    self.entries[made] = _Entry("dir", 0o755, 0, 0, 0)
                    self.added.add(made)
                    fd = _replace(fd, os.open(part, DIR_FLAGS, dir_fd=fd))
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    if not stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise _Refused(f"it lies under {_key((*resolved, part))}, which is not a folder") from None
                    followed += 1
                    if followed > MAX_LINKS:
                        raise _Refused(f"more than {MAX_LINKS} links on the way to it") from None
                    target = os.readlink(part, dir_fd=fd)
                    if target.startswith("/"):
                        fd, resolved = _replace(fd, os.dup(self.root_fd)), []
                    pending = target.split("/") + pending
                    continue
                resolved.append(part)
            return fd, tuple(resolved)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _is_folder(folder_fd: int, name: str) -> bool:
        try:
            return stat.S_ISDIR(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
        except FileNotFoundError:
            return False

    @staticmethod
    def _remove(folder_fd: int, name: str) -> None:
        """Remove ``name`` in the folder, whatever it is (a folder with all it holds)."""
        try:
            info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(name, dir_fd=folder_fd)
        else:
            os.unlink(name, dir_fd=folder_fd)

    def _clear_lower(self, folder_fd: int, folder: tuple[str, ...]) -> None:
        """An opaque whiteout: what the layers below put in the folder goes; what this layer put stays."""
        for name in os.listdir(folder_fd):
            key = _key(folder + (name,))
            if key not in self.added:
                self._remove(folder_fd, name)
            elif self._is_folder(folder_fd, name):
                inner = os.open(name, DIR_FLAGS, dir_fd=folder_fd)
                try:
                    self._clear_lower(inner, folder + (name,))
                finally:
                    os.close(inner)

    # --- once every layer is in ---

    def pseudo_definitions(self) -> bytes:
        """For ``mksquashfs -pf``: each entry's mode, owner and group as the layers gave them, one line each
        (``"NAME" m MODE UID GID``). A folder's modification time, which adding what it holds moved, is set
        back here too. Entries a later layer removed are left out."""
        lines = []
        for key, entry in sorted(self.entries.items()):
            if self._settle(key, entry):
                quoted = key.replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'"{quoted}" m {entry.mode:o} {entry.uid} {entry.gid}\n')
        return "".join(lines).encode("utf-8", "surrogateescape")

    def _settle(self, key: str, entry: _Entry) -> bool:
        """Whether ``key`` is still the kind of entry the layers said (no link followed on the way); a folder's
        modification time set to the layer's."""
        parts = key.split("/")
        fd = os.open(self.tree, DIR_FLAGS)
        try:
            for part in parts[:-1]:
                fd = _replace(fd, os.open(part, DIR_FLAGS, dir_fd=fd))
            info = os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
            if stat.S_IFMT(info.st_mode) != KINDS[entry.kind]:
                return False
            if entry.kind == "dir":
                os.utime(parts[-1], ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
            return True
        except OSError:  # gone, or under what is no longer a folder
            return False
        finally:
            os.close(fd)


def _replace(old_fd: int, new_fd: int) -> int:
    os.close(old_fd)
    return new_fd


def _key(parts: tuple[str, ...]) -> str:
    return "/".join(parts)


def _name_parts(name: str) -> tuple[str, ...]:
    """A member's name as the path inside the image; refused when it is absolute, climbs or cannot be named to
    mksquashfs (a control character)."""
    if name.startswith("/"):
        raise _Refused("an absolute name; a layer names what it holds relative to the image's root")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _Refused("a name that climbs out of the image with '..'")
    if any(ord(character) < 32 for part in parts for character in part):
        raise _Refused("a name with a control character")
    return parts


def _check_link_target(target: str, folder: tuple[str, ...]) -> None:
    """A relative symbolic link may not climb above the image's root: in the guest it would stop at the root and
    name something else than it says; on the host it would name the host's files."""
    if not target:
        raise _Refused("a symbolic link to nothing")
    if target.startswith("/"):
        return
    depth = len(folder)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise _Refused(f"a symbolic link to {target!r}, which points outside the image")
        elif part not in ("", "."):
            depth += 1


def _mode(member: tarfile.TarInfo) -> int:
    return stat.S_IMODE(member.mode)


def _id(number: int) -> int:
    return number if 0 <= number < 1 << 32 else 65534  # squashfs ids are 32-bit; nobody for anything else


def _mtime_ns(member: tarfile.TarInfo) -> int:
    return int(min(max(member.mtime, 0), (1 << 32) - 1)) * 1_000_000_000  # squashfs times: 32-bit seconds
