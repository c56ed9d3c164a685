"""Anonymise archived footage on a Ray cluster: ``ray job submit --working-dir . -- python jobs/anonymize.py --input ...``.

Same options as ``pprl anonymize-footage`` (see docs/footage.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))  # works from `ray job submit --working-dir .`
from pprl.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["anonymize-footage", *sys.argv[1:]])
