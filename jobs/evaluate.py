"""Evaluate privacy vs utility on a Ray cluster: ``ray job submit --working-dir . -- python jobs/evaluate.py --model ... --data ... --out ...``.

Same options as ``pprl evaluate`` (see docs/evaluation.md); the classifiers run as parallel Ray tasks.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from `ray job submit --working-dir .`
from pprl.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
