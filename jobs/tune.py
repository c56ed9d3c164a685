"""Search the loss weights with Ray Tune: ``ray job submit --working-dir . -- python jobs/tune.py --data ... --storage ...``.

Same options as ``pprl tune`` (see docs/tuning.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from `ray job submit --working-dir .`
from pprl.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]])
