"""``fastgrpo train`` in a process the fault-injection test (tests/test_fault_injection.py) kills.

    python tests/fault_driver.py [PAUSE_STEP MARKER] -- TRAIN_ARGS...

With PAUSE_STEP, the save of that step's checkpoint stops just before its directory is renamed into
place (everything written, nothing published), touches MARKER and sleeps: the test kills it there.
"""

import os
import sys
import time
from pathlib import Path

from fastgrpo.cli import main
from fastgrpo.train import checkpoint

if __name__ == "__main__":
    split = sys.argv.index("--")
    hook, args = sys.argv[1:split], sys.argv[split + 1 :]
    if hook:
        step, marker = int(hook[0]), Path(hook[1])
        replace = os.replace

        def paused_replace(src, dst, *a, **k):
            if Path(dst).name == f"{checkpoint.PREFIX}{step}":
                marker.touch()
                time.sleep(3600)
            return replace(src, dst, *a, **k)

        checkpoint.os.replace = paused_replace
    sys.exit(main(["train", *args]))
