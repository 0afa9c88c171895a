"""The command line: ``vjobs run|resume|exec|validate|probe|drivers|image|pilot3|gc|ps`` (commands.py),
``vjobs exec``'s apptainer-like front end (exec_command.py). A thin layer over the public API (vjobs/api.py)."""

import contextlib
import sys

RUNS_A_JOB = ("run", "resume", "exec")


def main(argv: list[str] | None = None) -> int:
    """The ``vjobs`` command. One that runs a job holds SIGTERM, SIGHUP and SIGINT before it imports the rest
    of vjobs, so that a signal at any moment ends the job with a ``result.json`` (vjobs/container/signals.py)."""
    words = sys.argv[1:] if argv is None else argv
    held = contextlib.nullcontext()
    if words and words[0] in RUNS_A_JOB:
        from vjobs.container.signals import early_signals_held

        held = early_signals_held()
    with held:
        from vjobs.cli.commands import main as command_line

        return command_line(argv)


__all__ = ["main"]
