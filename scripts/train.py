"""Pre-train or fine-tune a CLIP model from a TOML recipe: `python scripts/train.py configs/demo.toml [key=value ...]`."""

import sys

from clip.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
