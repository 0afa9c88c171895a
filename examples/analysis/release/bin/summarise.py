"""A stand-in for a software release's analysis step: reads events (kind, energy in GeV) and writes a JSON
summary per kind. It needs a real OS: Python 3 and its standard library, from the job's base image."""

import csv
import json
import os
import platform
import statistics
import sys
from pathlib import Path


def summarise(events_file: str) -> dict:
    energies: dict[str, list[float]] = {}
    with open(events_file, newline="") as handle:
        for row in csv.DictReader(handle):
            energies.setdefault(row["kind"], []).append(float(row["energy_gev"]))
    return {kind: {"events": len(values), "mean_energy_gev": round(statistics.mean(values), 3),
                   "max_energy_gev": max(values)} for kind, values in sorted(energies.items())}


def main(events_file: str, summary_file: str) -> None:
    os_release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().split("\n") if "=" in line)
    summary = {"analysis": os.environ.get("ANALYSIS"), "python": platform.python_version(),
               "os": os_release.get("PRETTY_NAME", "?").strip('"'), "kinds": summarise(events_file)}
    Path(summary_file).parent.mkdir(parents=True, exist_ok=True)
    Path(summary_file).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:3])
