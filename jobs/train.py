"""Train PPRL-VGAN on a Ray cluster: ``ray job submit --working-dir . -- python jobs/train.py --data ... --storage ...``.

Same options as ``pprl train`` (see docs/training.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from `ray job submit --working-dir .`
from pprl.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
