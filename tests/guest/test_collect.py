"""Reading what an untrusted guest wrote onto its io disk."""

import io
import tarfile

import pytest

from vjobs.errors import VMError
from vjobs.guest.collect import read_results

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


def test_large_outputs_come_back_whole_hashed_and_in_order(tmp_path):
    """Large files are copied and hashed in worker threads, several at once; what they yield is recorded in
    the archive's order, whatever order the workers finish in."""
    import hashlib
    import random

    from vjobs.guest.collect import PIPELINED_BYTES

    rng = random.Random(3)
    sizes = [PIPELINED_BYTES + 12345, 3, 0, 2 * PIPELINED_BYTES + 1, 700, PIPELINED_BYTES, 5 * PIPELINED_BYTES // 2]
    files = [(f"work/out/f{number}", rng.randbytes(size)) for number, size in enumerate(sizes)]
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS),
                                            *(regular(name, data) for name, data in files)], size=64 << 20)
    results = read_results(disk, tmp_path / "got", 64 << 20)
    assert [o.path for o in results.outputs] == [name.removeprefix("work/") for name, _ in files]
    for output, (name, data) in zip(results.outputs, files):
        assert output.size == len(data)
        assert output.sha256 == hashlib.sha256(data).hexdigest()
        assert (tmp_path / "got" / "outputs" / output.path).read_bytes() == data


def test_a_file_running_past_the_end_of_the_disk_means_no_results(tmp_path):
    from vjobs.guest.collect import PIPELINED_BYTES

    for size in (100, 2 * PIPELINED_BYTES):  # copied at once, and in a worker
        raw = tmp_path / f"full-{size}.raw"
        write_disk(raw, [regular("vjobs/status", STATUS), regular("work/big", b"x" * size)], size=0)
        disk = tmp_path / f"cut-{size}.raw"
        disk.write_bytes(raw.read_bytes()[:512 * 3 + size // 2])  # status, the member's header, half its data
        with pytest.raises(VMError) as caught:
            read_results(disk, tmp_path / f"got-{size}", 1 << 30)
        assert caught.value.code == "no_results"
        assert not (tmp_path / f"got-{size}").exists()


def _set_size(raw: bytearray, name: bytes, field: bytes) -> None:
    """Overwrite the size field of the header named ``name`` and fix its checksum."""
    header = next(offset for offset in range(0, len(raw), 512) if raw[offset:offset + len(name) + 1] == name + b"\0")
    raw[header + 124:header + 136] = field
    raw[header + 148:header + 156] = b" " * 8
    raw[header + 148:header + 155] = b"%06o\0" % sum(raw[header:header + 512])


def test_a_negative_size_is_no_data_and_adds_nothing_to_the_budget(tmp_path):
    """A base-256 size field can be negative: tarfile reads no data for it (an empty file comes back, as
    before), but it must not raise the budget that bounds what comes back (it did: a guest could have put
    a huge sparse member after it)."""
    members = [regular("vjobs/status", STATUS), regular("work/neg", b""), regular("work/after", b"def")]
    disk = write_disk(tmp_path / "io.raw", members)
    raw = bytearray(disk.read_bytes())
    _set_size(raw, b"work/neg", b"\xff" * 11 + b"\x00")  # -256 in base-256
    disk.write_bytes(bytes(raw))
    results = read_results(disk, tmp_path / "got", 1 << 20)
    assert [(o.path, o.size) for o in results.outputs] == [("neg", 0), ("after", 3)]

    # Beyond -511 tarfile would have to seek backwards (a broken tar): -511 is the most one member could add.
    disk = write_disk(tmp_path / "io2.raw", [*members[:2], regular("work/big", b"x" * (4096 - len(STATUS) + 400))])
    raw = bytearray(disk.read_bytes())
    _set_size(raw, b"work/neg", b"\xff" * 10 + b"\xfe\x01")  # -511 in base-256
    disk.write_bytes(bytes(raw))
    with pytest.raises(VMError) as caught:
        read_results(disk, tmp_path / "got2", 4096)
    assert caught.value.code == "output_too_large"


def test_a_huge_size_claim_reads_no_more_than_the_disk(tmp_path):
    """A GNU long-name header claiming petabytes: tarfile reads it whole into memory, so the disk must end
    that read at its own end (as the stream reader did) instead of allocating what the header claims."""
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS), regular("work/" + "n" * 200, b"x")])
    raw = bytearray(disk.read_bytes())
    _set_size(raw, b"././@LongLink", b"\x80" + b"\x00" * 4 + b"\x40" + b"\x00" * 6)  # 2**54 in base-256
    disk.write_bytes(bytes(raw))
    try:
        read_results(disk, tmp_path / "got", 1 << 20)
    except VMError as error:
        assert error.code in ("no_results", "unsafe_output")


def test_a_sparse_member_comes_back_expanded(tmp_path):
    """The agent's busybox tar writes no sparse members, but a guest may (GNU sparse 1.0 in a pax archive):
    tarfile expands them, reading the disk forwards only."""
    import hashlib

    chunks, realsize = [(0, b"abc"), (10000, b"xyz")], 20000
    head = ("\n".join([str(len(chunks))] + [f"{offset}\n{len(data)}" for offset, data in chunks]) + "\n").encode()
    data = head + b"\0" * (-len(head) % 512) + b"".join(data for _, data in chunks)
    info = tarfile.TarInfo("GNUSparseFile.0/sparse")
    info.size = len(data)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "work/sparse",
                        "GNU.sparse.realsize": str(realsize)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        status = regular("vjobs/status", STATUS)[0]
        archive.addfile(status, io.BytesIO(STATUS))
        archive.addfile(info, io.BytesIO(data))
    disk = tmp_path / "io.raw"
    disk.write_bytes(buffer.getvalue() + b"\0" * 4096)
    results = read_results(disk, tmp_path / "got", 1 << 20)
    expected = b"abc" + b"\0" * 9997 + b"xyz" + b"\0" * 9997
    assert (tmp_path / "got" / "outputs" / "sparse").read_bytes() == expected
    assert results.outputs[0].sha256 == hashlib.sha256(expected).hexdigest()


def test_usage_figures_come_back_as_numbers(tmp_path):
    usage = b"cpu_user_s=2.25\ncpu_system_s=0.5\nmemory_peak_mib=101.3\nprocesses_peak=3\nio_write_bytes=4096\n"
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS), regular("vjobs/usage", usage)])
    results = read_results(disk, tmp_path / "got", 1 << 20)
    assert results.usage == {"cpu_user_s": 2.25, "cpu_system_s": 0.5, "memory_peak_mib": 101.3,
                             "processes_peak": 3, "io_write_bytes": 4096}
    assert results.usage_note is None


def test_garbage_usage_figures_from_a_hostile_guest_are_ignored_with_a_note(tmp_path):
    usage = (b"cpu_user_s=1e308\ncpu_system_s=-1\nmemory_peak_mib=NaN\nprocesses_peak=2.5\nsamples=99999999999999999\n"
             b"evil=1\n\xff\xfe\ncpu_user_s=3\ncpu_user_s=4\nio_read_bytes=12\n")
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS), regular("vjobs/usage", usage)])
    results = read_results(disk, tmp_path / "got", 1 << 20)
    assert results.usage == {"cpu_user_s": 3.0, "io_read_bytes": 12}
    assert results.usage_note == "ignored 8 malformed line(s) in the guest's usage figures"


def test_an_oversized_usage_file_is_ignored_with_a_note(tmp_path):
    disk = write_disk(tmp_path / "io.raw", [regular("vjobs/status", STATUS),
                                            regular("vjobs/usage", b"cpu_user_s=1\n" * 10_000)])
    results = read_results(disk, tmp_path / "got", 1 << 20)
    assert results.usage == {} and "vjobs/usage ignored" in results.usage_note


def test_every_usage_figure_fits_the_result_schema():
    from vjobs.config import schemas
    from vjobs.guest.collect import USAGE_FIGURES, parse_usage
    from vjobs.result import Result

    usage, _ = parse_usage("".join(f"{name}=7\n" for name in USAGE_FIGURES).encode())
    assert set(usage) == set(USAGE_FIGURES)
    document = Result(job_id="j", timings={"total": 0.0}, usage={**usage, "note": "ignored 1 line"}).to_json()
    assert schemas.problem("result", document) is None
