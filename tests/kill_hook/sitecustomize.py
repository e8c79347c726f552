"""Kills or stalls the process as it renames a file into place, at a point the test chooses.

Python runs this module at startup when its folder is on PYTHONPATH (the `site` module imports
`sitecustomize`). With SORAFLOW_TEST_KILL_AT="PATTERN:N" set, the process kills itself (SIGKILL)
at the rename of the (N+1)-th file whose destination matches the glob PATTERN: N such files are
in place, the next one is whole under its temp name, and nothing after it has started. With
SORAFLOW_TEST_STALL_AT="PATTERN:N" it sleeps there instead, until something else ends it (a
Slurm time limit). An audit hook sees every os.rename and os.replace (Path.rename and
Path.replace call them).
"""

import fnmatch
import os
import signal
import sys
import time


def _at_rename(setting: str, act) -> None:
    pattern, allowed = setting.rsplit(":", 1)
    renamed = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal renamed
        if event == "os.rename" and fnmatch.fnmatch(os.fsdecode(args[1]), pattern):
            renamed += 1
            if renamed > int(allowed):
                act()

    sys.addaudithook(hook)


if os.environ.get("SORAFLOW_TEST_KILL_AT"):
    _at_rename(os.environ["SORAFLOW_TEST_KILL_AT"], lambda: os.kill(os.getpid(), signal.SIGKILL))
if os.environ.get("SORAFLOW_TEST_STALL_AT"):
    _at_rename(os.environ["SORAFLOW_TEST_STALL_AT"], lambda: time.sleep(10**6))
