"""Run one step of a stage and write how it ended: ``python -S launch.py EXIT_FILE -- ARGV...``.

The node agent starts every step through this small parent so that the step's exit status survives the
agent: if the agent is killed, the step keeps running (its output goes to files, not pipes) and a
restarted agent reads the status from EXIT_FILE. The launcher shares the step's process group, so a
cancel's SIGTERM reaches both; it ignores that signal itself (a handler, not SIG_IGN, which the step
would inherit) to outlive the step and record ``-15``. EXIT_FILE holds the exit status, or ``127 launch-failed``
when the command could not be started at all (not found, not executable). Only the standard library is used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


def _started(path: str) -> None:
    """Say who runs the step (pid, and boot id:start ticks as node/runner.py's ``process_ident``) before it
    starts, so that an agent that died between starting this launcher and recording it does not start the
    step a second time: its successor finds this file and adopts the step."""
    ident = None
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        with open("/proc/self/stat", encoding="ascii", errors="replace") as fh:
            ident = f"{boot}:{fh.read().rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        pass
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"pid": os.getpid(), "ident": ident}, fh)
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: launch.py EXIT_FILE -- ARGV...", file=sys.stderr)
        return 2
    exit_file, command = argv[0], argv[2:]
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    _started(f"{exit_file}.started")
    try:
        proc = subprocess.Popen(command, restore_signals=True)
    except OSError as e:
        print(f"cannot start {command[0]}: {e}", file=sys.stderr, flush=True)
        status = "127 launch-failed"  # the platform could not start the step: not the stage's own exit
    else:
        status = str(proc.wait())
    tmp = f"{exit_file}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(f"{status}\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, exit_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
