"""Pre-train or fine-tune a CLIP model from a TOML recipe: `python scripts/train.py configs/demo.toml [key=value ...]`."""

import os
import sys

if __name__ == "__main__":
    # The repository root, when not pip-installed (os.path: already imported, where pathlib would be a first import)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # As the clip-train command: a signal while Python imports torch and the library (seconds, on a loaded node)
    # abandons the start with status 75, not the default action's 143, which slurm_train.sbatch takes for a failure
    from clip_commands import clip_train

    clip_train()
