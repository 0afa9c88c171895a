"""The container's public events (vjobs/events.py): what observers see is what the container does, in order,
and the result's timings are the sums of the phases they saw."""

from __future__ import annotations

import pytest

import vjobs
from vjobs.drivers.contract import Capabilities, Driver
from vjobs.errors import VMError
from vjobs.events import EVENT_NAMES, PHASES, STEPS, Events, check_targets


def recorder(names=EVENT_NAMES):
    seen = []
    return seen, {name: [seen.append] for name in names}


class FailingCreate(Driver):
    """A driver whose every VM fails to be created: enough to see the phases around a failure."""

    name = "failing_create"

    def probe(self):
        return Capabilities(self.name, True, "always")

    def create(self, spec):
        raise VMError("no VM today", code="no_vm_today")


def test_an_unknown_event_name_is_refused_at_once(make_job):
    with pytest.raises(ValueError, match="phase_begun"):
        vjobs.run(make_job(["true"]), event_hooks={"phase_begun": [print]})


def test_a_phase_or_step_that_does_not_exist_fails_loudly():
    with pytest.raises(ValueError, match="'boooot'"):
        with Events().phase("boooot"):
            pass
    with pytest.raises(ValueError, match="step 'vdi_uplaod'"):
        check_targets(phases=["boot"], steps=["vdi_uplaod"])
    check_targets(phases=PHASES, steps=STEPS)


def test_a_failure_in_create_is_seen_in_attach_then_teardown(make_job, make_site, fake_image, tmp_path,
                                                              assert_clean_host):
    seen, hooks = recorder(("phase_started", "phase_ended", "step_ended"))
    site = make_site(images={"fake": fake_image})
    result = vjobs.run(make_job(["true"], image="fake"), site=site, driver=FailingCreate({}, None),
                       outdir=tmp_path / "out", event_hooks=hooks)
    assert result.error["code"] == "no_vm_today"
    started = [e.subject for e in seen if e.name == "phase_started"]
    assert started == ["probe", "prepare", "prepare", "admission", "attach", "teardown", "finish"]
    ended = {e.subject: e for e in seen if e.name == "phase_ended"}
    assert ended["attach"].error == "VMError" and ended["probe"].error is None
    steps = [(e.subject, e.detail) for e in seen if e.name == "step_ended"]
    assert steps == [("tool", "mke2fs"), ("scratch_disk", ""), ("io_disk", ""), ("vm_create", ""),
                     ("save_console", ""), ("remove_job_folder", "")]
    assert all(e.job_id == "t1" for e in seen)


@pytest.mark.vm
def test_a_real_job_goes_through_every_phase_in_order(make_job, make_site, built_image, tmp_path,
                                                      assert_clean_host):
    seen, hooks = recorder()
    result = vjobs.run(make_job(["echo", "hi"]), site=make_site(), driver="qemu_user", outdir=tmp_path / "out",
                       event_hooks=hooks, progress=lambda message: None)
    assert result.status == "succeeded", result.error
    phases = list(dict.fromkeys(e.subject for e in seen if e.name == "phase_started"))  # prepare comes twice,
    assert phases == [p for p in PHASES if p in phases]  # around stage_in; otherwise in the documented order
    assert {"probe", "prepare", "admission", "attach", "boot", "run", "collect", "teardown", "finish"} <= set(phases)
    for phase in ("attach", "boot", "run", "collect"):
        spent = sum(e.elapsed_s for e in seen if e.name == "phase_ended" and e.subject == phase)
        assert result.timings[phase] == pytest.approx(spent, abs=0.002)
    steps = [e.subject for e in seen if e.name == "step_started"]
    for before, after in (("vm_create", "vm_start"), ("vm_start", "fetch_disk"), ("fetch_disk", "publish"),
                          ("publish", "vm_destroy"), ("vm_destroy", "remove_job_folder")):
        assert steps.index(before) < steps.index(after), steps
    # A step happens inside its phase: vm_create between attach's start and end.
    order = [(e.name, e.subject) for e in seen]
    assert (order.index(("phase_started", "attach")) < order.index(("step_started", "vm_create"))
            < order.index(("phase_ended", "attach")))
    assert any(e.name == "progress" for e in seen)
