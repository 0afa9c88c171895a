"""The PanDA Pilot 3 sdist the pilot tests run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vjobs.pilot3.harness import fetch_sdist, why_not_runnable


@pytest.fixture(scope="session")
def pilot3_sdist(cache_dir) -> Path:
    """The unpacked panda-pilot sdist: VJOBS_PILOT3_SDIST names one, else it is downloaded once into the
    session cache. Skips when it cannot be had or run safely here; scripts/test.sh makes that a failure."""
    required = os.environ.get("VJOBS_REQUIRE_PILOT3")
    try:
        given = os.environ.get("VJOBS_PILOT3_SDIST")
        folder = Path(given) if given else fetch_sdist(cache_dir / "pilot3")
    except RuntimeError as exc:
        (pytest.fail if required else pytest.skip)(str(exc))
    why_not = why_not_runnable(folder)
    if why_not:
        (pytest.fail if required else pytest.skip)(f"PanDA Pilot 3 cannot run here: {why_not}")
    return folder
