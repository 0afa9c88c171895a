"""Reading what an untrusted guest wrote onto its io disk."""

import io
import tarfile

import pytest

from vjobs.collect import read_results
from vjobs.errors import VMError

STATUS = b"exit_code=3\nstarted_s=1.0\nended_s=2.5\n"


def write_disk(path, members, size=1 << 20):
    """members: (TarInfo, bytes|None) pairs, written as the guest would, onto a zero-filled raw disk."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    payload = buffer.getvalue()
    with open(path, "wb") as disk:
        disk.write(payload)
        disk.truncate(max(size, len(payload)))
    return path


def regular(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def special(name, kind, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def test_reads_status_streams_and_outputs_in_subfolders(tmp_path):
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS), regular("vjobs/stdout", b"hello\n"),
                                            regular("work/out/deep/result.txt", b"42\n")])
    results = read_results(disk, tmp_path / "got", 1 << 20)
    assert results.exit_code == 3
    assert (tmp_path / "got" / "stdout").read_bytes() == b"hello\n"
    assert (tmp_path / "got" / "outputs" / "out" / "deep" / "result.txt").read_bytes() == b"42\n"
    assert [o.path for o in results.outputs] == ["out/deep/result.txt"]
    assert results.outputs[0].size == 3


@pytest.mark.parametrize("name", ["/etc/passwd", "work/../../escape", "../escape", "elsewhere/file"])
def test_unsafe_names_refuse_everything(tmp_path, name):
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS), regular("work/ok", b"ok"),
                                            regular(name, b"evil")])
    with pytest.raises(VMError) as caught:
        read_results(disk, tmp_path / "got", 1 << 20)
    assert caught.value.code == "unsafe_output"
    assert not (tmp_path / "got").exists()
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("kind, label", [(tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"),
                                         (tarfile.CHRTYPE, "device"), (tarfile.FIFOTYPE, "FIFO")])
def test_links_and_devices_are_skipped_and_reported(tmp_path, kind, label):
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS), special("work/link", kind, "/etc/shadow"),
                                            regular("work/real", b"data")])
    results = read_results(disk, tmp_path / "got", 1 << 20)
    assert not (tmp_path / "got" / "outputs" / "link").exists()
    assert [r["path"] for r in results.rejected] == ["link"]
    assert label in results.rejected[0]["reason"]
    assert [o.path for o in results.outputs] == ["real"]


def test_file_behind_a_symlinked_folder_cannot_escape(tmp_path):
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS),
                                            special("work/dir", tarfile.SYMTYPE, str(tmp_path)),
                                            regular("work/dir/planted", b"x")])
    read_results(disk, tmp_path / "got", 1 << 20)
    assert not (tmp_path / "planted").exists()


def test_results_larger_than_the_limit_are_refused(tmp_path):
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS), regular("work/big", b"x" * 5000)])
    with pytest.raises(VMError) as caught:
        read_results(disk, tmp_path / "got", 4096)
    assert caught.value.code == "output_too_large"
    assert not (tmp_path / "got").exists()


def test_a_disk_still_holding_the_job_means_no_results(tmp_path):
    disk = write_disk(tmp_path / "io.raw", [regular("VJOBS-IO-DISK", b"vjobs io disk 1\n")])
    with pytest.raises(VMError) as caught:
        read_results(disk, tmp_path / "got", 1 << 20)
    assert caught.value.code == "no_results"


def test_a_zeroed_disk_means_no_results(tmp_path):
    disk = tmp_path / "io.raw"
    disk.write_bytes(b"\0" * 65536)
    with pytest.raises(VMError) as caught:
        read_results(disk, tmp_path / "got", 1 << 20)
    assert caught.value.code == "no_results"


def test_duplicate_entries_do_not_overwrite(tmp_path):
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS), regular("work/a", b"first"),
                                            regular("work/a", b"second")])
    results = read_results(disk, tmp_path / "got", 1 << 20)
    assert (tmp_path / "got" / "outputs" / "a").read_bytes() == b"first"
    assert results.rejected and results.rejected[0]["path"] == "a"


def test_a_stream_named_twice_is_unsafe_output(tmp_path):
    """Found by the fuzz campaign (fuzz/run.py, surface results): a second vjobs/stdout made
    read_results raise FileExistsError instead of a VMError."""
    from vjobs.testing.fuzz import tar_of

    disk = tmp_path / "io.raw"
    disk.write_bytes(tar_of([("vjobs/stdout", tarfile.REGTYPE, b"one", "", 0),
                             ("vjobs/stdout", tarfile.REGTYPE, b"two", "", 0)]))
    with pytest.raises(VMError) as caught:
        read_results(disk, tmp_path / "incoming", 1 << 20)
    assert caught.value.code == "unsafe_output"
