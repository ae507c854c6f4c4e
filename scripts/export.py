"""Runs `clip.cli.export.main` from a source checkout (the same as the installed console script)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when not pip-installed

from clip.cli.export import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
