"""clip-linear-probe keeps each split's features in its output folder and reuses them on a later run made from
the same inputs: not when the weights, the images or --features change, nor from a damaged file; a run
interrupted in one split keeps the splits before it; the results are the same with and without the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import clip
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.cli import linear_probe as linear_probe_cli
from clip.model import CLIP

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def save_tiny_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(kind="vit", image_size=32, width=32, layers=1, heads=2, patch_size=8),
        text=TextConfig(context_length=40, width=32, layers=1, heads=2),
    )
    torch.save({"model": clip.create_model(config).state_dict(), "config": {"model": config.to_dict()}}, path)
    return path


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_tiny_checkpoint(tmp_path / "tiny.pt", seed=0)


def write_colour_folder(root: Path, counts: dict[str, int], seed: int) -> None:
    """<root>/<class>/<i>.png: noisy images of one colour per class."""
    from PIL import Image

    colours = {"a_red": (220, 20, 20), "b_green": (20, 220, 20)}
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.clip(np.array(colours[name]) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def folder(tmp_path) -> Path:
    write_colour_folder(tmp_path / "data" / "train", {"a_red": 5, "b_green": 5}, seed=0)
    write_colour_folder(tmp_path / "data" / "test", {"a_red": 3, "b_green": 3}, seed=1)
    return tmp_path / "data"


@pytest.fixture
def extracted(monkeypatch) -> list[str]:
    """The roles ("train", "val", "test") whose features the runs extract, in order."""
    roles, current = [], []
    split_features, extract_features = linear_probe_cli.split_features, linear_probe_cli.extract_features

    def noting_the_role(args, role, *rest):
        current[:] = [role]
        return split_features(args, role, *rest)

    def recording(*args, **kwargs):
        roles.append(current[0])
        return extract_features(*args, **kwargs)

    monkeypatch.setattr(linear_probe_cli, "split_features", noting_the_role)
    monkeypatch.setattr(linear_probe_cli, "extract_features", recording)
    return roles


def probe_argv(model: Path, output: Path, *options: str) -> list[str]:
    common = ["--device", "cpu", "--workers", "0", "--max-iter", "30", "--output-dir", str(output)]
    return ["--model", str(model), *options, *common]


def run(model: Path, output: Path, *options: str) -> dict:
    assert linear_probe_cli.main(probe_argv(model, output, *options)) == 0
    return json.loads((output / "linear_probe_results.json").read_text())


SYNTHETIC = ("--dataset", "synthetic", "--num-samples", "12", "--image-size", "32")


def test_a_second_run_reuses_the_features_without_encoding_an_image(tmp_path, checkpoint, monkeypatch, caplog):
    first = run(checkpoint, tmp_path / "out", *SYNTHETIC)
    assert sorted(path.name for path in (tmp_path / "out" / "features").iterdir()) == ["test.pt", "train.pt"]

    def refuse(*args, **kwargs):
        raise AssertionError("the model was asked to encode images")

    with monkeypatch.context() as patch:
        patch.setattr(CLIP, "encode_image", refuse)
        patch.setattr(CLIP, "encode_image_unprojected", refuse)
        with caplog.at_level("INFO", logger="clip.linear_probe"):
            second = run(checkpoint, tmp_path / "out", *SYNTHETIC)
            # other settings of the sweep reuse them too
            run(checkpoint, tmp_path / "out", *SYNTHETIC, "--metric", "mean_per_class", "--standardize")
    assert second == first  # the same results as from extracted features
    assert "train split 'train': reused the features of 12 images kept in" in caplog.text
    # --recompute-features extracts them again, and again gives the same results
    assert run(checkpoint, tmp_path / "out", *SYNTHETIC, "--recompute-features") == first


def test_other_weights_in_the_same_file_are_extracted_again(tmp_path, checkpoint, extracted):
    run(checkpoint, tmp_path / "out", *SYNTHETIC)
    run(checkpoint, tmp_path / "out", *SYNTHETIC)
    assert extracted == ["train", "test"]
    save_tiny_checkpoint(checkpoint, seed=1)  # a run directory's newest checkpoint changes so, under one name
    run(checkpoint, tmp_path / "out", *SYNTHETIC)
    assert extracted == ["train", "test"] * 2


def test_the_same_weights_under_another_activation_are_extracted_again(tmp_path, checkpoint, extracted):
    # The key held the weights alone: open_clip's GELU weights loaded as QuickGELU, then as they are, reused the
    # QuickGELU features
    run(checkpoint, tmp_path / "out", *SYNTHETIC)
    saved = torch.load(checkpoint, weights_only=True)
    saved["config"]["model"]["activation"] = "gelu"
    torch.save(saved, checkpoint)
    run(checkpoint, tmp_path / "out", *SYNTHETIC)
    assert extracted == ["train", "test"] * 2


def test_a_features_file_that_cannot_be_written_is_said_and_the_probe_goes_on(tmp_path, checkpoint, monkeypatch,
                                                                                caplog):
    # torch.save reports a full disk as a RuntimeError raised while handling the OSError: it ended the probe with a
    # traceback after the extraction, which the run lost
    def full_disk(content, file):
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 1408 vs 1302")  # noqa: B904

    monkeypatch.setattr("clip.cli.feature_cache.torch.save", full_disk)
    with caplog.at_level("WARNING", logger="clip.linear_probe"):
        assert linear_probe_cli.main(probe_argv(checkpoint, tmp_path / "out", *SYNTHETIC)) == 0
    assert "could not keep the features in" in caplog.text and "unexpected pos" in caplog.text
    assert not (tmp_path / "out" / "features" / "train.pt").exists()


def test_a_changed_image_list_or_feature_kind_is_extracted_again(tmp_path, checkpoint, folder, extracted):
    options = ("--dataset", "imagefolder", "--root", str(folder))
    run(checkpoint, tmp_path / "out", *options)
    write_colour_folder(folder / "train", {"a_red": 6}, seed=2)  # one more red training image
    result = run(checkpoint, tmp_path / "out", *options)
    assert extracted == ["train", "test", "train"] and result["num_train"] + result["num_val"] == 11
    (folder / "test" / "b_green" / "0.png").rename(folder / "test" / "b_green" / "renamed.png")  # the same count
    run(checkpoint, tmp_path / "out", *options)
    assert extracted[3:] == ["test"]
    run(checkpoint, tmp_path / "out", *options, "--features", "embedding")
    assert extracted[4:] == ["train", "test"]
    run(checkpoint, tmp_path / "out", *SYNTHETIC)  # other images altogether
    assert extracted[6:] == ["train", "test"]


def test_images_rewritten_under_the_same_names_are_extracted_again(tmp_path, checkpoint, folder, extracted):
    # An export run again with another seed writes other images under the same file names: keyed by the names
    # alone, the old images' features were reused
    options = ("--dataset", "imagefolder", "--root", str(folder))
    run(checkpoint, tmp_path / "out", *options)
    run(checkpoint, tmp_path / "out", *options)
    assert extracted == ["train", "test"]
    image = folder / "test" / "a_red" / "0.png"
    before = image.stat()
    write_colour_folder(folder / "test", {"a_red": 3, "b_green": 3}, seed=5)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # whatever the clock's resolution
    run(checkpoint, tmp_path / "out", *options)
    assert extracted[2:] == ["test"]


def test_a_damaged_features_file_is_extracted_again(tmp_path, checkpoint, extracted, caplog):
    first = run(checkpoint, tmp_path / "out", *SYNTHETIC)
    train = tmp_path / "out" / "features" / "train.pt"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])  # torn
    with caplog.at_level("WARNING", logger="clip.linear_probe"):
        assert run(checkpoint, tmp_path / "out", *SYNTHETIC) == first
    assert extracted == ["train", "test", "train"]
    assert f"the features kept in {train} cannot be used" in caplog.text
    # a file of the right form whose features are not finite
    stored = torch.load(train, weights_only=True)
    stored["features"][0, 0] = float("nan")
    torch.save(stored, train)
    assert run(checkpoint, tmp_path / "out", *SYNTHETIC) == first
    assert extracted[3:] == ["train"]
    # a key that is JSON but no record of inputs
    stored = torch.load(train, weights_only=True)
    torch.save({**stored, "key": "[]"}, train)
    assert run(checkpoint, tmp_path / "out", *SYNTHETIC) == first
    assert extracted[4:] == ["train"]
    # features that repeat one number (stride 0): a 2 KB file declaring 4 x 2**28 floats made gigabytes when checked
    stored = torch.load(train, weights_only=True)
    rows, width = stored["features"].shape
    torch.save({**stored, "features": torch.ones(1).expand(rows, width)}, train)
    assert torch.load(train, weights_only=True)["features"].stride() == (0, 0)  # as saved: one number
    caplog.clear()
    with caplog.at_level("WARNING", logger="clip.linear_probe"):
        assert run(checkpoint, tmp_path / "out", *SYNTHETIC) == first
    assert extracted[5:] == ["train"]
    assert "features or labels that repeat or skip their data" in caplog.text
    stored = torch.load(train, weights_only=True)
    torch.save({**stored, "labels": torch.zeros(1, dtype=torch.int64).expand(len(stored["labels"]))}, train)
    assert run(checkpoint, tmp_path / "out", *SYNTHETIC) == first
    assert extracted[6:] == ["train"]  # labels that repeat one number too


def test_an_interrupted_run_keeps_the_splits_extracted_before(tmp_path, checkpoint, extracted, monkeypatch):
    extract = linear_probe_cli.extract_features

    def interrupted_at_the_second(*args, **kwargs):
        if extracted == ["train"]:
            raise KeyboardInterrupt
        return extract(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(linear_probe_cli, "extract_features", interrupted_at_the_second)
        # Ctrl-C: exit status 130 (128 + SIGINT), the split extracted before it kept
        assert linear_probe_cli.main(probe_argv(checkpoint, tmp_path / "out", *SYNTHETIC)) == 130
    assert sorted(path.name for path in (tmp_path / "out" / "features").iterdir()) == ["train.pt"]
    run(checkpoint, tmp_path / "out", *SYNTHETIC)
    assert extracted == ["train", "test"]


def test_a_save_killed_mid_write_leaves_no_temporary_file_after_the_next_run(tmp_path, checkpoint, caplog):
    # A kill -9 during a save left `.train.pt.PID.tmp` (gigabytes for a large split), which nothing removed
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)
    features = tmp_path / "out" / "features"
    features.mkdir(parents=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # another run, saving
    try:
        for name in (f".train.pt.{dead}.tmp", f".test.pt.{dead}.tmp", f".train.pt.{running.pid}.tmp", "other.tmp"):
            (features / name).write_bytes(b"\0" * 2_000_000)
        with caplog.at_level("INFO", logger="clip.linear_probe"):
            run(checkpoint, tmp_path / "out", *SYNTHETIC)
    finally:
        running.kill()
        running.wait()
    # a running process's save and other files are left alone
    assert sorted(path.name for path in features.iterdir()) == [
        f".train.pt.{running.pid}.tmp", "other.tmp", "test.pt", "train.pt"
    ]
    assert f"removed {features / f'.train.pt.{dead}.tmp'} (2.0 MB), left by an interrupted save" in caplog.text
    assert f"left {features / f'.train.pt.{running.pid}.tmp'} (2.0 MB) alone: process {running.pid}" in caplog.text
