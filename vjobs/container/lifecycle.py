"""The VM execution container: one job, one VM, one lifecycle, teardown guaranteed.

The phases, as ``_run_phases`` runs them and as observers see them (vjobs/events.py; the result's timings
are named after them):

    probe      choose a driver and take its verdict on this host
    prepare    check the job against the site's limits and the batch allocation, resolve the image, make the
               job folder under work_dir, snapshot the read-write binds
    stage_in   fetch remote inputs on the host (jobs with ``stage_in`` only)
    prepare    build the block devices: io disk, scratch disk, release and read-only bind images
    admission  wait for the job's share of the host's budget ([host])
    attach     the driver defines the VM and attaches its disks (``Driver.create``)   } once per boot
    boot       the driver starts it; wait for the guest agent, with its own deadline } attempt (retried)
    run        wait for the guest to stop, up to the wall time, its grace and a delivery margin; meanwhile apply
               the sync rounds of the payload's files and publish its usage samples, and on a signal or the
               host's deadline take a last round before the VM is stopped (vjobs/guest/sync.py)
               A job run with a checkpoint folder (vjobs/checkpoint/) is saved there every
               ``checkpoint_interval_s`` and goes on; on SIGTERM or the site's ``checkpoint_signal`` it is saved
               and ends ``checkpointed``. A resumed job's prepare copies the checkpoint's disks and finds its
               images by their sums instead of building them, and its boot continues the saved guest.
    collect    read the results from the io disk (never mounted), publish them, return read-write binds
    stage_out  upload the outputs (jobs with ``stage_out`` only)
    teardown   always, whatever happened before: destroy every VM, save the console log, remove the folder
    finish     write result.json (the one place it is written: vjobs/result.py ``conclude``)

The container owns everything job-specific on the host: the job folder under ``work_dir`` (disks, console
logs, sockets), the VMs it created, its hold on the cached images it uses (vjobs/host/cache.py), the image
files its VMs get, open and checked (vjobs/images/checked.py), and the result written to the output folder.
Drivers only turn a ``VMSpec`` into a running VM and back (vjobs/drivers/contract.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from vjobs import staging
from vjobs._version import __version__
from vjobs.checkpoint.folder import CheckpointFolder
from vjobs.checkpoint.resume import Resumable
from vjobs.checkpoint.resume import link as checkpoint_link
from vjobs.checkpoint.take import disk_records
from vjobs.checkpoint.take import take as take_checkpoint
from vjobs.config.job import Job, job_document
from vjobs.config.site import SiteConfig
from vjobs.container.signals import SignalGuard, signals_cancel
from vjobs.drivers.contract import VM, Driver, HostContext, Stop, VMSpec, deadline_in
from vjobs.drivers.registry import choose_driver
from vjobs.errors import (BootTimeout, Cancelled, Checkpointed, CheckpointError, DiskFull, LimitExceeded,
                          StageOutFailed, VjobsError, VMError, WalltimeExceeded, internal_error)
from vjobs.guest.binds import check_folders as check_bind_folders
from vjobs.guest.binds import snapshot as snapshot_bind
from vjobs.guest.collect import GuestResults, read_results
from vjobs.guest.console import ConsoleLog
from vjobs.guest.disks import BaseDisk, JobDisks, prepare_disks, read_write_binds
from vjobs.guest.protocol import AGENT_ERRORS, AGENT_UP_MARKER, OUTPUT_TOO_LARGE, PAYLOAD_MARKER
from vjobs.guest.streams import LiveStreams
from vjobs.guest.sync import WorkSync
from vjobs.host.admission import admitted
from vjobs.host.allocation import VM_OVERHEAD_MIB, admission_scope
from vjobs.host.allocation import current as current_allocation
from vjobs.host.folders import output_folder, write_atomically
from vjobs.host.identity import create_owned_folder, new_owner, remove_owned_folder
from vjobs.host.roles import caches
from vjobs.host.running import write_record as write_running_record
from vjobs.host.tools import disk_full_from, not_permitted_from
from vjobs.images.catalogue import ResolvedImage, resolve_image
from vjobs.images.rootfs import disk_for as rootfs_disk_for
from vjobs.result import Result, conclude_in, utc_now
from vjobs.staging.locations import check as check_url

USAGE_FILE = "usage.json"  # in the outdir: the payload's latest usage sample while it runs
CONSOLE_TAIL_BYTES = 2000
# While the VM runs, its driver is asked whether it stopped this often: a signal that comes meanwhile waits for
# the answer (SignalGuard.deferred), so this bounds how late a cancel starts (a pilot kills 3 s after SIGTERM).
SIGNAL_CHECK_S = 0.25
DELIVERY_MARGIN_S = 60.0  # after the wall time and the grace: the agent collects and writes the outputs


class VMContainer:
    def __init__(self, job: Job, site: SiteConfig, host: HostContext, outdir: Path, *,
                 driver: str | Driver | None = None, checkpoint: CheckpointFolder | None = None,
                 resume: Resumable | None = None):
        """``host``: this job's own; its ``cache_hold`` becomes the job's hold on the cache, released after
        the teardown. ``driver``: a driver name to pin, a ready ``Driver`` object to use, or None to probe and
        choose. ``checkpoint``: the folder to keep the job's checkpoints in (vjobs/checkpoint/); ``resume``:
        the checkpoint this run continues (its job is ``job``)."""
        self.job, self.site, self.host, self.outdir = job, site, host, Path(outdir)
        self.driver_choice = driver
        self.checkpoints = checkpoint
        self.resuming = resume
        self.run_before_s = resume.run_s if resume else 0.0  # the payload's run time before this run
        self._run_started: float | None = None
        self._last_checkpoint = 0.0
        self.checkpoint_failed: str | None = None  # why the last checkpoint could not be taken
        self.checkpoint_disks: list[dict] = []  # what a checkpoint says of the job's disks (checkpoint/resume.py)
        self.events = host.events
        self.owner = new_owner(job.id)
        self.folder = site.work_dir / f"{job.id}-{self.owner.run_id}"
        self.vms: list[VM] = []
        self.consoles: list[ConsoleLog] = []  # one per boot attempt
        self.live: LiveStreams | None = None  # the guest's live channel while it runs, when the VM has one
        self.sync: WorkSync | None = None  # its read-write binds and outputs, kept up while it runs
        self.sync_interval_s = site.sync_interval_for(job)
        self.live_usage: dict | None = None  # the latest usage sample
        self.held = contextlib.ExitStack()  # the job's share of the host, given back after teardown
        self.signals = SignalGuard()  # run() puts the one that holds the signals for the job's life here
        self.cache_hold = self.held.enter_context(host.cache_hold)  # the cached images it uses (vjobs/host/cache.py)
        self.files = self.held.enter_context(host.checked_files)  # what its VMs get, open (vjobs/images/checked.py)
        self.result = Result(job_id=job.id, vjobs_version=__version__, started_at=utc_now())
        self.allocation = current_allocation()  # what a batch system granted, if vjobs runs inside one
        self.phase_now = ""
        self._started = time.monotonic()
        self._started_at = time.time()

    # --- the lifecycle ---------------------------------------------------------------------------------

    def run(self) -> Result:
        checkpoint_signals = (self.site.checkpoint_signal,) if self.checkpoints else ()
        with signals_cancel(also=checkpoint_signals) as guard:
            try:
                self.signals = guard
                guard.cancel_if_signalled()  # one that came while vjobs started up
                self._run_phases()
            except VjobsError as error:
                self._fail(error)
            except Exception as bug:  # never a traceback on the terminal: a result, and the details in a log
                self._fail(disk_full_from(bug) or not_permitted_from(bug) or internal_error(bug, self.outdir))
            except KeyboardInterrupt as interrupt:  # Ctrl-C, or Terminated from the signal guard
                self._fail(self._stopped_by(interrupt))
            finally:
                guard.hold()  # a second SIGTERM must not cut the teardown short
                with self._phase("teardown"):
                    self._teardown()
                self.held.close()
                with self.events.phase("finish"):  # not timed: its time is after the result's total
                    self._finish()
        return self.result

    def _run_phases(self) -> None:
        with self._phase("probe"):
            driver, verdict = choose_driver(self.site, self.host, self.driver_choice)
            self.result.driver = driver.name
            self.result.provenance.update(probe=verdict.to_json(), hypervisor=verdict.hypervisor,
                                          driver_version=_distribution_version(driver))
            if self.resuming:
                self.resuming.check_driver(driver)
                self.result.provenance["checkpoints"] = self.resuming.chain()
        with self._phase("prepare"):
            output_folder(self.outdir)  # this account's alone, before anything of the job is written anywhere
            if self.checkpoints:
                self.checkpoints.make()  # this account's alone too: the guest's memory goes in there
                if not self.resuming and self.checkpoints.exists():
                    raise CheckpointError(f"{self.checkpoints.path} holds a checkpoint of a job already: "
                                          f"`vjobs resume {self.checkpoints.path}` continues it; give this job a "
                                          "folder of its own, or remove that one", code="checkpoint_exists")
            self.site.check_limits(self.job)
            self._check_allocation()
            check_bind_folders(self.job, self.site)
            if self.job.network and not verdict.network:
                raise LimitExceeded(f"job {self.job.id}: /network: the job asks for a network and the site allows "
                                    f"it, but the {driver.name} driver gives its guests none here; run it where "
                                    "`vjobs probe` shows a network, or without /network")
            image = resolve_image(self.job.image, self.site, self.host.progress, hold=self.cache_hold,
                                  files=self.files)
            self.result.provenance.update(image.provenance())
            base = self._base_disk(image, verdict.disk_formats)
            create_owned_folder(self.folder, self.owner)
            if self.checkpoints:
                self.checkpoints.register(self.site.work_dir)
            copied_in = {number: snapshot_bind(bind.source) for number, bind in read_write_binds(self.job)}
            self.sync = WorkSync(self.job, self.outdir, copied_in)
        disks = self._resumed_disks(base) if self.resuming else self._new_disks(base)
        self.result.provenance["release_sha256"] = disks.release_sha256
        with self._phase("admission"):
            resources = self.job.resources
            self.held.enter_context(admitted(self.job.id, resources.vcpus, resources.memory_mib, self.site,
                                             self.host.progress, scope=admission_scope(self.allocation, self.site)))
        if self.checkpoints:  # before the VM runs: summing a base image must not eat into a signal's grace
            self.checkpoint_disks = disk_records(disks, self.job)
        vm = self._boot(driver, image, disks)
        with self._phase("run"):
            self._run_started = self._last_checkpoint = time.monotonic()
            self.host.progress(f"job {self.job.id} running (wall time {self.job.walltime_s} s"
                               + (f", {self.run_before_s:.0f} s of it used before" if self.resuming else "") + ")")
            self._follow_live_streams(vm, disks)
            # The agent ends the payload at the wall time itself (SIGTERM, stop_grace_s, SIGKILL) and delivers
            # what it wrote; the host waits that long and a margin for the delivery, then kills the VM. A
            # restored guest's clock did not run while it was saved: its wall time goes on from where it was.
            try:
                stop = self._wait_for_stop(vm, disks, deadline_in(
                    self.job.walltime_s - self.run_before_s + self.site.stop_grace_s + DELIVERY_MARGIN_S))
            except KeyboardInterrupt as interrupt:  # a signal: checkpoint, or bring back what was written so far
                if self._checkpoint_on(interrupt):
                    with self.signals.deferred():  # a second SIGTERM does not cut the save in half
                        self._checkpoint(vm, disks, final=True)
                self._last_round()
                raise
            if stop is Stop.DISK_FULL:
                raise _guest_disk_full(vm.full_disk)
            if stop is Stop.DEADLINE:
                self._last_round()
                raise WalltimeExceeded(f"job {self.job.id} ran past its wall time of {self.job.walltime_s} s and "
                                       f"the guest did not end it within {self.site.stop_grace_s} s more; the VM "
                                       "was killed; what the sync had brought back stays")
        timed_out = None
        with self._phase("collect"):
            try:
                self._collect(vm, disks, stop)
            except WalltimeExceeded as error:  # the outputs came back all the same; the job may want them uploaded
                timed_out = error
            if self.checkpoints:
                self.checkpoints.clear()
        if self._stage_out_wanted():
            self._stage_out()
        if timed_out:
            raise timed_out

    def _new_disks(self, base: BaseDisk | None) -> JobDisks:
        staged = self._stage_in() if self.job.stage_in else None
        with self._phase("prepare"):
            return prepare_disks(self.job, self.folder, self.host.cache_dir, self.site.release_format,
                                 self.events, base, hold=self.cache_hold, files=self.files,
                                 stop_grace_s=self.site.stop_grace_s,
                                 sync_interval_s=self.sync_interval_s if self.site.live_channel else None,
                                 staged=staged)

    def _resumed_disks(self, base: BaseDisk | None) -> JobDisks:
        """The checkpoint's disks in the job folder, its images found by their sums (vjobs/checkpoint/resume.py)."""
        with self._phase("prepare"), self.events.step("checkpoint_disks"):
            found_in = caches(self.site)
            return self.resuming.disks(self.folder, [found_in.own, *filter(None, [found_in.administrators])],
                                       hold=self.cache_hold, files=self.files, base=base,
                                       progress=self.host.progress)

    # --- checkpoints (vjobs/checkpoint/) ------------------------------------------------------------------

    def _stopped_by(self, interrupt: KeyboardInterrupt) -> VjobsError:
        """What a signal makes of a job it did not checkpoint (it came before the VM ran, or the save failed,
        or it is not a checkpoint signal): one with a checkpoint from before (a resumed job's, a periodic one)
        stays ``checkpointed`` at that one; any other is cancelled."""
        signal_name = _signal_name(interrupt)
        if self._checkpoint_on(interrupt) and self.checkpoints.exists():
            why = f"the VM could not be saved now ({self.checkpoint_failed})" if self.checkpoint_failed else \
                "it came before the job's VM ran"
            return Checkpointed(f"{signal_name}: {why}; the checkpoint saved before in {self.checkpoints.path} is "
                                f"the current one: `vjobs resume {self.checkpoints.path}` continues from there")
        failed = f"; it could not be checkpointed: {self.checkpoint_failed}" if self.checkpoint_failed else ""
        return Cancelled(f"{signal_name} received; the VM was stopped and its files removed{failed}")

    def _checkpoint_on(self, interrupt: KeyboardInterrupt) -> bool:
        return self.checkpoints is not None and _signal_name(interrupt) in ("SIGTERM", self.site.checkpoint_signal)

    def _checkpoint_due(self) -> bool:
        interval = self.site.checkpoint_interval_s
        return bool(self.checkpoints and interval and time.monotonic() - self._last_checkpoint >= interval)

    def _checkpoint(self, vm: VM, disks: JobDisks, *, final: bool) -> None:
        """Save the VM into the checkpoint folder. ``final`` (a signal): the job then ends ``checkpointed``,
        or, when the save fails, as any signalled job (the checkpoint before, if any, stays current).
        Otherwise (a periodic one) the guest goes on, whether or not the save worked."""
        run_s = self.run_before_s + time.monotonic() - self._run_started
        manifest = {"job": job_document(self.job), "driver": self.result.driver, "run_s": round(run_s, 3),
                    "disks": self.checkpoint_disks,
                    "chain": self.resuming.chain() if self.resuming else []}
        try:
            with self.events.step("checkpoint", detail="final" if final else "periodic"):
                saved = take_checkpoint(vm, disks, self.checkpoints, manifest, within_s=self.site.checkpoint_grace_s,
                                        max_bytes=self.site.checkpoint_max_bytes,
                                        channel_position=self.live.position if self.live else None)
        except (VjobsError, OSError) as error:
            self.checkpoint_failed = str(error)
            self.host.progress(f"checkpoint failed: {error}")
            if not final:
                with contextlib.suppress(VjobsError, OSError):
                    vm.resume()
            self._last_checkpoint = time.monotonic()
            return
        self._last_checkpoint = time.monotonic()
        self.result.provenance["checkpoints"] = [*manifest["chain"], checkpoint_link(saved)]
        if final:
            raise Checkpointed(f"job {self.job.id} was saved in {saved.folder} after {run_s:.0f} s of its wall time "
                               f"({saved.manifest['timings']['save_guest']} s to save the guest); continue it with "
                               f"`vjobs resume {self.checkpoints.path}`")
        self.host.progress(f"checkpoint {saved.name} saved in {self.checkpoints.path}")
        vm.resume()

    # --- staging (vjobs/staging/): all I/O with storage on the host -------------------------------------

    def _stage_in(self) -> Path:
        """Fetch the remote inputs into a folder that becomes part of the working directory."""
        folder = self.folder / "stage-in"
        folder.mkdir()
        with self._phase("stage_in"):
            self.host.progress(f"staging in {len(self.job.stage_in)} remote inputs")
            records = staging.stage_in(self.job.stage_in, folder, self.site.staging, note=self.host.progress,
                               bars=self.host.progress_bars)
        self.result.staged_in = [vars(record) for record in records]
        return folder

    def _stage_out_wanted(self) -> bool:
        plan = self.job.stage_out
        if plan is None or not self.result.outputs:
            return False
        return self.result.status == "succeeded" or plan.when == "ended"

    def _stage_out(self) -> None:
        """Upload the outputs. A failure keeps them in the output folder: after a payload that succeeded it is
        the job's outcome (stage_out_failed); after one that failed, the payload's exit status stays."""
        plan = self.job.stage_out
        paths = [output["path"] for output in self.result.outputs]
        with self._phase("stage_out"):
            self.host.progress(f"staging out {len(paths)} outputs to {check_url(plan.destination).shown}")
            try:
                records = staging.stage_out(paths, self.outdir / "outputs", plan.destination, self.site.staging,
                                    overwrite=plan.overwrite, note=self.host.progress, bars=self.host.progress_bars)
            except StageOutFailed as error:
                self.result.uploads = [vars(record) for record in error.uploads]
                if self.result.status != "succeeded":
                    self.result.error = {"code": error.code, "message": str(error)}
                    return
                raise
        self.result.uploads = [vars(record) for record in records]

    def _check_allocation(self) -> None:
        """Inside a batch job, a VM never gets more than the batch system granted (vjobs/host/allocation.py)."""
        granted = self.allocation
        if granted is None:
            return
        asked = self.job.resources
        if asked.vcpus > granted.cpus:
            raise LimitExceeded(f"job {self.job.id}: /resources/vcpus = {asked.vcpus} is more than {granted.describe()} "
                                f"was granted; ask the batch system for {asked.vcpus} CPUs (sbatch -c "
                                f"{asked.vcpus}) or the VM for fewer", code="exceeds_allocation")
        needed = asked.memory_mib + VM_OVERHEAD_MIB
        if granted.memory_mib is not None and needed > granted.memory_mib:
            raise LimitExceeded(f"job {self.job.id}: a VM of /resources/memory_mib = {asked.memory_mib} needs "
                                f"{needed} MiB on the host (QEMU's own {VM_OVERHEAD_MIB} MiB included), more than "
                                f"{granted.describe()} was granted; ask for --mem={needed}M or a smaller VM",
                                code="exceeds_allocation")

    def _boot(self, driver: Driver, image: ResolvedImage, disks: JobDisks) -> VM:
        """Boot with a deadline of its own, separate from the wall time: a guest that hangs silently while
        booting (it happens under TCG) is killed and booted once more, then it is a VM error."""
        attempts = 1 + self.site.boot_retries
        for attempt in range(1, attempts + 1):
            with self._phase("attach"):
                spec = self._spec(image, disks, attempt)
                with self.events.step("vm_create"):
                    vm = driver.create(spec)
                self.vms.append(vm)
            with self._phase("boot"):
                with self.events.step("vm_start"):
                    vm.start()
                self.result.provenance["boot_attempts"] = attempt
                self.result.provenance.update(vm.provenance())
                if self._wait_for_agent(vm, deadline_in(self.site.boot_timeout_s)):
                    return vm
                with self.events.step("vm_destroy"):
                    vm.destroy()
                self.host.progress(f"boot attempt {attempt} of {attempts}: the guest did not report in within "
                                   f"{self.site.boot_timeout_s} s")
        raise BootTimeout(f"the guest did not boot within {self.site.boot_timeout_s} s, {attempts} times; "
                          f"console: {self._console_tail()!r}")

    def _wait_for_stop(self, vm: VM, disks: JobDisks, deadline: float) -> Stop:
        """The VM's stop, or ``Stop.DEADLINE``; asked ``SIGNAL_CHECK_S`` at a time, so that a signal cancels the
        job within that (vjobs/container/signals.py), and what came on the live channel meanwhile is taken,
        and a periodic checkpoint taken when due, in the job's own thread."""
        while True:
            self.signals.cancel_if_signalled()
            self._take_live()
            if self._checkpoint_due():
                with self.signals.deferred():  # a SIGTERM meanwhile is the final checkpoint's, once this one is done
                    self._checkpoint(vm, disks, final=False)
            with self.signals.deferred():
                stop = vm.wait_until_stopped(min(deadline, time.monotonic() + SIGNAL_CHECK_S))
            if stop is not Stop.DEADLINE or time.monotonic() >= deadline:
                return stop

    def _wait_for_agent(self, vm: VM, deadline: float) -> bool:
        """No polling: the console wakes this wait the moment the agent's marker comes through, or when the
        streams it follows end (the hypervisor closed them: the guest is going). Before each wait, and so at
        least every ``stop_check_s`` for a VM whose console stays silent when it stops, the VM is asked whether
        it stopped, with a moment to take in what its hypervisor said (a full disk); once its console has
        ended, the wait is for that stop."""
        stop_check_s, moment_s = 0.5, 0.01
        console = vm.spec.console
        while not vm.agent_started():
            self.signals.cancel_if_signalled()
            ask_s = stop_check_s if console.ended else moment_s
            with self.signals.deferred():
                stop = vm.wait_until_stopped(min(deadline, time.monotonic() + ask_s))
            if stop is Stop.DISK_FULL:
                raise _guest_disk_full(vm.full_disk)
            if stop is not Stop.DEADLINE:
                if vm.agent_started():
                    return True  # it ran and already stopped: the run phase will see that at once
                raise VMError(f"the guest stopped ({stop.value}) before its agent started; "
                              f"console: {self._console_tail()!r}", code="boot_failed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return vm.agent_started()
            console.wait_for(AGENT_UP_MARKER, min(remaining, stop_check_s))
        return True

    def _follow_live_streams(self, vm: VM, disks: JobDisks) -> None:
        """Append the payload's output to the outdir's stdout and stderr as it comes, bounded by output_mib as
        its final copy is (``_publish`` replaces both with the io disk's copies); spool its sync rounds in
        the job's folder, bounded by the io disk as its results are."""
        channel = vm.guest_channel() if self.site.live_channel else None
        if channel is not None:
            output_folder(self.outdir)
            (self.outdir / USAGE_FILE).unlink(missing_ok=True)  # an earlier run's
            spool = self.folder / "sync"
            spool.mkdir(mode=0o700)
            self.live = LiveStreams(self.outdir, self.job.resources.output_mib << 20, spool=spool,
                                    round_limit_bytes=disks.io.path.stat().st_size,
                                    carried=self.resuming.manifest.get("channel") if self.resuming else None)
            self.live.follow(channel)

    def _take_live(self) -> None:
        """Apply a sync round that came whole; publish a usage sample that came (an event, the outdir's
        usage.json, the record ``vjobs ps`` reads)."""
        if self.live is None:
            return
        spooled = self.live.take_round()
        if spooled is not None:
            self._apply_round(spooled)
        usage = self.live.take_usage()
        if usage:
            self.live_usage = usage
            elapsed = round(time.monotonic() - self._started, 3)
            write_atomically(self.outdir / USAGE_FILE, json.dumps(
                {"job_id": self.job.id, "at": utc_now(), "elapsed_s": elapsed, **usage}, indent=2) + "\n")
            self._note_running()
            self.events.emit("usage", "guest", usage=dict(usage))

    def _apply_round(self, spooled: Path) -> None:
        with self.events.step("sync_round"):
            applied = self.sync.apply_round(spooled, self.folder / "sync" / "round",
                                            self.job.resources.output_mib << 20)
        if applied.refused:
            self.host.progress(f"a sync round was refused: {applied.refused}")

    def _last_round(self) -> None:
        """Before the VM is stopped early: ask the agent for a round and apply it, if it comes within the
        site's ``sync_on_stop_s`` (a pilot kills 3 s after its SIGTERM)."""
        if self.live is None or not (self.sync.binds or self.job.outputs) or not self.live.request_round():
            return
        deadline = time.monotonic() + self.site.sync_on_stop_s
        while (left := deadline - time.monotonic()) > 0:
            spooled = self.live.take_round(wait_s=left)
            if spooled is not None:
                self._apply_round(spooled)
                return

    def _stop_live_streams(self) -> None:
        if self.live is not None:
            self.live.close()
            if self.live.dropped:
                self.host.progress(f"{self.live.dropped} bytes of live output dropped: more than output_mib "
                                   "allows (the final stdout and stderr come from the results)")
            if self.live.broken:
                self.host.progress(self.live.broken)
            self.live = None

    def _collect(self, vm: VM, disks: JobDisks, stop: Stop) -> None:
        self._stop_live_streams()  # the io disk's copies win; late live bytes must not append to them
        incoming = self.folder / "results"
        try:
            with self.events.step("fetch_disk"):
                io_disk = vm.fetch_disk(disks.io)
            results = read_results(io_disk, incoming, disks.io.path.stat().st_size)
        except VMError as error:
            if stop is Stop.CRASH and error.code == "no_results":
                raise VMError(f"the guest crashed before it wrote results; console: {self._console_tail()!r}",
                              code="guest_crashed") from error
            raise
        with self.events.step("publish"):
            self._publish(incoming, results)
        self._return_binds(incoming / "binds")
        agent_error = results.status.get("error")
        if agent_error:
            raise VMError(self._agent_error_message(agent_error, results.status), code=agent_error)
        _add_guest_timing(self.result.timings, results.status)
        if results.status.get("timed_out"):
            raise WalltimeExceeded(f"job {self.job.id} ran past its wall time of {self.job.walltime_s} s: the "
                                   f"payload got SIGTERM and up to {self.site.stop_grace_s:g} s (stop_grace_s) "
                                   "before SIGKILL; what it had written by then came back")
        exit_code = results.exit_code
        if exit_code is None:
            raise VMError(f"the guest's results carry no exit status; console: {self._console_tail()!r}",
                          code="no_results")
        self.result.exit_code = exit_code
        self.result.status = "succeeded" if exit_code == 0 else "failed"

    def _agent_error_message(self, code: str, status: dict[str, str]) -> str:
        if code == OUTPUT_TOO_LARGE:
            return (f"the job's outputs, stdout and stderr came to {status.get('output_bytes')} bytes, more than "
                    f"/resources/output_mib allows ({status.get('output_limit_bytes')} bytes): nothing but the "
                    "tails of stdout and stderr came back; raise output_mib or match fewer files")
        detail = f" ({status['detail']})" if status.get("detail") else ""
        if code in AGENT_ERRORS:
            return f"{AGENT_ERRORS[code]}{detail}; console: {self._console_tail()!r}"
        return f"the guest agent reported {code}{detail}; console: {self._console_tail()!r}"

    # --- files -----------------------------------------------------------------------------------------

    def _spec(self, image: ResolvedImage, disks: JobDisks, attempt: int) -> VMSpec:
        console = ConsoleLog(self.folder / f"console.{attempt}.log", self.site.console_max_bytes,
                             markers=(AGENT_UP_MARKER, PAYLOAD_MARKER))
        self.consoles.append(console)
        vm_folder = self.folder / f"vm.{attempt}"
        vm_folder.mkdir()
        return VMSpec(name=f"vjobs-{self.job.id}-{self.owner.run_id}", vcpus=self.job.resources.vcpus,
                      memory_mib=self.job.resources.memory_mib, boot=image.boot, disks=disks.all(),
                      console=console, network=self.job.network and self.site.allow_network,
                      owner=self.owner, workdir=vm_folder,
                      restore=self.resuming.saved_guest(self.files) if self.resuming else None)

    def _publish(self, incoming: Path, results: GuestResults) -> None:
        """Move the extracted results into the output folder, replacing those of an earlier run."""
        output_folder(self.outdir)
        for name in ("outputs", "stdout", "stderr"):
            target = self.outdir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            if (incoming / name).exists():
                (incoming / name).rename(target)
        self.result.stdout = str(self.outdir / "stdout") if results.stdout else None
        self.result.stderr = str(self.outdir / "stderr") if results.stderr else None
        self.result.outputs = [vars(output) for output in results.outputs]
        self.result.rejected_outputs = results.rejected
        self.result.usage = {**results.usage, **({"note": results.usage_note} if results.usage_note else {})}

    def _return_binds(self, returned: Path) -> None:
        """What the payload created, changed or removed in each read-write bind, carried into the host folder."""
        self.result.returned_binds = self.sync.finish(returned, self.result.rejected_outputs)

    def _save_console(self) -> None:
        """One console.log for the job, bounded as each attempt's was: a retried boot does not double it."""
        for console in self.consoles:
            console.close()
        logs = [console.path for console in self.consoles if console.path.exists()]
        if not logs:
            return
        output_folder(self.outdir)
        merged = ConsoleLog(self.outdir / "console.log", self.site.console_max_bytes)
        for number, path in enumerate(logs, 1):
            if len(logs) > 1:
                merged.write(f"\n===== vjobs: boot attempt {number} =====\n".encode())
            with open(path, "rb") as log:
                while chunk := log.read(1 << 20):
                    merged.write(chunk)
        merged.close()
        self.result.console_log = str(merged.path)

    def _console_tail(self) -> str:
        if not self.consoles:
            return ""
        return self.consoles[-1].last(CONSOLE_TAIL_BYTES).decode(errors="replace").strip()

    # --- outcome ---------------------------------------------------------------------------------------

    def _fail(self, error: VjobsError) -> None:
        self.result.record(error)
        if not isinstance(error, StageOutFailed):  # after a failed upload the payload's exit status still stands
            self.result.exit_code = None

    def _teardown(self) -> None:
        """Destroy every VM this run created and remove the job folder. Each step runs even when an earlier
        one failed; a failure is recorded, never raised over the job's own outcome."""
        problems = []
        for vm in self.vms:
            try:
                with self.events.step("vm_destroy"):
                    vm.destroy()
            except Exception as exc:
                problems.append(f"destroying {vm.spec.name}: {exc}")
        self._stop_live_streams()  # a job that ended early keeps what its payload had written
        try:
            with self.events.step("save_console"):
                self._save_console()
        except (OSError, VjobsError) as exc:
            problems.append(f"saving the console log: {exc}")
        with self.events.step("remove_job_folder"):
            removed = remove_owned_folder(self.folder)
        if not removed:
            problems.append(f"could not remove {self.folder}")
        if problems and self.result.error is None:
            self.result.status = "vm_error"
            self.result.error = {"code": "teardown_failed", "message": "; ".join(problems)}

    def _note_running(self) -> None:
        """This job's line in ``vjobs ps`` (vjobs/host/running.py), once its folder exists and until it goes."""
        if self.phase_now in ("teardown", "finish") or not self.folder.is_dir():
            return
        resources = self.job.resources
        write_running_record(self.folder, {
            "job_id": self.job.id, "uid": os.geteuid(), "pid": os.getpid(), "driver": self.result.driver,
            "vcpus": resources.vcpus, "memory_mib": resources.memory_mib, "phase": self.phase_now,
            "started_at": self.result.started_at, "started_s": self._started_at, "outdir": str(self.outdir),
            "usage": self.live_usage or {}, "sync": self.sync.summary(self.sync_interval_s) if self.sync else {}})

    def _finish(self) -> None:
        if self.sync is not None:
            self.result.sync = self.sync.summary(self.sync_interval_s)
        if not self.result.usage and self.live_usage:  # ended before its results came back: the last sample
            self.result.usage = {**self.live_usage, "note": "the last live sample: the job ended before its "
                                                            "results came back"}
        self.result.timings["total"] = round(time.monotonic() - self._started, 3)
        payload_seen = [at for console in self.consoles if (at := console.seen_at(PAYLOAD_MARKER))]
        if payload_seen:  # what a user waits for: from the call to the payload's start, as the host saw it
            self.result.timings["to_payload"] = round(min(payload_seen) - self._started, 3)
        conclude_in(self.result, self.outdir)

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """A phase, announced to the run's observers and timed into the result (a phase entered twice, as a
        retried boot's attach and boot are, adds up)."""
        self.signals.cancel_if_signalled()
        started = time.monotonic()
        self.phase_now = name
        try:
            with self.events.phase(name):
                self._note_running()  # inside the phase's event: its time is the phase's, as the result says
                yield
        finally:
            spent = time.monotonic() - started
            self.result.timings[name] = round(self.result.timings.get(name, 0.0) + spent, 3)

    def _base_disk(self, image: ResolvedImage, formats: tuple[str, ...]) -> BaseDisk | None:
        if image.rootfs is None:
            return None
        disk = rootfs_disk_for(image.rootfs, formats, self.host.progress, hold=self.cache_hold, files=self.files)
        return BaseDisk(disk, image.rootfs.info, self.site.payload_user)


def _signal_name(interrupt: KeyboardInterrupt) -> str:
    """The signal a ``Terminated`` names (vjobs/container/signals.py); a bare KeyboardInterrupt is Ctrl-C's."""
    return interrupt.args[0] if interrupt.args else "SIGINT"


def _guest_disk_full(path: Path) -> DiskFull:
    """A guest's writable disk could not grow (its hypervisor paused it, ``Stop.DISK_FULL``)."""
    return DiskFull.at(path, doing="the guest wrote to its disk, which could not grow")


def _add_guest_timing(timings: dict[str, float], status: dict[str, str]) -> None:
    """From the agent's own clock: its set-up (disks, base image, overlay, network) and the payload."""
    for name, start, end in (("guest_setup", "booted_s", "started_s"), ("guest_payload", "started_s", "ended_s")):
        try:
            timings[name] = round(float(status[end]) - float(status[start]), 3)
        except (KeyError, ValueError):
            pass


def _distribution_version(driver: Driver) -> str | None:
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    top = type(driver).__module__.split(".")[0]
    with contextlib.suppress(PackageNotFoundError):  # the usual case, a distribution named as its package:
        return f"{top} {version(top)}"  # ~2 ms, where packages_distributions() reads every package's metadata
    for distribution in packages_distributions().get(top, []):
        with contextlib.suppress(PackageNotFoundError):
            return f"{distribution} {version(distribution)}"
    return None
