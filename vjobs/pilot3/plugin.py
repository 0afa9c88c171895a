"""``vjobs pilot3 install PILOT_DIR``: add the ``vjobs`` user to a Pilot 3 tree.

pilot3 loads its user plugins with ``__import__("pilot.user.<name>...")`` and has no namespace-package hook,
so a plugin must be a folder inside the pilot tree. The installer copies the tree's own ``generic`` user (so
nothing of the pilot's code lives in vjobs) and puts vjobs' files over it (``container.py``, ``diagnose.py``,
``cpu.py``, ``utilities.py`` and their helper ``guest.py``), with the path of the Python that has vjobs
installed written in. Run it again after upgrading either.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from vjobs.errors import SetupError

PLUGIN_FILES = Path(__file__).with_name("user_plugin")


def install_plugin(pilot_dir: Path, name: str = "vjobs", python: str = sys.executable) -> Path:
    users = Path(pilot_dir) / "pilot" / "user"
    generic = users / "generic"
    if not (generic / "container.py").is_file():
        raise SetupError(f"{pilot_dir} is not a Pilot 3 tree (no pilot/user/generic/container.py): give the "
                         "folder that holds pilot.py and pilot/", code="pilot_tree_not_found")
    target = users / name
    staging = users / f".{name}.installing"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(generic, staging, ignore=shutil.ignore_patterns("__pycache__"))
    for source in PLUGIN_FILES.glob("*.py"):
        text = source.read_text().replace("@VJOBS_PYTHON@", python)
        (staging / source.name).write_text(text)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
