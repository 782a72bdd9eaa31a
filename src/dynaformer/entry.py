"""The `dynaformer` command's first code. It sets up the stop signals before anything heavy is imported (torch
takes a second or more), so that SIGTERM or Ctrl-C at any moment, even while the program starts, ends it with
one line and exit code 130, and a signal that arrives after the command has finished no longer changes its
exit code."""

from __future__ import annotations

import signal
import sys
import threading


def _as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # Only when run as the program (no argv given, on the main thread): a caller's process keeps its handlers.
    program = argv is None and threading.current_thread() is threading.main_thread()
    if program:  # the commands install their own handling later and put this one back when they end
        signal.signal(signal.SIGTERM, _as_interrupt)
    code = 130
    try:
        from .cli import main as cli_main

        code = cli_main(argv)
    except KeyboardInterrupt:  # while starting, or escaped from a command's own handling
        print("dynaformer: interrupted before the command finished; run it again to redo it", file=sys.stderr)
        code = 130
    finally:
        if program:  # the outcome is decided: a late second signal must not turn it into 143 or a traceback
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(main())
