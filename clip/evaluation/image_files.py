"""Reading one evaluation image from disk: `read_image`, and `UnreadableImageError` for a file it cannot
decode, which the evaluation loaders skip and count (see features.py). Shared by the classification
datasets and by retrieval."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from clip.data.decoding import DECODED_FORMATS, registered_formats
from clip.image_modes import central_part

Transform = Callable[[Image.Image], Any]
# Longer side over shorter side beyond which an evaluation image is cut to its central part of this ratio
# (panoramas are ~10:1). The preprocessing resizes the shorter side to the model's resolution, the longer one
# in proportion: a 1 x 8000 image of a few bytes became 224 x 1,792,000 pixels (1.6 GB, seconds) under a
# transform of torchvision's, which a caller may pass. The model's own preprocess (clip.preprocess) cuts to 32:1
# as well, and its centre crop keeps the middle of either cut: the cut part gives the same pixels.
MAX_ASPECT_RATIO = 100


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; evaluation loaders skip and count these (see features.py)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path


def read_image(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():  # the size is refused below, with the file's name, not warned about
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path, formats=registered_formats(EVALUATION_FORMATS))  # reads the header only
        with opened as image:
            _refuse_decompression_bomb(image, path)
            image.load()  # read now, so the file is closed when we return
            # A hairline image was skipped as unreadable, although training reads it (cut the same way)
            return central_part(image, MAX_ASPECT_RATIO)
    except UnreadableImageError:
        raise
    except MemoryError:  # the machine's, not the file's
        raise
    # Corrupt files surface as OSError, ValueError, SyntaxError, EOFError, zlib.error, a decoder's RuntimeError
    # (a damaged AVIF named .jpg ended the whole evaluation), depending on the plugin and where the data breaks off
    except Exception as error:
        raise UnreadableImageError(path, str(error) or type(error).__name__) from error


# The formats training decodes (`clip.data.decoding.DECODED_FORMATS`), PPM/PGM, which image folders take as
# torchvision's do, and AVIF and JPEG 2000, which phones and scanners save under a .jpg name: a file is opened as
# what its bytes say, and no other plugin (EPS's hands the file to Ghostscript) reads an evaluation set's files
EVALUATION_FORMATS = (*DECODED_FORMATS, "PPM", "AVIF", "JPEG2000")


def _refuse_decompression_bomb(image: Image.Image, path: Path) -> None:
    """PIL refuses images of more than twice Image.MAX_IMAGE_PIXELS, and only warns between once and twice:
    a 150-megapixel PNG of a few hundred KB was decoded (seconds, and 450 MB as RGB in each loader worker),
    its warning lost in a worker's output. Evaluation images are far smaller: above the limit is a skip."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise UnreadableImageError(
            path, f"{width}x{height} pixels is more than PIL.Image.MAX_IMAGE_PIXELS ({limit}): a decompression "
            f"bomb, or an image far larger than evaluation needs"
        )
