"""The command line: ``vjobs run|exec|validate|probe|drivers|image|pilot3|gc`` (main.py), ``vjobs exec``'s
apptainer-like front end (exec_command.py). A thin layer over the public API (vjobs/api.py)."""

from vjobs.cli.main import main

__all__ = ["main"]
