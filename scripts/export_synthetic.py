"""Write the synthetic shapes' zero-shot set to disk as an ImageFolder tree, to evaluate like any dataset.

    python scripts/export_synthetic.py runs/demo/heldout_images --num-samples 960 --image-size 32 --seed 1

The defaults are those of the demo's own evaluation (configs/demo.toml, [[eval.zeroshot]]), so
`python scripts/zeroshot.py configs/eval/zeroshot_demo_folder.toml` on the written folder reports the same
accuracy as the training run. Writes OUT/<label>_<class>/<index>.png, OUT/classnames.txt (label order)
and OUT/templates.txt (the synthetic world's prompt templates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when not pip-installed

from clip.cli.common import non_negative_int, positive_int
from clip.data import synthetic


def image_size(text: str) -> int:
    """argparse type: the renderer needs 16 pixels to draw its shapes."""
    value = int(text)
    if value < 16:
        raise argparse.ArgumentTypeError(f"must be >= 16 (the shapes need 16 pixels), got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    # Each number is checked here: 0 images wrote an empty tree and said so with status 0, and a negative count or
    # seed, or a size under 16, was a traceback
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="a new or empty folder")
    parser.add_argument("--num-samples", type=positive_int, default=960,
                        help="images in all (cycling through the classes)")
    parser.add_argument("--image-size", type=image_size, default=32, help="side of the square images in pixels (>= 16)")
    parser.add_argument("--seed", type=non_negative_int, default=1,
                        help="which images: the seed of the classification stream")
    args = parser.parse_args(argv)
    dataset = synthetic.SyntheticClassification(args.num_samples, args.image_size, args.seed)
    try:
        root = synthetic.write_image_folder(dataset, args.output_dir)
    except OSError as error:  # a folder holding files, a file, no permission: one line, as argparse says bad usage
        print(f"export_synthetic: {error}", file=sys.stderr)
        return 2
    (root / "templates.txt").write_text("".join(t + "\n" for t in synthetic.templates()), encoding="utf-8")
    print(f"wrote {len(dataset)} images of {len(dataset.classes)} classes to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
