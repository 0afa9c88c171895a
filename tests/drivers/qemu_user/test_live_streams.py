"""The payload's stdout and stderr reach the outdir while it runs (vjobs/guest/streams.py), over qemu_user's
virtio-serial port, in a cold boot and in a guest restored from a template alike."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

import vjobs

FIRST_SLEEP_SECOND = ["sh", "-c", "echo first; echo oops >&2; sleep 8; echo second"]


@pytest.mark.vm
@pytest.mark.parametrize("use_template", [False, True], ids=["cold", "template"])
def test_the_first_line_is_in_stdout_before_the_job_ends(make_site, make_job, tmp_path, use_template,
                                                         assert_clean_host):
    site = make_site(driver="qemu_user", drivers={"qemu_user": {"template": use_template}})
    out = tmp_path / "out"
    results = []
    run = threading.Thread(target=lambda: results.append(vjobs.run(make_job(FIRST_SLEEP_SECOND), site=site,
                                                                   outdir=out)))
    run.start()
    seen_live = None
    while run.is_alive() and seen_live is None:
        with contextlib.suppress(FileNotFoundError):
            live = ((out / "stdout").read_bytes(), (out / "stderr").read_bytes())
            if live[0] and live[1]:
                seen_live = live
        time.sleep(0.2)
    run.join()
    result = results[0]
    assert result.status == "succeeded", (result.error, (out / "console.log").read_text())
    assert result.provenance["start"]["mode"] == ("template" if use_template else "cold")
    assert seen_live == (b"first\n", b"oops\n"), "the first line was not in stdout before the job ended"
    assert (out / "stdout").read_bytes() == b"first\nsecond\n"  # the io disk's copy, exactly
    assert (out / "stderr").read_bytes() == b"oops\n"


@pytest.mark.vm
def test_with_the_live_channel_off_everything_comes_back_at_the_end(make_site, make_job, tmp_path, assert_clean_host):
    """``live_channel = false``: the guest serves no channel, the host follows none; the results are whole."""
    site = make_site(driver="qemu_user", live_channel=False, sync_interval_s=1)
    out = tmp_path / "out"
    result = vjobs.run(make_job(["sh", "-c", "echo first; sleep 3; echo second"]), site=site, outdir=out)
    assert result.status == "succeeded", result.error
    assert (out / "stdout").read_bytes() == b"first\nsecond\n"
    assert result.sync["rounds"] == 0 and not (out / "usage.json").exists()
    assert result.usage["cpu_user_s"] >= 0
