"""A short run of the fuzz campaign (fuzz/run.py runs 10,000 cases a surface): job and site documents,
command lines, the guest's results stream and status lines get a result or a typed error, never a crash."""

from __future__ import annotations

import pytest

from vjobs.testing.fuzz import SURFACES, run_surface


@pytest.mark.parametrize("surface", sorted(SURFACES))
def test_no_input_crashes_vjobs(surface):
    assert run_surface(surface, 200) >= 150  # hypothesis raises the shrunk case on any crash
