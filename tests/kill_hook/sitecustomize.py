"""Kills the process (SIGKILL) as it renames a file into place, at a point the test chooses.

Python runs this module at startup when its folder is on PYTHONPATH (the `site` module imports
`sitecustomize`). With SORAFLOW_TEST_KILL_AT="PATTERN:N" set, the process kills itself at the
rename of the (N+1)-th file whose destination matches the glob PATTERN: N such files are in
place, the next one is whole under its temp name, and nothing after it has started. An audit
hook sees every os.rename and os.replace (Path.rename and Path.replace call them).
"""

import fnmatch
import os
import signal
import sys

_setting = os.environ.get("SORAFLOW_TEST_KILL_AT")
if _setting:
    _pattern, _allowed = _setting.rsplit(":", 1)
    _renamed = 0

    def _kill_at_rename(event: str, args: tuple) -> None:
        global _renamed
        if event == "os.rename" and fnmatch.fnmatch(os.fsdecode(args[1]), _pattern):
            _renamed += 1
            if _renamed > int(_allowed):
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(_kill_at_rename)
