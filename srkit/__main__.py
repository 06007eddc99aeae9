"""`srkit` (the console script) and `python -m srkit`: the command line, with Ctrl-C handled from the first instant.

Importing the command line takes seconds (PyTorch); a Ctrl-C then would print a traceback from deep inside an
import.  Until a command starts, SIGINT ends the process at once with "interrupted" and exit code 130; the
command line then restores Python's KeyboardInterrupt, which a batch turns into a report of what was written and
what was not.  This module imports nothing heavy, so the handler is in place before anything slow starts.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(130)  # nothing was started yet: no file to finish, nothing to clean up


def exit_quietly_on_interrupt() -> None:
    signal.signal(signal.SIGINT, _interrupted)


def main() -> None:
    exit_quietly_on_interrupt()
    from srkit.cli import main as run

    run()


if __name__ == "__main__":
    main()
