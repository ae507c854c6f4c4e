"""Command-line entry points: `clip-zeroshot`, `clip-retrieval`, `clip-linear-probe` (see scripts/)."""
