"""Command-line entry points: `clip-train`, `clip-zeroshot`, `clip-retrieval`, `clip-linear-probe`, `clip-export`,
`clip-make-shards` (each also `python scripts/NAME.py` in a source checkout)."""
