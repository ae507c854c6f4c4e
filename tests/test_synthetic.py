"""Tests for clip.data.synthetic: determinism, the held-out split, labels that match the pixels, captions,
and the ImageFolder export."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from clip.data.synthetic import (
    COLOURS,
    DEFAULT_HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    SyntheticCaptions,
    SyntheticClassification,
    SyntheticSpec,
    class_folder_name,
    templates,
    write_image_folder,
)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def shape_pixels(image: Image.Image) -> np.ndarray:
    """The 20 pixels that differ most from the image's median (the background), as a [20, 3] array; the
    smallest shape covers more than 100 pixels at 64 x 64."""
    array = pixels(image).reshape(-1, 3)
    distance = np.abs(array - np.median(array, axis=0)).sum(axis=1)
    return array[np.argsort(distance)[-20:]]


# -------------------------------------------------------------------------------------------- determinism


def test_same_index_same_pixels_and_caption():
    first = SyntheticCaptions(50, image_size=32, seed=3)
    second = SyntheticCaptions(50, image_size=32, seed=3)
    for index in (0, 7, 49):
        image_a, caption_a = first[index]
        image_b, caption_b = second[index]
        assert image_a.mode == "RGB" and image_a.size == (32, 32)
        assert np.array_equal(pixels(image_a), pixels(image_b))
        assert caption_a == caption_b == first.describe(index)["caption"]
    # Order of access does not matter: item 7 depends on (seed, split, 7) only.
    assert np.array_equal(pixels(SyntheticCaptions(50, 32, seed=3)[7][0]), pixels(first[7][0]))


def test_items_survive_pickling_for_workers():
    dataset = SyntheticCaptions(10, image_size=32, seed=1)
    restored = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(pixels(restored[4][0]), pixels(dataset[4][0]))


def test_seeds_splits_and_indices_differ():
    base = SyntheticCaptions(20, image_size=32, seed=0)
    other_seed = SyntheticCaptions(20, image_size=32, seed=1)
    validation = SyntheticCaptions(20, image_size=32, seed=0, split="val")
    classification = SyntheticClassification(20, image_size=32, seed=0)
    for index in range(5):
        image = pixels(base[index][0])
        assert not np.array_equal(image, pixels(other_seed[index][0]))
        assert not np.array_equal(image, pixels(validation[index][0]))
        assert not np.array_equal(image, pixels(classification[index][0]))
    assert len({base[index][1] for index in range(20)}) > 10  # captions vary


def test_length_and_index_errors():
    dataset = SyntheticCaptions(3, image_size=32)
    assert len(dataset) == 3
    with pytest.raises(IndexError):
        dataset[3]
    assert dataset[-1][1] == dataset[2][1]
    with pytest.raises(ValueError, match="split"):
        SyntheticCaptions(3, split="test")


# ------------------------------------------------------------------------------------------ held-out pairs


def test_heldout_pairs_never_in_training_and_every_word_is():
    dataset = SyntheticCaptions(3000, image_size=32, seed=0)
    seen = Counter(f"{d['colour']} {d['shape']}" for d in map(dataset.describe, range(len(dataset))))
    assert not set(DEFAULT_HELDOUT_PAIRS) & set(seen)
    assert {name.split()[0] for name in seen} == set(COLOURS)
    assert {name.split()[1] for name in seen} == set(SHAPES)
    # Every allowed pair appears (42 pairs, ~70 draws each).
    assert len(seen) == len(COLOURS) * len(SHAPES) - len(DEFAULT_HELDOUT_PAIRS)


def test_validation_split_includes_heldout_pairs():
    dataset = SyntheticCaptions(1000, image_size=32, seed=0, split="val")
    seen = {f"{d['colour']} {d['shape']}" for d in map(dataset.describe, range(len(dataset)))}
    assert set(DEFAULT_HELDOUT_PAIRS) <= seen


def test_default_heldout_fraction_and_validation():
    assert 0.05 <= len(DEFAULT_HELDOUT_PAIRS) / (len(COLOURS) * len(SHAPES)) <= 0.15
    with pytest.raises(ValueError, match="unknown"):
        SyntheticSpec(heldout_pairs=("red dodecahedron",))
    all_circles = tuple(f"{colour} circle" for colour in COLOURS)
    with pytest.raises(ValueError, match="circle"):
        SyntheticSpec(heldout_pairs=all_circles)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticSpec(image_size=8)


# ----------------------------------------------------------------------------------------------- captions


def test_captions_name_colour_and_shape_and_match_attributes():
    dataset = SyntheticCaptions(400, image_size=32, seed=2)
    mentions_size = mentions_position = 0
    for index in range(len(dataset)):
        d = dataset.describe(index)
        words = d["caption"].rstrip(".").replace(",", "").split()
        assert d["colour"] in words and d["shape"] in words, d
        assert not (set(words) & (set(COLOURS) - {d["colour"]})), d  # no other colour named
        assert not (set(words) & (set(SHAPES) - {d["shape"]})), d
        assert not (set(words) & (set(SIZES) - {d["size"]})), d
        mentions_size += d["size"] in words
        mentions_position += d["position"] in words or (d["position"] == "center" and "middle" in words)
        assert "a orange" not in d["caption"] and "a image" not in d["caption"]
    assert 0.2 < mentions_size / len(dataset) < 0.8
    assert 0.2 < mentions_position / len(dataset) < 0.9


def test_templates_read_for_every_class():
    dataset = SyntheticClassification(1, image_size=32)
    assert len(templates()) >= 2 and dataset.templates() == templates()
    for template in templates():
        assert template.count("{}") == 1
        assert template.format("orange circle").count("orange circle") == 1


# ------------------------------------------------------------------------------------ classification data


def test_classes_and_chance_level():
    dataset = SyntheticClassification(10, image_size=32)
    assert dataset.classes[0] == f"{next(iter(COLOURS))} {SHAPES[0]}"
    assert len(dataset.classes) == len(set(dataset.classes)) == len(COLOURS) * len(SHAPES)
    assert 1 / len(dataset.classes) <= 0.10
    assert [dataset.classes[k] for k in dataset.heldout_class_indices] == list(DEFAULT_HELDOUT_PAIRS)


def test_labels_are_balanced_and_match_description():
    dataset = SyntheticClassification(96, image_size=32, seed=0)
    counts = Counter(dataset.describe(index)["label"] for index in range(len(dataset)))
    assert set(counts.values()) == {2} and len(counts) == 48
    for index in (0, 5, 50):
        image, label = dataset[index]
        d = dataset.describe(index)
        assert label == d["label"] and dataset.classes[label] == f"{d['colour']} {d['shape']}"
        assert d["size"] in SIZES and d["position"] in POSITIONS


def test_exclude_heldout_pairs():
    dataset = SyntheticClassification(200, image_size=32, include_heldout_pairs=False)
    labels = {dataset.describe(index)["label"] for index in range(len(dataset))}
    assert not labels & set(dataset.heldout_class_indices)
    assert len(dataset.classes) == 48  # the label space stays the same


def test_rendered_colour_matches_the_label():
    # The shape's pixels are closest (among the named colours) to the labelled colour.
    dataset = SyntheticClassification(48, image_size=64, seed=4)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    for index in range(len(dataset)):
        image, label = dataset[index]
        colour = dataset.classes[label].split()[0]
        mean = shape_pixels(image).mean(axis=0)
        nearest = list(COLOURS)[int(np.argmin(np.abs(palette - mean).sum(axis=1)))]
        assert nearest == colour, (index, dataset.classes[label], mean)


def test_rendered_size_and_position_match_the_description():
    dataset = SyntheticCaptions(150, image_size=64, seed=5)
    areas: dict[str, list[int]] = {size: [] for size in SIZES}
    for index in range(len(dataset)):
        image, _ = dataset[index]
        d = dataset.describe(index)
        target = np.array(COLOURS[d["colour"]], dtype=np.int16)
        mask = np.abs(pixels(image) - target).max(axis=2) < 40
        if d["colour"] in ("white", "black"):
            continue  # the background's noise can come close to them; colours suffice here
        ys, xs = np.nonzero(mask)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        expected = {"center": (0.5, 0.5), "left": (0.25, cy), "right": (0.75, cy), "top": (cx, 0.25), "bottom": (cx, 0.75)}
        ex, ey = expected[d["position"]]
        assert abs(cx - ex) < 0.2 and abs(cy - ey) < 0.2, (index, d, cx, cy)
        areas[d["size"]].append(int(mask.sum()))
    medians = [np.median(areas[size]) for size in ("small", "medium", "large")]
    assert medians[0] < medians[1] < medians[2]


# ---------------------------------------------------------------------------------------- image folder


def test_write_image_folder_round_trip(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    dataset = SyntheticClassification(60, image_size=32, seed=1)
    root = write_image_folder(dataset, tmp_path / "folder")
    lines = (root / "classnames.txt").read_text().splitlines()
    assert lines == dataset.classes
    folder = datasets.ImageFolder(str(root))
    # ImageFolder sorts folder names alphabetically; the zero-padded label prefix keeps label order.
    assert folder.classes == [class_folder_name(k, name, 48) for k, name in enumerate(dataset.classes)]
    assert len(folder) == 60
    for path, label in folder.samples:
        index = int(path.rsplit("/", 1)[1].removesuffix(".png"))
        image, expected_label = dataset[index]
        assert label == expected_label
        assert np.array_equal(pixels(Image.open(path).convert("RGB")), pixels(image))  # PNG is lossless
    with pytest.raises(FileExistsError):
        write_image_folder(dataset, root)


def test_image_folder_with_empty_classes(tmp_path):
    datasets = pytest.importorskip("torchvision.datasets")
    dataset = SyntheticClassification(10, image_size=16)  # only 10 of the 48 classes have an image
    root = write_image_folder(dataset, tmp_path / "sparse")
    folder = datasets.ImageFolder(str(root), allow_empty=True)
    assert len(folder.classes) == 48 and len(folder) == 10
    assert [label for _, label in folder.samples] == list(range(10))


def test_class_folder_names_sort_in_label_order():
    names = [class_folder_name(k, f"c {k}", 120) for k in range(120)]
    assert names == sorted(names) and names[7] == "007_c_7"
