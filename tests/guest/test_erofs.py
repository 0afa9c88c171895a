"""The inputs' erofs (vjobs/guest/erofs.py), read back by erofs-utils' own checker, never mounted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vjobs.guest.erofs import write_erofs


def _listing(root: Path) -> list[str]:
    """Each entry's path, type and mode, size (files and links), mtime and content or link target."""
    lines = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder, name)
            info = path.lstat()
            what = os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else b""
            size = info.st_size if not path.is_dir() else 0
            lines.append(f"{path.relative_to(root)} {info.st_mode:o} {size} {info.st_mtime_ns} {what!r}")
    return sorted(lines)


def _extracted(image: Path, target: Path) -> Path:
    checked = subprocess.run(["fsck.erofs", f"--extract={target}", "--preserve", str(image)], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return target


def test_an_image_holds_the_folder_as_it_is(tmp_path):
    source = tmp_path / "in"
    (source / "a" / "b").mkdir(parents=True)
    (source / "empty").mkdir()
    (source / "a" / "b" / "f").write_text("hi\n")
    os.link(source / "a" / "b" / "f", source / "hard")
    (source / "link").symlink_to("a/b/f")
    (source / "big").write_bytes(os.urandom(3 * 4096 + 17))
    (source / "zero").write_bytes(b"")
    (source / "big").chmod(0o640)
    os.mkfifo(source / "fifo")
    for number in range(600):  # a folder of several blocks of entries
        (source / "a" / f"a-longish-name-{number:04d}").write_text(str(number))
    (source / os.fsdecode(b"caf\xe9")).write_text("latin-1 name")
    os.utime(source / "a" / "b" / "f", ns=(1, 1_234_567_891_123_456_789))
    image = tmp_path / "in.erofs"
    write_erofs(source, image)
    assert image.stat().st_size % 4096 == 0
    extracted = _extracted(image, tmp_path / "out")
    assert _listing(extracted) == _listing(source)
    node = subprocess.run(["dump.erofs", "--path=/hard", str(image)], capture_output=True, text=True).stdout
    assert "Links: 2" in node  # hard links stay one inode


def test_an_owner_for_every_file(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "f").write_text("x")
    write_erofs(tmp_path / "in", tmp_path / "in.erofs", owner=65534)
    for path in ("/", "/sub", "/sub/f"):
        node = subprocess.run(["dump.erofs", f"--path={path}", str(tmp_path / "in.erofs")], capture_output=True,
                              text=True).stdout
        assert "Uid: 65534   Gid: 65534" in node, node
