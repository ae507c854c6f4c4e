"""Retrieval: chunked exact ranks against a brute-force sort (ties included, several captions per image,
chunks smaller than the data), annotation readers, and the encode -> rank pipeline on a planted model."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from clip.evaluation.config import RetrievalDatasetConfig
from clip.evaluation.retrieval import evaluate_retrieval, retrieval_ranks, summarize_ranks
from clip.evaluation.retrieval_data import (
    RetrievalData,
    load_retrieval_data,
    read_caption_manifest,
    read_karpathy_json,
    warn_about_shared_captions,
)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def brute_force_ranks(images: torch.Tensor, texts: torch.Tensor, caption_image: list[int], ties: str):
    """Sort every candidate list; among equal scores the ground truth goes first (optimistic) or last."""
    scores = (texts @ images.t()).tolist()  # T, I
    truth_first = ties == "optimistic"

    def position(candidates: list[tuple[float, bool]]) -> int:
        order = sorted(candidates, key=lambda c: (-c[0], not c[1] if truth_first else c[1]))
        return 1 + min(i for i, c in enumerate(order) if c[1])

    text_ranks = [position([(s, i == caption_image[t]) for i, s in enumerate(row)]) for t, row in enumerate(scores)]
    image_ranks = [
        position([(scores[t][i], caption_image[t] == i) for t in range(len(texts))]) for i in range(len(images))
    ]
    return image_ranks, text_ranks


def tied_features(seed: int, num_images: int, captions_per_image: list[int], dim: int = 3):
    """Entries in {-1, 0, 1}: dot products are small integers, exact in float32 and full of ties."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(-1, 2, (num_images, dim), generator=generator).float()
    caption_image = [i for i, count in enumerate(captions_per_image) for _ in range(count)]
    texts = torch.randint(-1, 2, (len(caption_image), dim), generator=generator).float()
    return images, texts, caption_image


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    captions_per_image=st.lists(st.integers(1, 4), min_size=1, max_size=9),
    chunk_size=st.integers(1, 5),
    ties=st.sampled_from(["optimistic", "pessimistic"]),
)
def test_chunked_ranks_equal_brute_force_with_ties(seed, captions_per_image, chunk_size, ties):
    images, texts, caption_image = tied_features(seed, len(captions_per_image), captions_per_image)
    image_ranks, text_ranks = retrieval_ranks(
        images, texts, torch.tensor(caption_image), chunk_size=chunk_size, ties=ties
    )
    expected_images, expected_texts = brute_force_ranks(images, texts, caption_image, ties)
    assert image_ranks.tolist() == expected_images
    assert text_ranks.tolist() == expected_texts


def test_tie_conventions_on_a_hand_example():
    # Two images with identical features, one caption each: every score ties.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    optimistic = retrieval_ranks(images, texts, torch.tensor([0, 1]), ties="optimistic")
    pessimistic = retrieval_ranks(images, texts, torch.tensor([0, 1]), ties="pessimistic")
    assert [r.tolist() for r in optimistic] == [[1, 1], [1, 1]]
    assert [r.tolist() for r in pessimistic] == [[2, 2], [2, 2]]


def test_recall_uses_the_best_of_several_captions():
    images = torch.eye(3)
    # Image 0 has a poor caption (e1) and a perfect one (e0); image 1's only caption prefers image 2.
    texts = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.2, 0.9], [0.0, 0.0, 1.0]])
    caption_image = torch.tensor([0, 0, 1, 2])
    image_ranks, text_ranks = retrieval_ranks(images, texts, caption_image, chunk_size=2, ties="optimistic")
    # Image 1 scores the texts [1, 0, 0.2, 0]: only caption 0 (image 0's) beats its own 0.2 -> rank 2.
    assert image_ranks.tolist() == [1, 2, 1]
    # Caption 0 (e1) prefers image 1 over its image 0; caption 2 prefers image 2 over its image 1.
    assert text_ranks.tolist() == [2, 1, 2, 1]
    result = summarize_ranks(image_ranks, text_ranks, ties="optimistic", ks=(1, 2))
    assert result.ties == "optimistic"  # the rule the ranks were computed by, not a default of its own
    # Exact fractions as Python floats, not float32 round-offs such as 0.6666666865348816.
    assert result.recalls["image_to_text_R@1"] == 2 / 3
    assert result.recalls["text_to_image_R@1"] == 2 / 4
    assert result.recalls["text_to_image_R@2"] == 1.0
    assert result.metrics()["image_to_text_median_rank"] == 1.0
    assert result.metrics()["text_to_image_mean_rank"] == 6 / 4
    # Caption 0 scores 0 with both its image 0 and image 2: the default (pessimistic) rule ranks it behind.
    assert retrieval_ranks(images, texts, caption_image, chunk_size=2)[1].tolist() == [3, 1, 2, 1]


def test_a_collapsed_model_gets_no_credit_by_default():
    # All features equal: every candidate ties with the ground truth. Ranking the truth first among ties
    # would give this model perfect recall; by default it ranks last.
    images, texts = torch.ones(6, 4), torch.ones(12, 4)
    caption_image = torch.arange(6).repeat(2)
    image_ranks, text_ranks = retrieval_ranks(images, texts, caption_image)
    result = summarize_ranks(image_ranks, text_ranks, ties="pessimistic", ks=(1, 5))
    assert result.recalls["image_to_text_R@1"] == result.recalls["text_to_image_R@1"] == 0.0
    assert result.recalls["text_to_image_R@5"] == 0.0  # the truth is 6th of 6 images
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        retrieval_ranks(images, texts, caption_image, chunk_size=0)


@pytest.mark.parametrize("seed", range(8))
def test_a_collapsed_model_gets_no_credit_whatever_the_rounding(seed):
    # One random unit vector for everything: the ground truth's score (an elementwise product) and the block
    # product's rounded differently in the last bit about a third of the time, and the truth then won every
    # comparison -- recall 1.0 for a collapsed model under the default rule.
    vector = torch.nn.functional.normalize(torch.randn(512, generator=torch.Generator().manual_seed(seed)), dim=0)
    images, texts = vector.expand(50, -1).clone(), vector.expand(250, -1).clone()
    caption_image = torch.arange(50).repeat_interleave(5)
    for chunk_size in (7, 4096):
        image_ranks, text_ranks = retrieval_ranks(images, texts, caption_image, chunk_size=chunk_size)
        assert image_ranks.tolist() == [246] * 50 and text_ranks.tolist() == [50] * 250  # last of all
        optimistic = retrieval_ranks(images, texts, caption_image, chunk_size=chunk_size, ties="optimistic")
        assert [ranks.unique().tolist() for ranks in optimistic] == [[1], [1]]
    # A tie is closer than a millionth of the largest score: 1e-5 below the truth is not one, 1e-7 is
    # (of the largest score the query can get: features that are not unit vectors scale the tolerance too)
    for gap, pessimistic_rank in ((1e-5, 1), (1e-7, 2)):
        angle = math.acos(1 - gap)
        for length in (1.0, 1000.0):
            images = length * torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)]])
            _, text_ranks = retrieval_ranks(images, torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
            assert text_ranks.tolist() == [pessimistic_rank], (gap, length)


def test_a_ties_tolerance_is_of_the_largest_score_its_own_query_can_get():
    # |query| x the largest |candidate|, in both directions: not the longest query's, nor a fixed amount
    def unit_below(gap: float) -> list[float]:  # its score with (1, 0) is 1 - gap
        angle = math.acos(1 - gap)
        return [math.cos(angle), math.sin(angle)]

    caption_image = torch.tensor([0, 1])
    for gap, pessimistic_rank in ((1e-5, 1), (1e-7, 2)):
        # An image query among captions 1000 long: its true one (1, 0) and image 1's, `gap` below it
        images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        image_ranks, _ = retrieval_ranks(images, 1000 * torch.tensor([[1.0, 0.0], unit_below(gap)]), caption_image)
        assert image_ranks[0] == pessimistic_rank, gap
    # A unit query 1e-5 above its competitor is no tie, however long another query of its kind is
    short_and_long, pair = torch.tensor([[1.0, 0.0], [0.0, 1000.0]]), torch.tensor([[1.0, 0.0], unit_below(1e-5)])
    assert retrieval_ranks(short_and_long, pair, caption_image)[0][0] == 1  # image 0 queries the captions
    assert retrieval_ranks(pair, short_and_long, caption_image)[1][0] == 1  # caption 0 queries the images


def test_a_querys_tolerance_scales_with_its_longest_candidate_in_both_directions():
    # Unit queries whose true candidate is a unit vector, beside a candidate 1000 long scoring 1e-4 below the
    # truth: of the largest score the query can get (1000) a tie; of the shortest candidate's (1) a clear win.
    competitor = (1 - 1e-4) / 1000
    units = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    with_a_long_one = torch.tensor([[1.0, 0.0], [1000 * competitor, 1000 * math.sqrt(1 - competitor**2)]],
                                   dtype=torch.float64)
    caption_image = torch.tensor([0, 1])
    # caption 0 queries the images, then image 0 queries the captions
    assert retrieval_ranks(with_a_long_one, units, caption_image)[1][0] == 2
    assert retrieval_ranks(units, with_a_long_one, caption_image)[0][0] == 2
    assert retrieval_ranks(with_a_long_one, units, caption_image, ties="optimistic")[1][0] == 1
    assert retrieval_ranks(units, with_a_long_one, caption_image, ties="optimistic")[0][0] == 1
    # and with the query's own length: a query 1000 long whose competitor scores 1e-7 of its truth below it
    near = (1 - 1e-7, math.sqrt(1 - (1 - 1e-7) ** 2))
    long_queries, near_candidates = 1000 * units, torch.tensor([[1.0, 0.0], near], dtype=torch.float64)
    assert retrieval_ranks(near_candidates, long_queries, caption_image)[1][0] == 2
    assert retrieval_ranks(long_queries, near_candidates, caption_image)[0][0] == 2


def test_non_finite_features_are_refused_not_ranked_first():
    # Every comparison with NaN is false: a NaN truth was beaten by nothing and ranked 1st, all-NaN features
    # scored a perfect recall
    images, texts = torch.eye(3), torch.eye(3)
    for broken, what in ((images, "image"), (texts, "text")):
        bad = broken.clone()
        bad[1, 0] = float("nan")
        arguments = (bad, texts) if what == "image" else (images, bad)
        with pytest.raises(ValueError, match=rf"1 of 3 {what} features are NaN or inf, which no evaluation can use"):
            retrieval_ranks(*arguments, torch.arange(3))
    with pytest.raises(ValueError, match="3 of 3 image features are NaN or inf"):
        retrieval_ranks(torch.full((3, 3), float("inf")), texts, torch.arange(3))


def test_median_and_mean_ranks_are_of_their_own_direction():
    result = summarize_ranks(torch.tensor([1, 3, 5]), torch.tensor([2, 6, 2, 4]), ties="pessimistic", ks=(2,))
    assert result.recalls == {"image_to_text_R@2": 1 / 3, "text_to_image_R@2": 2 / 4}
    assert (result.image_to_text_median_rank, result.image_to_text_mean_rank) == (3.0, 3.0)
    # the mean of the two middle ranks (2 and 4) of an even count, as numpy's median: torch's took the lower
    assert (result.text_to_image_median_rank, result.text_to_image_mean_rank) == (3.0, 14 / 4)
    assert result.text_to_image_median_rank == np.median([2, 6, 2, 4])


def test_the_tie_rule_of_a_summary_must_be_named():
    # A default here could record "pessimistic" for ranks computed optimistically.
    ranks = torch.tensor([1, 2])
    with pytest.raises(TypeError, match="ties"):
        summarize_ranks(ranks, ranks)  # type: ignore[call-arg]


def write_images(root, count: int) -> list[str]:
    names = []
    for i in range(count):
        name = f"img_{i}.png"
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / name)
        names.append(name)
    return names


def test_karpathy_json_groups_captions_and_filters_the_split(tmp_path):
    (tmp_path / "val2014").mkdir()
    names = write_images(tmp_path / "val2014", 3)
    entries = [
        {
            "filename": names[0],
            "filepath": "val2014",
            "split": "test",
            "sentences": [{"raw": "a red"}, {"raw": " b red "}],
        },
        {"filename": names[1], "filepath": "val2014", "split": "train", "sentences": [{"raw": "skip me"}]},
        {"filename": names[2], "filepath": "val2014", "split": "test", "sentences": [{"raw": "c"}]},
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    data = read_karpathy_json(tmp_path / "dataset.json")
    assert [p.name for p in data.image_paths] == [names[0], names[2]]
    assert data.captions == ["a red", "b red", "c"] and data.caption_image == [0, 0, 1]
    assert len(read_karpathy_json(tmp_path / "dataset.json", split="").image_paths) == 3
    # As saved by a Windows editor, with a byte-order mark: read as the manifests are
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}), encoding="utf-8-sig")
    assert read_karpathy_json(tmp_path / "dataset.json").captions == ["a red", "b red", "c"]
    entries[2]["filename"] = "missing.png"
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    # Named with the annotations file and the folder searched: the file's name alone did not say which
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{tmp_path / 'dataset.json'}: 1 of its 2 images are not found under {tmp_path} (the image root; by "
            f"default the file's folder), e.g. ['{tmp_path / 'val2014' / 'missing.png'}']")):
        read_karpathy_json(tmp_path / "dataset.json")



def test_a_karpathy_split_without_images_names_the_splits_the_file_has(tmp_path):
    entries = [{"filename": f"{i}.png", "split": split, "sentences": [{"raw": "a red"}]}
               for i, split in enumerate(["train", "restval", "val", "test", "test"])]
    entries.append({"filename": "5.png", "sentences": [{"raw": "a red"}]})
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    # "no images in split 'tset'" alone sent the user into the file to find its split names
    with pytest.raises(ValueError, match=re.escape(
            "no images in split 'tset' (images per split, 'restval': 1; 'test': 2; 'train': 1; 'val': 1; "
            "no 'split': 1; split '' takes every image)")):
        read_karpathy_json(tmp_path / "dataset.json", split="tset")
    (tmp_path / "empty.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match=re.escape("no images in split 'test' (it lists no images)")):
        read_karpathy_json(tmp_path / "empty.json")

def karpathy_file_listing_the_first_image_twice(folder, second_filepath: str) -> list[str]:
    """folder/dataset.json: two images, the first listed again (captioned "a red again") under `second_filepath`;
    returns the images' names."""
    names = write_images(folder, 2)
    entries = [{"filename": names[0], "split": "test", "sentences": [{"raw": "a red"}]},
               {"filename": names[1], "split": "test", "sentences": [{"raw": "b"}]},
               {"filename": names[0], "filepath": second_filepath, "split": "test",
                "sentences": [{"raw": "a red again"}]}]
    (folder / "dataset.json").write_text(json.dumps({"images": entries}))
    return names


def test_an_image_listed_in_two_karpathy_entries_is_warned_of(tmp_path, caplog):
    # Its captions were joined, counted twice in text->image recall, without a word
    names = karpathy_file_listing_the_first_image_twice(tmp_path, second_filepath=".")
    with caplog.at_level("WARNING", logger="clip.evaluation.retrieval_data"):
        data = read_karpathy_json(tmp_path / "dataset.json")
    assert data.captions == ["a red", "b", "a red again"] and data.caption_image == [0, 1, 0]
    assert f"dataset.json: 1 image(s) listed in more than one entry, each evaluated once with the captions of all " \
        f"its entries, e.g. ['{names[0]}']" in caplog.text


def test_an_image_spelled_two_ways_in_karpathy_entries_is_warned_of_unless_warn_is_false(tmp_path, caplog):
    # "sub/../img_0.png" was counted apart from "img_0.png", though evaluated as one image; and the trainer's
    # evaluations, which say it once before training, asked for no warning and got one at every evaluation
    names = karpathy_file_listing_the_first_image_twice(tmp_path, second_filepath="sub/..")
    with caplog.at_level("WARNING", logger="clip.evaluation.retrieval_data"):
        data = read_karpathy_json(tmp_path / "dataset.json", warn=False)
    assert data.caption_image == [0, 1, 0] and "more than one entry" not in caplog.text
    with caplog.at_level("WARNING", logger="clip.evaluation.retrieval_data"):
        read_karpathy_json(tmp_path / "dataset.json")
    assert f"dataset.json: 1 image(s) listed in more than one entry, each evaluated once with the captions of all " \
        f"its entries, e.g. ['{names[0]}']" in caplog.text


def test_cocos_own_captions_file_is_read_as_one_split(tmp_path):
    # captions_val2017.json was read as a Karpathy file with no splits; its hint, split '', then failed on the
    # images' missing 'filename'
    (tmp_path / "val2017").mkdir()
    names = write_images(tmp_path / "val2017", 3)
    images = [{"id": 39 + i, "file_name": name, "height": 4, "width": 4} for i, name in enumerate(names)]
    annotations = [{"id": 1, "image_id": 41, "caption": " c one "}, {"id": 2, "image_id": 39, "caption": "a one"},
                   {"id": 3, "image_id": 40, "caption": "b one"}, {"id": 4, "image_id": 39, "caption": "a two"}]
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    for split in ("test", ""):
        data = read_karpathy_json(path, tmp_path / "val2017", split=split)
        assert [p.name for p in data.image_paths] == names  # the images' order, each with its captions in theirs
        assert data.captions == ["a one", "a two", "b one", "c one"] and data.caption_image == [0, 0, 1, 2]
    with pytest.raises(ValueError, match="holds one split, the one its name says, and has no split 'val' to select"):
        read_karpathy_json(path, tmp_path / "val2017", split="val")
    # Recorded as what it is, not as a Karpathy file's test split; kept through a template and max_images
    from clip.cli.retrieval import dataset_record

    config = RetrievalDatasetConfig(annotations=str(path), image_root=str(tmp_path / "val2017"), max_images=2,
                                    caption_template="a photo of {}")
    data = load_retrieval_data(config)
    assert data.layout == "coco_captions" and data.captions[0] == "a photo of a one"
    assert (dataset_record(config, data)["format"], dataset_record(config, data)["split"]) == ("coco_captions", None)
    # A Karpathy file with an 'annotations' list of its own is still read as one
    karpathy = {"images": [{"filename": name, "split": "test", "sentences": [{"raw": "x"}]} for name in names],
                "annotations": []}
    (tmp_path / "val2017" / "dataset.json").write_text(json.dumps(karpathy))
    assert len(read_karpathy_json(tmp_path / "val2017" / "dataset.json").image_paths) == 3
    karpathy_config = RetrievalDatasetConfig(annotations=str(tmp_path / "val2017" / "dataset.json"))
    record = dataset_record(karpathy_config, load_retrieval_data(karpathy_config))
    assert (record["format"], record["split"]) == ("karpathy", "test")
    for broken, message in [
        ({"images": images, "annotations": [*annotations, {"image_id": 7, "caption": "x"}]},
         "annotation #4 names no listed image (image_id 7)"),
        ({"images": images, "annotations": annotations[1:]}, "1 of its 3 images have no caption, e.g. ['img_2.png']"),
        ({"images": images[:2] + [{"id": 41}], "annotations": annotations}, "image #2 needs an 'id' and a non-empty"),
        ({"images": images[:2] + [{"id": None, "file_name": names[2]}], "annotations": annotations},
         "image #2 needs an 'id' and a non-empty"),  # an id no annotation can name
        ({"images": images + [images[0]], "annotations": annotations}, "image #3: id 39 is another image's too"),
        ({"images": images, "annotations": [{"image_id": [39], "caption": "x"}]},
         "annotation #0 names no listed image (image_id [39])"),  # (a list: not a key to look up)
        ({"images": images, "annotations": ["a caption"]}, "annotation #0 names no listed image (image_id None)"),
        ({"images": images, "annotations": [{"image_id": 39, "caption": " "}]}, "annotation #0 needs a non-empty"),
        ({"images": images, "annotations": [{"image_id": 39, "caption": "&nbsp;"}]},
         "annotation #0 needs a non-empty"),  # empty once cleaned: [start, end] alone, as for a Karpathy file
    ]:
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
            read_karpathy_json(path, tmp_path / "val2017")


def test_cocos_captions_follow_the_order_of_its_images_list_not_their_ids_or_the_annotations(tmp_path):
    # Listed as 41, 39, 40: the images, and so their captions, are in that order, as the file lists them
    names = write_images(tmp_path, 3)
    images = [{"id": image_id, "file_name": name} for image_id, name in zip((41, 39, 40), names)]
    annotations = [{"image_id": 39, "caption": "b"}, {"image_id": 40, "caption": "c"}, {"image_id": 41, "caption": "a"}]
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    data = read_karpathy_json(path)
    assert [p.name for p in data.image_paths] == names
    assert data.captions == ["a", "b", "c"] and data.caption_image == [0, 1, 2]


def karpathy_entry(**fields) -> dict:
    return {"filename": "x.png", "split": "test", "sentences": [{"raw": "a red"}], **fields}


NO_RAW = "image #1, sentence #0 needs a non-empty 'raw' caption"
NO_SENTENCES = "image #1: 'sentences' must be a non-empty list"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (karpathy_entry(sentences=[{"text": "a"}]), NO_RAW),
        (karpathy_entry(sentences=[{"raw": None}]), NO_RAW),
        (karpathy_entry(sentences=["a red"]), NO_RAW),
        (karpathy_entry(sentences=[{"raw": " \t"}]), NO_RAW),  # blank: refused as a manifest's empty caption is
        (karpathy_entry(sentences=[{"raw": "&nbsp;"}]), NO_RAW),  # empty once cleaned: [start, end] alone
        (karpathy_entry(sentences="red"), NO_SENTENCES),
        (karpathy_entry(sentences=[]), NO_SENTENCES),  # an image of the split silently left out of its recalls
        ({"filename": "x.png", "split": "test"}, NO_SENTENCES),
        (karpathy_entry(filename=7), "image #1 needs a non-empty 'filename' string"),
        (karpathy_entry(filepath=None), "image #1 needs a non-empty 'filename' string (and 'filepath'"),
        (karpathy_entry(sentences=[{"raw": "\ud800"}]), "image #1, sentence #0: the caption is not valid UTF-8"),
        ("x.png", "image #1 must be a JSON object"),
    ],
)
def test_malformed_karpathy_entries_are_errors_naming_the_file_and_entry(tmp_path, entry, message):
    names = write_images(tmp_path, 1)
    good = {"filename": names[0], "split": "test", "sentences": [{"raw": "a red"}]}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": [good, entry]}))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {re.escape(message)}"):
        read_karpathy_json(path)


def test_a_karpathy_file_that_is_not_utf8_json_is_named(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not valid JSON"):
        read_karpathy_json(path)
    path.write_bytes('{"images": [{"filename": "caf\xe9.png"}]}'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: not UTF-8 text"):
        read_karpathy_json(path)
    path.write_text('{"annotations": []}')  # JSON, but not Karpathy's (COCO's own captions file, say)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: expected a JSON object with an 'images' list"):
        read_karpathy_json(path)


def test_karpathy_images_are_found_under_the_image_root_given(tmp_path):
    # A split file is often kept apart from the images it lists: image_root, not the file's folder, holds them
    (tmp_path / "images").mkdir()
    names = write_images(tmp_path / "images", 2)
    entries = [{"filename": name, "split": "test", "sentences": [{"raw": f"caption of {name}"}]} for name in names]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    config = RetrievalDatasetConfig(annotations=str(tmp_path / "dataset.json"), image_root=str(tmp_path / "images"))
    assert load_retrieval_data(config).image_paths == [tmp_path / "images" / name for name in names]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_manifest_rows_are_grouped_by_image(tmp_path, suffix):
    names = write_images(tmp_path, 2)
    rows = [(names[1], "one"), (names[0], "two"), (names[1], "three")]
    if suffix == ".jsonl":
        text = "".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows)
    else:
        sep = "\t" if suffix == ".tsv" else ","
        text = f"image{sep}caption\n" + "".join(f"{i}{sep}{c}\n" for i, c in rows)
    (tmp_path / f"m{suffix}").write_text(text)
    data = load_retrieval_data(RetrievalDatasetConfig(annotations=str(tmp_path / f"m{suffix}")))
    assert [p.name for p in data.image_paths] == [names[1], names[0]]
    assert data.captions == ["one", "two", "three"] and data.caption_image == [0, 1, 0]
    assert data.first_images(1).captions == ["one", "three"]
    # One file under several spellings is one image, not two that tie with each other
    (tmp_path / "sub").mkdir(exist_ok=True)
    (tmp_path / "spelled.csv").write_text(f"image,caption\n{names[0]},a\n./{names[0]},b\nsub/../{names[0]},c\n"
                                          f"{names[1]},d\n")
    data = load_retrieval_data(RetrievalDatasetConfig(annotations=str(tmp_path / "spelled.csv")))
    assert [p.name for p in data.image_paths] == names and data.caption_image == [0, 0, 0, 1]


def test_a_split_named_for_a_manifest_is_refused(tmp_path):
    # A manifest has no splits: split = "val" in an [[eval.retrieval]] table evaluated every row of it
    names = write_images(tmp_path, 2)
    (tmp_path / "m.csv").write_text(f"image,caption\n{names[0]},a\n{names[1]},b\n")
    config = RetrievalDatasetConfig(annotations=str(tmp_path / "m.csv"), split="val")
    with pytest.raises(ValueError, match=re.escape(
            f"retrieval dataset 'm': split = 'val', but {tmp_path / 'm.csv'} is a manifest, whose rows are all "
            "evaluated; a split selects images of a Karpathy JSON file")):
        load_retrieval_data(config)
    for every_row in ("test", ""):  # the default, and "every image"
        assert len(load_retrieval_data(dataclasses.replace(config, split=every_row)).captions) == 2


def test_a_caption_template_wraps_every_caption_as_the_paper_did(tmp_path):
    from clip.config_io import ConfigError

    names = write_images(tmp_path, 2)
    (tmp_path / "m.csv").write_text(f"image,caption\n{names[0]},a dog on {{grass}}\n{names[1]},two cats\n")
    config = RetrievalDatasetConfig(annotations=str(tmp_path / "m.csv"), caption_template="a photo of {}")
    data = load_retrieval_data(config)
    assert data.captions == ["a photo of a dog on {grass}", "a photo of two cats"]  # braces in captions stay
    assert load_retrieval_data(dataclasses.replace(config, caption_template="")).captions[1] == "two cats"
    for wrong in ("a photo of", "{} and {}"):
        with pytest.raises(ConfigError, match="caption_template"):
            RetrievalDatasetConfig(annotations="m.csv", caption_template=wrong)


def test_a_tsv_caption_may_start_with_a_quote(tmp_path):
    names = write_images(tmp_path, 3)
    lines = ["image\tcaption", f'{names[0]}\t"Hello," she said', f"{names[1]}\ta dog", f'{names[2]}\tsay "cheese"']
    (tmp_path / "m.tsv").write_text("\n".join(lines) + "\n")
    data = read_caption_manifest(tmp_path / "m.tsv")
    assert data.captions == ['"Hello," she said', "a dog", 'say "cheese"']
    assert data.caption_image == [0, 1, 2]


def test_a_tsv_quoted_by_a_csv_writer_is_read_with_quoting_csv(tmp_path):
    # pandas' and Python's csv writers quote a field that holds a quote, a tab or a line break.
    (tmp_path / "images").mkdir()
    names = write_images(tmp_path / "images", 2)
    captions = ['"Hello," she said', "two\tcolumns\nand two lines"]
    with open(tmp_path / "m.tsv", "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["image", "caption"])
        writer.writerows(zip(names, captions, strict=True))
    config = RetrievalDatasetConfig(annotations=str(tmp_path / "m.tsv"), image_root=str(tmp_path / "images"))
    data = load_retrieval_data(dataclasses.replace(config, quoting="csv"))
    assert data.captions == captions and data.image_paths == [tmp_path / "images" / name for name in names]
    # Read as written (the default for tab-separated files), the quoted tab splits the caption (row 2, which
    # was cut there without a word) and the quoted line break splits a row in two.
    with pytest.raises(ValueError, match="row 2 needs a non-empty 'image' and 'caption'.*line 3: more fields than the "
                                         'header\'s 2, so a field was cut where it holds a tab .*quoting = "csv"'):
        load_retrieval_data(config)


def test_manifest_suffixes_are_recognised_in_any_case(tmp_path):
    names = write_images(tmp_path, 2)
    (tmp_path / "M.TSV").write_text(f"image\tcaption\n{names[0]}\ta red square\n{names[1]}\ta blue one\n")
    data = load_retrieval_data(RetrievalDatasetConfig(annotations=str(tmp_path / "M.TSV")))
    assert data.captions == ["a red square", "a blue one"]


def test_format_manifest_reads_other_suffixes_as_csv_and_names_the_json_case(tmp_path):
    names = write_images(tmp_path, 2)
    (tmp_path / "m.txt").write_text(f'image,caption\n{names[0]},"a red, square"\n{names[1]},a blue one\n')
    config = RetrievalDatasetConfig(annotations=str(tmp_path / "m.txt"), format="manifest")
    assert load_retrieval_data(config).captions == ["a red, square", "a blue one"]
    (tmp_path / "m.json").write_text(json.dumps({"image": names[0], "caption": "a red square"}) + "\n")
    json_config = RetrievalDatasetConfig(annotations=str(tmp_path / "m.json"), format="manifest")
    with pytest.raises(ValueError, match="rename a JSON-lines manifest to .jsonl"):
        load_retrieval_data(json_config)


def test_a_retrieval_dataset_of_one_image_is_refused(tmp_path):
    # Every recall was 100% whatever the model: its one image is every caption's first answer
    names = write_images(tmp_path, 3)
    rows = "".join(f"{name},a square {i}\n" for i, name in enumerate(names))
    (tmp_path / "m.csv").write_text(f"image,caption\n{names[0]},a red square\n{names[0]},\"a square, red\"\n")
    with pytest.raises(ValueError, match="retrieval dataset 'm' has 1 image; retrieval needs at least 2"):
        load_retrieval_data(RetrievalDatasetConfig(annotations=str(tmp_path / "m.csv")))
    (tmp_path / "three.csv").write_text("image,caption\n" + rows)
    # as max_images cuts it, which is named: "has 1 image" sent the user to a file of 3
    with pytest.raises(ValueError, match="'three' has 3 images, of which max_images = 1 keeps 1; retrieval needs"):
        load_retrieval_data(RetrievalDatasetConfig(annotations=str(tmp_path / "three.csv"), max_images=1))
    assert len(load_retrieval_data(RetrievalDatasetConfig(annotations=str(tmp_path / "three.csv"))).image_paths) == 3


def test_a_csv_with_a_byte_order_mark_reads_like_one_without(tmp_path):
    names = write_images(tmp_path, 2)
    text = f'image,caption\n{names[0]},a red square\n{names[1]},"a big, red square"\n'
    (tmp_path / "m.csv").write_text(text, encoding="utf-8-sig")  # as spreadsheet programs save CSV
    assert read_caption_manifest(tmp_path / "m.csv").captions == ["a red square", "a big, red square"]


def test_other_column_names_are_named_in_the_error(tmp_path):
    names = write_images(tmp_path, 1)
    (tmp_path / "m.csv").write_text(f"path,text\n{names[0]},a square\n")
    with pytest.raises(ValueError, match=r"no column 'image', 'caption'; the columns are \['path', 'text'\]"):
        read_caption_manifest(tmp_path / "m.csv")
    assert read_caption_manifest(tmp_path / "m.csv", image_column="path", caption_column="text").captions == [
        "a square"
    ]
    (tmp_path / "m.jsonl").write_text(json.dumps({"file": names[0], "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'image'; the columns are \['file', 'caption'\]"):
        read_caption_manifest(tmp_path / "m.jsonl")
    # The training reader skips an unusable row; an evaluation set must be read whole, so it is an error.
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": names[0], "caption": "x"}) + "\n{not json}\n")
    with pytest.raises(ValueError, match="row 2 needs to be a JSON object with a non-empty 'image' and 'caption'"):
        read_caption_manifest(tmp_path / "bad.jsonl")
    # An object with both fields, one of them not a string, is told why: it was sent looking for empty fields
    (tmp_path / "lists.jsonl").write_text(json.dumps({"image": names[0], "caption": ["a square", "a red one"]}) + "\n")
    with pytest.raises(ValueError, match=re.escape(
        "row 1 needs to be a JSON object with a non-empty 'image' and 'caption'; line 1: 'caption' is a list, not a "
        "string: write one row per caption"
    )):
        read_caption_manifest(tmp_path / "lists.jsonl")


def test_manifest_errors_name_the_row(tmp_path):
    names = write_images(tmp_path, 1)
    (tmp_path / "m.csv").write_text(f"image,caption\n{names[0]},fine\n{names[0]},\n")
    with pytest.raises(ValueError, match="row 2 needs a non-empty 'image' and 'caption'"):
        read_caption_manifest(tmp_path / "m.csv")
    (tmp_path / "blank.tsv").write_text(f"image\tcaption\n{names[0]}\tfine\n{names[0]}\t   \n")
    with pytest.raises(ValueError, match="row 2 needs a non-empty 'image' and 'caption'"):
        read_caption_manifest(tmp_path / "blank.tsv")  # blank: refused as a Karpathy file's blank caption is
    # Empty once cleaned as the tokenizer cleans it: evaluated as the text [start, end] alone
    (tmp_path / "nbsp.tsv").write_text(f"image\tcaption\n{names[0]}\tfine\n{names[0]}\t&nbsp;\n")
    with pytest.raises(ValueError, match="row 2: its 'caption' '&nbsp;' is empty once cleaned as the tokenizer"):
        read_caption_manifest(tmp_path / "nbsp.tsv")
    # Bytes that are not UTF-8 would reach the tokenizer as lone surrogates: named, not a whole-file decode error.
    (tmp_path / "m.tsv").write_bytes(f"image\tcaption\n{names[0]}\tfine\n{names[0]}\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="row 2: the caption is not valid UTF-8"):
        read_caption_manifest(tmp_path / "m.tsv")
    with pytest.raises(ValueError, match="every image needs at least one caption"):
        RetrievalData([tmp_path / names[0]], [], [])


def test_retrieval_data_needs_one_image_index_per_caption(tmp_path):
    # RetrievalData is public: a caption without an image index would be paired with the wrong image or none
    with pytest.raises(ValueError, match="need one image index per caption"):
        RetrievalData([tmp_path / "a.png"], ["a cat", "a dog"], [0])


class PlantedRetrievalModel(nn.Module):
    """Image i (red channel = i) and caption "item i" both map to the one-hot vector e_i."""

    context_length = 4

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.dummy = nn.Parameter(torch.zeros(1))

    @staticmethod
    def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
        tokens = torch.zeros(len(texts), context_length, dtype=torch.long)
        tokens[:, 0] = torch.tensor([int(text.split()[1]) for text in texts])
        return tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return nn.functional.one_hot(images[:, 0, 0, 0].round().long(), self.size).float()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return nn.functional.one_hot(tokens[:, 0], self.size).float()


def test_pipeline_keeps_images_and_captions_aligned(tmp_path):
    count = 7
    names = write_images(tmp_path, count)
    rows = [(names[i], f"item {i}") for i in [3, 0, 6, 1, 3, 5, 2, 4, 0, 6]]
    (tmp_path / "m.csv").write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    data = read_caption_manifest(tmp_path / "m.csv")

    def red_value(image: Image.Image) -> torch.Tensor:
        return torch.full((3, 2, 2), float(image.getpixel((0, 0))[0]))

    model = PlantedRetrievalModel(count)
    result = evaluate_retrieval(
        model, data, red_value, tokenizer=model.tokenize, batch_size=3, text_batch_size=4, chunk_size=2, name="planted"
    )
    assert result.num_images == count and result.num_texts == len(rows) and result.num_skipped == 0
    assert all(value == 1.0 for value in result.recalls.values()), result.recalls
    assert set(result.recalls) == {f"{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    assert "num_skipped" not in result.metrics()


class CollapsedRetrievalModel(PlantedRetrievalModel):
    """Every image and caption maps to the same vector: every candidate ties with the ground truth."""

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return torch.ones(len(images), self.size)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return torch.ones(len(tokens), self.size)


def test_the_pipeline_ranks_by_the_tie_rule_and_reports_the_ks_it_is_given(tmp_path):
    names = write_images(tmp_path, 3)
    (tmp_path / "m.csv").write_text("image,caption\n" + "".join(f"{n},item {i}\n" for i, n in enumerate(names)))
    data = read_caption_manifest(tmp_path / "m.csv")
    model = CollapsedRetrievalModel(3)
    options = {"tokenizer": model.tokenize, "ks": (1, 2)}
    optimistic = evaluate_retrieval(model, data, lambda image: torch.zeros(3, 2, 2), ties="optimistic", **options)
    assert optimistic.ties == "optimistic" and optimistic.recalls == {
        f"{d}_R@{k}": 1.0 for d in ("image_to_text", "text_to_image") for k in (1, 2)}  # ties favour the truth
    pessimistic = evaluate_retrieval(model, data, lambda image: torch.zeros(3, 2, 2), **options)
    assert pessimistic.ties == "pessimistic" and set(pessimistic.recalls.values()) == {0.0}  # the truth is last of 3


class Stopped(Exception):
    pass


def test_a_stop_is_checked_between_the_captions_and_the_first_image(tmp_path):
    names = write_images(tmp_path, 3)
    (tmp_path / "m.csv").write_text("image,caption\n" + "".join(f"{n},item {i}\n" for i, n in enumerate(names)))
    model, encoded = PlantedRetrievalModel(3), []
    model.encode_text = lambda tokens, normalize=False: encoded.append("captions") or torch.eye(3)[tokens[:, 0]]
    model.encode_image = lambda images, normalize=False: encoded.append("images") or torch.eye(3)[: len(images)]

    def stop_check():
        raise Stopped

    with pytest.raises(Stopped):
        evaluate_retrieval(model, read_caption_manifest(tmp_path / "m.csv"), lambda image: torch.zeros(3, 2, 2),
                           tokenizer=model.tokenize, stop_check=stop_check)
    assert encoded == ["captions"]


class ConfusedRetrievalModel(PlantedRetrievalModel):
    """Like the planted model, but caption "item i" prefers image i + 1 to its own image i: removing an
    image changes the ranks of its neighbours' captions, and a misaligned caption -> image map would show."""

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        own = nn.functional.one_hot(tokens[:, 0], self.size).float()
        return own + 1.5 * nn.functional.one_hot((tokens[:, 0] + 1) % self.size, self.size).float()


def test_unreadable_images_are_left_out_with_their_captions(tmp_path, caplog):
    count = 6
    names = write_images(tmp_path, count)
    rows = [(names[i], f"item {i}") for i in [3, 0, 5, 1, 3, 4, 2, 0]]
    (tmp_path / "m.csv").write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in rows))
    data = read_caption_manifest(tmp_path / "m.csv")
    (tmp_path / names[1]).write_bytes(b"truncated garbage")  # image 1 (listed as data.image_paths[3])
    (tmp_path / names[4]).write_bytes(b"")

    def red_value(image: Image.Image) -> torch.Tensor:
        return torch.full((3, 2, 2), float(image.getpixel((0, 0))[0]))

    model = ConfusedRetrievalModel(count)
    options = {"tokenizer": model.tokenize, "text_batch_size": 3, "chunk_size": 2, "ks": (1, 2)}
    with caplog.at_level("WARNING"):
        results = [evaluate_retrieval(model, data, red_value, batch_size=b, **options) for b in (1, 2, 4, 6)]
    assert "skipped 2 unreadable image(s)" in caplog.text
    # The same as a manifest that never listed the two images, whatever the batch size.
    kept_rows = [(image, caption) for image, caption in rows if image not in (names[1], names[4])]
    (tmp_path / "kept.csv").write_text("image,caption\n" + "".join(f"{i},{c}\n" for i, c in kept_rows))
    expected = evaluate_retrieval(model, read_caption_manifest(tmp_path / "kept.csv"), red_value, **options)
    for result in results:
        assert result.num_skipped == 2 and result.num_images == count - 2 and result.num_texts == len(kept_rows)
        assert result.recalls == expected.recalls
        assert result.metrics()["num_skipped"] == 2
    assert expected.recalls["text_to_image_R@1"] < 1.0  # the model's confusions are visible in the recalls


def test_one_image_left_readable_is_refused_not_scored_as_every_recall_100_percent(tmp_path):
    # A set of one image is refused when read; one left after the unreadable ones were skipped was scored 1.0
    names = write_images(tmp_path, 3)
    (tmp_path / "m.csv").write_text("image,caption\n" + "".join(f"{n},item {i}\n" for i, n in enumerate(names)))
    for name in names[1:]:
        (tmp_path / name).write_bytes(b"not an image")
    model = PlantedRetrievalModel(3)
    with pytest.raises(ValueError, match=r"^retrieval m: only 1 of the 3 images is readable; retrieval needs at "
                                         r"least 2 to choose between \(with one, every recall is 100%\)$"):
        evaluate_retrieval(model, read_caption_manifest(tmp_path / "m.csv"), lambda image: torch.zeros(3, 2, 2),
                           tokenizer=model.tokenize, name="m")


def test_captions_that_several_images_share_are_warned_about(tmp_path, caplog):
    # Captions written from a template ("a red circle" for dozens of images) tie with the true caption and
    # count against it: image->text recall read 0 for a good model, and nothing said why.
    paths = [tmp_path / f"{i}.png" for i in range(4)]
    captions = ["A red circle", "a red  circle", "a red circle", "a blue square", "blue"]
    shared = RetrievalData(paths, captions, [0, 1, 2, 3, 3])
    with caplog.at_level("WARNING", logger="clip.evaluation.retrieval_data"):
        warn_about_shared_captions(shared, "shapes", "REMEDY")
    assert "retrieval shapes: 3 of 4 images have a caption that another image has too (1 such captions; " in caplog.text
    assert "'a red circle' is 3 images')" in caplog.text and caplog.text.rstrip().endswith("REMEDY")
    caplog.clear()
    distinct = RetrievalData(paths, ["a red circle", "a red square", "a blue circle", "a blue square", "a red circle"],
                             [0, 1, 2, 3, 0])  # one image's two captions alike: no other image competes
    with caplog.at_level("WARNING", logger="clip.evaluation.retrieval_data"):
        warn_about_shared_captions(distinct, "shapes", "REMEDY")
    assert caplog.text == ""
    # The example is the caption the most images share (the worst tie), not the first one found
    several = RetrievalData(paths, ["blue", "a red circle", "a red circle", "a red circle", "blue"], [0, 0, 1, 2, 3])
    with caplog.at_level("WARNING", logger="clip.evaluation.retrieval_data"):
        warn_about_shared_captions(several, "shapes", "REMEDY")
    assert "(2 such captions; 'a red circle' is 3 images')" in caplog.text


@pytest.mark.parametrize("name", ["pairs.csv", "karpathy.json"])
def test_annotations_that_do_not_exist_are_named_as_the_datasets(tmp_path, monkeypatch, name):
    # A mistyped annotations path read "[Errno 2] No such file or directory: 'pairs.csv'" (in clip-train's one line
    # too), which named neither the setting nor the dataset, nor where a relative path was looked for
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        load_retrieval_data(RetrievalDatasetConfig(name="flickr", annotations=name))
    assert str(caught.value).startswith(f"retrieval dataset 'flickr': annotations {name} does not exist (a relative "
                                        f"path, read from the folder the command runs in, {tmp_path})")


def test_annotations_that_are_a_folder_are_named_as_the_datasets(tmp_path):
    # It was a bare "[Errno 21] Is a directory", naming neither the setting nor the dataset
    with pytest.raises(ValueError, match=re.escape(
            f"retrieval dataset 'coco': annotations {tmp_path} is a folder; give its Karpathy JSON or manifest file")):
        load_retrieval_data(RetrievalDatasetConfig(name="coco", annotations=str(tmp_path)))
