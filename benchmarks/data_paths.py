#!/usr/bin/env python3
"""Issue 11, goal 3: the data paths at speed, each beside its floor measured in the same run, interleaved.

    .venv/bin/python benchmarks/data_paths.py [--scale 1] [--runs 5] [--goals abcd] [--tmp DIR] [--site FILE]

--scale 0.05 is a quick check (100 MB and 5,000 files, about 3 minutes, most of it waiting, see below); the
default (1) is the issue's sizes: about 15 GB free under --tmp with --runs 5 (checked first) and 15-20
minutes on a 2-core machine, most of it 3d's guest reading 2 GB five times under TCG. The test trees are
built under a fresh folder in --tmp and removed at the end, whatever happened. ``measure(args)`` returns a
benchmarks.report.Section (benchmarks/speed.py gathers it); ``main()`` prints the comparisons.

3a. release image build: a 2 GB, 100,000-file release tree (lognormal file sizes, about 60 % of the bytes
    compressible text, the rest random; 100 files per folder) built into its cached squashfs by
    ``vjobs.guest.disks.release_image`` (the fingerprint walk, mksquashfs -comp lz4, the image's sha256), each run
    into an empty cache, against ``cp -a`` of the same tree to a fresh folder on the same file system.
    Reuse: ``release_image`` of the unchanged tree with its image cached, against ``find -printf`` of the
    tree's names, sizes and mtimes (a C-speed stat walk: the least work that can tell the tree is unchanged).
3b. inputs onto the guest's disks: a 2 GB inputs folder of 1,000 files, then one of 100,000 files, made into
    the job's inputs image by ``vjobs.guest.disks.build_inputs_image`` (an uncompressed erofs) and its fresh
    scratch ext4 by ``build_scratch`` (``mke2fs -d``, room kept for the inputs), against ``cp -a`` of it.
3c. outputs collected: a 1 GB, 100-file results tar, written with busybox tar (the guest agent's tar) as the
    agent lays it out, onto a raw io disk file just larger than it, read by ``vjobs.guest.collect.read_results``
    (the path filter, the size limits, each file written and hashed), against ``dd`` of the raw disk file
    to a file beside it.
3d. release reads in the guest: a job (qemu_user or the site's driver, built-in busybox image) with the
    3a tree as its release reads every file of the mounted release with ``cat``, and ``dd``s the raw
    release device, interleaved, in the same guest, timed by the payload with the guest's clock.

Page cache: on the host both sides are warm (each tree or disk is read whole just before its rounds, and
each timed step starts after a ``sync``); in the guest (3d) the guest's page cache is dropped before each
read on both sides, while the host's copy of the image stays warm.

Fairness on a file system without a journal: see ``Trees`` (nothing with many files is removed while a goal
is timed). Files removed by others just before a run can still slow ``cp -a`` (the floor): the spread shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import vjobs  # noqa: E402
from benchmarks.report import Comparison, Section, print_comparisons, print_section  # noqa: E402
from vjobs.config.job import job_from_dict  # noqa: E402
from vjobs.guest.collect import read_results  # noqa: E402
from vjobs.guest.disks import (RELEASE_TOOLS, build_inputs_image, build_scratch, release_image,  # noqa: E402
                               tree_fingerprint)
from vjobs.host.cache import CacheHold  # noqa: E402
from vjobs.images.store import sha256_file  # noqa: E402
from vjobs.testing.sites import seed_cache  # noqa: E402

GB = 10 ** 9
MIB = 1 << 20
RELEASE_BYTES, RELEASE_FILES = 2 * GB, 100_000
INPUT_BYTES, INPUT_FILES = 2 * GB, (1_000, 100_000)  # two folders, one after the other
OUTPUT_BYTES, OUTPUT_FILES = 1 * GB, 100
FILES_PER_FOLDER = 100
POOL_BYTES = 32 * MIB  # each of the two pools (text-like, random) that file contents are cut from
GOAL_SPEED = 0.8  # "at >= 0.8 x the speed of its floor": a time ratio of at most 1 / 0.8
GOAL_REUSE_S = 0.5


# --- test trees ------------------------------------------------------------------------------------------

class Pools:
    """Deterministic file contents: compressible text (words from a small vocabulary) and random bytes."""

    def __init__(self, seed: int = 11):
        rng = random.Random(seed)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 12)))
                 for _ in range(3000)]
        lines, size = [], 0
        while size < 2 * MIB:
            line = " ".join(rng.choices(words, k=rng.randint(3, 14))) + "\n"
            lines.append(line)
            size += len(line)
        block = "".join(lines).encode()
        self.text = memoryview((block * (POOL_BYTES // len(block) + 1))[:POOL_BYTES])
        self.random = memoryview(rng.randbytes(POOL_BYTES))
        self.rng = rng

    def write(self, path: Path, size: int, text: bool) -> None:
        pool = self.text if text else self.random
        with open(path, "wb") as handle:
            while size > 0:
                start = self.rng.randrange(0, len(pool) - min(size, len(pool)) + 1)
                chunk = pool[start:start + min(size, len(pool))]
                handle.write(chunk)
                size -= len(chunk)


def file_sizes(count: int, total: int, rng: random.Random, sigma: float = 1.6, cap: int = 64 * MIB) -> list[int]:
    """``count`` lognormal sizes that add up to ``total`` (none above ``cap``)."""
    raw = [rng.lognormvariate(0, sigma) for _ in range(count)]
    scale = total / sum(raw)
    sizes = [min(cap, max(0, int(value * scale))) for value in raw]
    sizes[sizes.index(max(sizes))] += total - sum(sizes)  # the rounding (and any cut) onto the largest
    return sizes


def make_tree(root: Path, count: int, total: int, text_share: float, pools: Pools, sigma: float = 1.6) -> None:
    """``count`` files of ``total`` bytes under ``root``, FILES_PER_FOLDER per folder, two folder levels."""
    rng = random.Random(f"{root.name}-{count}-{total}")
    for number, size in enumerate(file_sizes(count, total, rng, sigma)):
        folder = root / f"d{number // (FILES_PER_FOLDER * 30):03d}" / f"e{number // FILES_PER_FOLDER % 30:02d}"
        if number % FILES_PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        text = rng.random() < text_share
        pools.write(folder / f"f{number:06d}.{'txt' if text else 'bin'}", size, text)


def tree_bytes(root: Path) -> tuple[int, int]:
    total = files = 0
    for folder, _dirs, names in os.walk(root):
        for name in names:
            total += os.lstat(os.path.join(folder, name)).st_size
            files += 1
    return total, files


# --- timing ----------------------------------------------------------------------------------------------

def timed(action: Callable[[], object]) -> float:
    os.sync()  # what an earlier step left dirty is not written back in the middle of this one
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Trees:
    """Folders of many files that a goal's rounds leave (``cp -a`` copies), removed only between goals.

    Creating files just after many were deleted can be very slow: ext4 without a journal (this machine's /tmp)
    skips, one lookup each, every inode deleted within the last minute (``recently_deleted`` in the kernel's
    ialloc.c), and a ``cp -a`` of 100,000 files after an ``rm -rf`` of as many took 20-70 s instead of 5-8 s.
    So nothing with many files is removed while a goal is being timed, and the next goal's timing waits until
    a minute has passed since the last such removal (after a ``sync``)."""

    SETTLE_S = 62

    def __init__(self):
        self.kept: list[Path] = []
        self.removed_at = 0.0

    def keep(self, path: Path) -> None:
        self.kept.append(path)

    def remove(self, *paths: Path) -> None:
        for path in (*self.kept, *paths):
            if path.exists():
                remove(path)
        self.kept.clear()
        os.sync()
        self.removed_at = time.monotonic()

    def settle(self) -> None:
        left = self.removed_at + self.SETTLE_S - time.monotonic()
        if left > 0:
            print(f"  (waiting {left:.0f} s: many files were just removed)", flush=True)
            time.sleep(left)


def interleaved(runs: int, first: Callable[[int], float], second: Callable[[int], float]) -> tuple[list, list]:
    """Each of ``runs`` rounds times both; the order alternates, so neither always follows the other."""
    a, b = [], []
    for number in range(runs):
        if number % 2 == 0:
            a.append(first(number))
            b.append(second(number))
        else:
            b.append(second(number))
            a.append(first(number))
    return a, b


def size_text(total: int, files: int) -> str:
    return f"{total / GB:.2f} GB in {files:,} files"


# --- 3a --------------------------------------------------------------------------------------------------

def warm(tree: Path) -> None:
    """Read every file once, so that both sides start from the same warm page cache."""
    subprocess.run(["find", str(tree), "-type", "f", "-exec", "cat", "{}", "+"], check=True,
                   stdout=subprocess.DEVNULL)


def goal_a(tree: Path, scratch: Path, runs: int, trees: Trees) -> list[Comparison]:
    total, files = tree_bytes(tree)
    progress: list[str] = []
    image_bytes = []

    def build(number: int) -> float:
        cache = scratch / f"a-cache-{number}"
        with CacheHold() as hold:
            seconds = timed(lambda: release_image(tree, cache, "squashfs", progress.append, hold=hold))
            image, _ = release_image(tree, cache, "squashfs", progress.append, hold=hold)
            image_bytes.append(image.stat().st_size)
        remove(cache)  # a few files
        return seconds

    def copy(number: int) -> float:
        target = scratch / f"a-copy-{number}"
        trees.keep(target)
        return timed(lambda: run("cp", "-a", str(tree), str(target)))

    warm(tree)
    built, copied = interleaved(runs, build, copy)

    # The steps of a build, one at a time (shown for reference): where the time goes.
    steps: dict[str, list[float]] = {"fingerprint walk": [], "mksquashfs": [], "sha256 of the image": []}
    for number in range(min(runs, 3)):
        steps["fingerprint walk"].append(timed(lambda: tree_fingerprint(tree)))
        image = scratch / f"a-step-{number}.squashfs"
        steps["mksquashfs"].append(timed(lambda: run(*RELEASE_TOOLS["squashfs"](tree, image))))
        steps["sha256 of the image"].append(timed(lambda: sha256_file(image)))
        remove(image)

    cache = scratch / "a-cache-reuse"
    with CacheHold() as hold:
        release_image(tree, cache, "squashfs", progress.append, hold=hold)
        reused, walked = interleaved(
            runs, lambda _: timed(lambda: release_image(tree, cache, "squashfs", progress.append, hold=hold)),
            lambda _: timed(lambda: run("find", str(tree), "-printf", "%P %y %m %s %T@ %l\n")))
    remove(cache)

    what = size_text(total, files)
    image_mb = statistics.median(image_bytes) / 1e6
    step_text = ", ".join(f"{name} {statistics.median(values):.2f} s" for name, values in steps.items())
    return [
        Comparison("3a. release image build", f"release squashfs of {what}, empty cache", built,
                   "`cp -a` of the same tree", copied, goal_ratio=round(1 / GOAL_SPEED, 3),
                   note=f"image {image_mb:.0f} MB; {total / statistics.median(built) / 1e6:.0f} MB/s against "
                        f"{total / statistics.median(copied) / 1e6:.0f} MB/s; the steps one by one: "
                        f"{step_text} (medians)"),
        Comparison("3a. release image reuse", f"release image of the unchanged {what}, cached", reused,
                   "`find -printf` of names, types, modes, sizes, mtimes (a C stat walk)", walked,
                   absolute_goal=GOAL_REUSE_S),
    ]


# --- 3b --------------------------------------------------------------------------------------------------

def goal_b(inputs: Path, scratch: Path, runs: int, trees: Trees) -> list[Comparison]:
    total, files = tree_bytes(inputs)
    job = job_from_dict({"id": "bench-inputs", "command": ["true"], "inputs": str(inputs)})

    def disks(folder: Path) -> None:
        image = build_inputs_image(job, folder)
        build_scratch(job, folder, room_for_inputs=image.stat().st_size)

    def build(number: int) -> float:
        folder = scratch / f"b-job-{number}"
        folder.mkdir()
        seconds = timed(lambda: disks(folder))
        remove(folder)  # the inputs' image and the scratch disk: two files
        return seconds

    def copy(number: int) -> float:
        target = scratch / f"b-copy-{number}"
        trees.keep(target)
        return timed(lambda: run("cp", "-a", str(inputs), str(target)))

    warm(inputs)
    built, copied = interleaved(runs, build, copy)
    return [Comparison("3b. inputs onto the guest's disks", f"inputs' erofs and scratch ext4 for "
                       f"{size_text(total, files)} of inputs",
                       built, "`cp -a` of the same folder", copied, goal_ratio=round(1 / GOAL_SPEED, 3),
                       note=f"{total / statistics.median(built) / 1e6:.0f} MB/s against "
                            f"{total / statistics.median(copied) / 1e6:.0f} MB/s")]


# --- 3c --------------------------------------------------------------------------------------------------

def results_disk(scratch: Path, total: int, count: int, pools: Pools) -> Path:
    """A raw io disk as the agent leaves it: busybox tar of vjobs/status, stdout, stderr and work/out/."""
    root = scratch / "c-guest"
    (root / "vjobs").mkdir(parents=True)
    (root / "vjobs" / "status").write_text("started_s=1.00\nended_s=2.00\nexit_code=0\n")
    (root / "vjobs" / "stdout").write_text("done\n")
    (root / "vjobs" / "stderr").write_text("")
    rng = random.Random(f"outputs-{count}-{total}")
    (root / "work" / "out").mkdir(parents=True)
    for number, size in enumerate(file_sizes(count, total, rng, sigma=0.5)):
        pools.write(root / "work" / "out" / f"result{number:04d}.bin", size, text=False)
    disk = scratch / "c-io.raw"
    busybox = shutil.which("busybox")
    argv = [busybox, "tar"] if busybox else ["tar", "--format=ustar"]
    run(*argv, "-cf", str(disk), "-C", str(root), "vjobs/status", "vjobs/stdout", "vjobs/stderr", "work/out")
    os.truncate(disk, (disk.stat().st_size // MIB + 1) * MIB)  # the io disk: just above what the results take
    remove(root)
    return disk


def goal_c(scratch: Path, runs: int, scale: float, pools: Pools) -> list[Comparison]:
    total, files = int(OUTPUT_BYTES * scale), max(1, round(OUTPUT_FILES * scale))
    disk = results_disk(scratch, total, files, pools)
    limit = disk.stat().st_size

    def collect(number: int) -> float:
        target = scratch / f"c-out-{number}"
        seconds = timed(lambda: read_results(disk, target, limit))
        remove(target)  # a few files
        return seconds

    def copy(number: int) -> float:
        target = scratch / f"c-dd-{number}"
        seconds = timed(lambda: subprocess.run(["dd", f"if={disk}", f"of={target}", "bs=1M"], check=True,
                                               capture_output=True))
        remove(target)
        return seconds

    subprocess.run(["cat", str(disk)], check=True, stdout=subprocess.DEVNULL)  # warm
    collected, copied = interleaved(runs, collect, copy)
    remove(disk)
    return [Comparison("3c. outputs collected", f"`read_results` of {size_text(total, files)} on the raw io disk",
                       collected, "`dd bs=1M` of the raw io disk file to a file", copied,
                       goal_ratio=round(1 / GOAL_SPEED, 3),
                       note=f"io disk {limit / 1e6:.0f} MB; {total / statistics.median(collected) / 1e6:.0f} MB/s "
                            f"against {limit / statistics.median(copied) / 1e6:.0f} MB/s")]


# --- 3d --------------------------------------------------------------------------------------------------

GUEST_READS = r"""
device=$(awk '$2 == "/opt/release" { print $1 }' /proc/mounts)
clock() { read -r now _ < /proc/uptime; echo "$now"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
read_files() { find /opt/release -type f -exec cat {} + > /dev/null; }
read_device() { dd if="$device" of=/dev/null bs=1M 2> /dev/null; }
round=0
while [ $round -lt "$ROUNDS" ]; do
    for step in files device; do
        [ $((round % 2)) = 1 ] && step=$([ $step = files ] && echo device || echo files)
        cold
        start=$(clock)
        read_$step
        echo "$step $start $(clock)"
    done
    round=$((round + 1))
done
echo "device_bytes $(cat /sys/class/block/${device#/dev/}/size)"
"""


def goal_d(tree: Path, site, scratch: Path, runs: int) -> list[Comparison]:
    total, files = tree_bytes(tree)
    job = {"id": "bench-release-reads", "command": ["sh", "-c", GUEST_READS], "env": {"ROUNDS": str(runs)},
           "release": {"path": str(tree), "mount": "/opt/release"}, "walltime_s": 3600}
    result = vjobs.run(job, site=site, outdir=scratch / "d-out")
    if result.status != "succeeded" or result.exit_code != 0:
        raise SystemExit(f"3d: the guest job failed: {result.status} {result.error}; see {scratch / 'd-out'}")
    samples: dict[str, list[float]] = {"files": [], "device": []}
    device_bytes = 0
    for line in (scratch / "d-out" / "stdout").read_text().splitlines():
        fields = line.split()
        if fields[0] in samples:
            samples[fields[0]].append(float(fields[2]) - float(fields[1]))
        elif fields[0] == "device_bytes":
            device_bytes = int(fields[1]) * 512
    accelerations = [v.acceleration for v in vjobs.probe(site) if v.driver == result.driver and v.acceleration]
    what = (f"`cat` of every file of the mounted release ({size_text(total, files)}), {result.driver}"
            + "".join(f", {name.upper()}" for name in accelerations[:1]))
    return [Comparison("3d. release reads in the guest", what,
                       samples["files"], "`dd bs=1M` of the raw release device, same guest", samples["device"],
                       goal_ratio=round(1 / GOAL_SPEED, 3),
                       note=f"{total / statistics.median(samples['files']) / 1e6:.0f} MB/s of file contents "
                            f"against {device_bytes / statistics.median(samples['device']) / 1e6:.0f} MB/s of "
                            f"the {device_bytes / GB:.2f} GB device (guest clock, 10 ms steps)")]


@contextlib.contextmanager
def bench_site(args, folder: Path) -> Iterator:
    """The site's config with a cache and work folder of our own (the release image of 3d goes there and
    goes with it), the site's built boot image and probe verdicts hard-linked in so that nothing is rebuilt."""
    site = vjobs.load_site(args.site)
    cache = folder / "cache"
    seed_cache(Path(site.cache_dir), cache, probes=True)
    yield dataclasses.replace(site, cache_dir=cache, work_dir=folder / "work")


# --- the whole ---------------------------------------------------------------------------------------------

def needed_bytes(scale: float, runs: int, goals: str) -> int:
    """Disk space at the peak: a goal's tree and its kept copies, the largest of a build's own files."""
    need = 0.0
    if "a" in goals or "d" in goals:
        need = RELEASE_BYTES * (1 + runs + 1.0)  # the tree, the copies, an image
    if "b" in goals:
        need = max(need, INPUT_BYTES * (1 + runs + 1.2))  # the inputs, the copies, the inputs image
    if "c" in goals:
        need = max(need, OUTPUT_BYTES * 3.2)  # the io disk, the outputs or a copy, the staging tree
    return int(need * scale) + GB // 2


def measure(args: argparse.Namespace) -> Section:
    scale, runs, goals = args.scale, args.runs, args.goals
    need, free = needed_bytes(scale, runs, goals), shutil.disk_usage(args.tmp).free
    if free < need:
        raise SystemExit(f"{args.tmp} has {free / GB:.1f} GB free, --scale {scale:g} --runs {runs} needs about "
                         f"{need / GB:.1f} GB: free space, choose --tmp elsewhere, fewer --runs or a smaller --scale")
    comparisons: list[Comparison] = []
    trees = Trees()
    with tempfile.TemporaryDirectory(prefix="vjobs-data-paths-", dir=args.tmp) as name:
        folder = Path(name)
        pools = Pools()
        if "a" in goals or "d" in goals:
            tree = folder / "release"
            started = time.monotonic()
            make_tree(tree, max(1, round(RELEASE_FILES * scale)), int(RELEASE_BYTES * scale), 0.6, pools)
            print(f"release tree: {size_text(*tree_bytes(tree))} made in {time.monotonic() - started:.1f} s",
                  flush=True)
            if "a" in goals:
                comparisons += goal_a(tree, folder, runs, trees)
                print_comparisons(comparisons[-2:])
            if "d" in goals:
                with bench_site(args, folder) as site:
                    comparisons += goal_d(tree, site, folder, runs)
                print_comparisons(comparisons[-1:])
            trees.remove(tree, folder / "cache", folder / "work", folder / "d-out")
        for count in INPUT_FILES if "b" in goals else ():
            inputs = folder / f"inputs-{count}"
            make_tree(inputs, max(1, round(count * scale)), int(INPUT_BYTES * scale), 0.0, pools, sigma=1.0)
            trees.settle()
            comparisons += goal_b(inputs, folder, runs, trees)
            print_comparisons(comparisons[-1:])
            trees.remove(inputs)
        if "c" in goals:
            trees.settle()
            comparisons += goal_c(folder, runs, scale, pools)
            print_comparisons(comparisons[-1:])
    sizes = "the issue's sizes" if scale == 1 else f"--scale {scale:g} of the issue's sizes"
    text = (f"`benchmarks/data_paths.py --scale {scale:g} --runs {runs}`, {sizes}; each goal beside its floor, "
            "interleaved (the order alternates per round), medians (min–max). Ratios are time ratios; "
            f"\"at ≥ {GOAL_SPEED:g} × the floor's speed\" is a time ratio of at most {1 / GOAL_SPEED:g}. "
            "Page cache: on the host both sides warm (each tree read whole just before its rounds, and every "
            "timed step starts after a `sync`); in the guest (3d) the guest's page cache dropped before every "
            "read on both sides, the host's copy of the image warm. 3c's results tar is written on the host with "
            "busybox tar in the agent's layout, not by a guest. The `cp -a` copies stay until their goal ends: "
            "on ext4 without a journal, creating files in the minute after many were deleted is many times "
            "slower (see `Trees` in the script).")
    return Section("Data paths (issue 11, goal 3)", comparisons, text)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="of the issue's sizes (default 1: 2 GB, 100,000 "
                        "files; 0.05 for a quick check)")
    parser.add_argument("--runs", type=int, default=5, help="rounds per goal, each timing both sides")
    parser.add_argument("--goals", default="abcd", help="which of a, b, c, d (default all)")
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the test trees go")
    parser.add_argument("--site", default=None, help="site config for 3d's job (its driver, its built image)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    print_section(measure(arguments(argv)))


if __name__ == "__main__":
    main()
