"""The host's half of the guest protocol (vjobs/guest/protocol.py) and the agent's scripts (vjobs/guest/agent/)
say the same words: each marker the host waits for is one the agent prints, and each error code the agent
can report is one the host can explain."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vjobs.guest import protocol, streams

AGENT = Path(protocol.__file__).with_name("agent")


def agent_text() -> str:
    """The agent's shell scripts (its init, lib.sh, the stages), not its one binary (vjobs-reseed)."""
    scripts = [path for path in sorted(AGENT.rglob("*")) if path.is_file() and path.read_bytes()[:2] != b"\x7fE"]
    return "\n".join(path.read_text() for path in scripts)


def said(text: str) -> set[str]:
    """What the agent's ``say`` calls print after ``vjobs-agent: `` (up to the first variable)."""
    return {match.strip('"').split("$")[0].strip() for match in re.findall(r'\bsay ("[^"]*"|\w+)', text)}


@pytest.mark.parametrize("marker", [protocol.AGENT_UP_MARKER, protocol.PAYLOAD_MARKER, protocol.PROBE_MARKER,
                                    protocol.TEMPLATE_READY_MARKER])
def test_every_marker_the_host_waits_for_is_printed_by_the_agent(marker):
    prefix = b"vjobs-agent: "
    assert marker.startswith(prefix)
    words = marker[len(prefix):].decode()
    assert any(line == words or line.startswith(words + " ") for line in said(agent_text())), words


def test_every_error_code_the_agent_delivers_is_explained_by_the_host():
    delivered = set(re.findall(r"\bdeliver ([a-z_]+)", agent_text()))
    recorded = set(re.findall(r"\brecord error ([a-z_]+)", agent_text()))
    assert delivered, "no `deliver CODE` found: the agent's scripts moved?"
    assert delivered <= set(protocol.AGENT_ERRORS), delivered - set(protocol.AGENT_ERRORS)
    assert recorded == {protocol.OUTPUT_TOO_LARGE}
    assert set(protocol.AGENT_ERRORS) <= delivered, "a code the agent no longer reports"


def test_the_io_disk_magic_is_what_the_agent_looks_for():
    assert f"= {protocol.IO_DISK_MAGIC} ]" in agent_text()


def test_the_agent_looks_for_the_live_channel_where_the_drivers_put_it():
    """The virtio-serial port's name (qemu_user, kvm) and the kernel argument that puts the channel on the
    console (xen); the carriers' own format is held to the host's by tests/guest/test_streams.py."""
    assert f'[ "$port" = {streams.STREAMS_PORT} ]' in agent_text()
    assert f"on_cmdline {streams.STREAMS_ON_CONSOLE} " in agent_text()
