"""Pre-train or fine-tune a CLIP model from a TOML recipe: `python scripts/train.py configs/demo.toml [key=value ...]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when not pip-installed

from clip.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
