"""``vjobs exec``, the container-runtime front end: bad command lines refused before any VM starts, and links and
devices made in a bind never reach the host. (Binds, working directory, environment, streams and exit status on
every driver and both built-in images: vjobs.testing.conformance.)"""

from __future__ import annotations

import os
import stat
import time

import pytest

import vjobs
from vjobs.cli import exec_command as runtime
from vjobs.cli.commands import build_parser
from vjobs.config.exec_request import ExecRequest, job_document


def exec_args(*words: str):
    return build_parser().parse_args(["exec", *words])


def vjobs_exec(site, *words: str) -> int:
    return runtime.run_exec(exec_args(*words), site=site)


@pytest.fixture
def folders(tmp_path):
    work = tmp_path / "payload"
    (work / "sub").mkdir(parents=True)
    (work / "input.txt").write_text("in\n")
    (work / "unchanged.txt").write_text("same\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "table.txt").write_text("read only\n")
    return work, data


@pytest.mark.vm
def test_links_and_devices_made_in_a_bind_never_reach_the_host(make_site, folders, debian_image, capfd,
                                                               assert_clean_host):
    work, _ = folders
    script = "ln -s /etc/passwd passwd && mknod disk b 254 0 && mkfifo pipe && ln input.txt hard && echo done"
    code = vjobs_exec(make_site(driver="qemu_user"), "-B", str(work), "debian12", "sh", "-c", script)
    out, _ = capfd.readouterr()
    assert code == 0 and out == "done\n"
    for name in ("passwd", "disk", "pipe"):
        assert not os.path.lexists(work / name), name
    assert stat.S_ISREG(os.lstat(work / "input.txt").st_mode)


def test_default_pwd_is_the_first_binds_target_and_dst_defaults_to_src(folders):
    work, data = folders
    document = job_document(ExecRequest("img", ["true"], binds=[f"{work},{data}:/d:ro"]))
    assert document["cwd"] == str(work)
    assert document["binds"] == [{"source": str(work), "target": str(work), "mode": "rw"},
                                 {"source": str(data), "target": "/d", "mode": "ro"}]


@pytest.mark.parametrize("bind, message", [
    ("/no/such/folder", "does not exist on this host"),
    ("{work}:relative", "must be absolute"),
    ("{work}:/srv:rx", "expected SRC[:DST[:ro|rw]]"),
    ("{work}/input.txt:/srv", "only folders can be bound"),
    ("{work}:/proc/srv", "is reserved in the guest"),
    ("{work}:/srv,{data}:/srv:ro", "overlap"),
])
def test_bad_binds_are_refused_before_a_vm(bind, message, folders, make_site, capfd, assert_clean_host):
    work, data = folders
    code = vjobs_exec(make_site(driver="qemu_user"), "-B", bind.format(work=work, data=data), "default", "true")
    _, err = capfd.readouterr()
    assert code == 200
    assert message in err and "Traceback" not in err


def test_a_bind_too_large_is_refused_naming_size_and_limit(folders, make_site, capfd, assert_clean_host):
    work, _ = folders
    (work / "big").write_bytes(os.urandom(3 << 20))
    code = vjobs_exec(make_site(driver="qemu_user", limits={"bind_mib": 2}), "-B", f"{work}:/srv", "default", "true")
    _, err = capfd.readouterr()
    assert code == 200
    assert "more than 2 MiB" in err and "seen so far: 3 MiB" in err and "limits.bind_mib" in err


def test_a_bind_holding_vjobs_own_folders_is_refused(make_site, tmp_path, capfd, assert_clean_host):
    code = vjobs_exec(make_site(driver="qemu_user"), "-B", f"{tmp_path}:/srv", "default", "true")
    _, err = capfd.readouterr()
    assert code == 200 and "holds vjobs' work_dir" in err


def test_an_unknown_image_exits_200(folders, make_site, capfd, assert_clean_host):
    code = vjobs_exec(make_site(driver="qemu_user"), "no-such-image", "true")
    _, err = capfd.readouterr()
    assert code == 200 and "'no-such-image' is not in this site's catalogue" in err


class TimedStream:
    """A binary stream that notes when each write came."""

    def __init__(self):
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data: bytes) -> int:
        self.writes.append((time.monotonic(), bytes(data)))
        return len(data)

    def flush(self) -> None:
        pass

    def text(self) -> bytes:
        return b"".join(data for _at, data in self.writes)


@pytest.mark.vm
def test_the_payloads_output_is_printed_as_it_comes(make_site, assert_clean_host):
    out, err = TimedStream(), TimedStream()
    result = vjobs.execute(ExecRequest("default", ["sh", "-c", "echo first; echo oops >&2; sleep 8; echo second"]),
                           site=make_site(driver="qemu_user"), stdout=out, stderr=err)
    ended = time.monotonic()
    assert result.status == "succeeded", result.error
    assert (out.text(), err.text()) == (b"first\nsecond\n", b"oops\n")  # each byte once, in order
    first_at = next(at for at, data in out.writes if data.startswith(b"first"))
    assert ended - first_at > 5, "the first line came only at the end"
