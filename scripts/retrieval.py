"""Runs `clip.cli.retrieval.main` from a source checkout, as the installed console script does (`clip_commands`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when not pip-installed

# Through clip_commands, as the console script: a Ctrl-C while it imports the library is one line, not a traceback
from clip_commands import clip_retrieval  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(clip_retrieval())
