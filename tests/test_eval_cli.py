"""The evaluation commands end to end on a tiny saved model: clip-zeroshot on an ImageFolder, a CIFAR-10
tree and the synthetic set (config + typed overrides), scripts/zeroshot.py as a subprocess, clip-retrieval
and clip-linear-probe."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.cli import common
from clip.cli import export as export_cli
from clip.cli import linear_probe as linear_probe_cli
from clip.cli import retrieval as retrieval_cli
from clip.cli import zeroshot as zeroshot_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: intra-op threads only add synchronisation (badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A trainer-style checkpoint ({"model": state dict, "config": {"model": ...}}) that clip.load reads."""
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(kind="vit", image_size=32, width=32, layers=1, heads=2, patch_size=8),
        text=TextConfig(context_length=40, width=32, layers=1, heads=2),
    )
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save({"model": clip.create_model(config).state_dict(), "config": {"model": config.to_dict()}}, path)
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    from clip.data.synthetic import SyntheticClassification, write_image_folder

    root = tmp_path_factory.mktemp("data")
    write_image_folder(SyntheticClassification(12, image_size=32, seed=1), root / "shapes")
    folder = root / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 4).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    return root


def write_config(path: Path, model: Path, data: Path) -> Path:
    path.write_text(
        f"""# python scripts/zeroshot.py {path.name}
model = "{model}"
device = "cpu"
workers = 0
batch_size = 4

[[datasets]]
name = "shapes"
kind = "imagefolder"
root = "{data / "shapes"}"

[[datasets]]
kind = "cifar10"
root = "{data / "cifar"}"
builtin_templates = "simple"

[[datasets]]
kind = "synthetic"
num_samples = 10
image_size = 32
"""
    )
    return path


def test_the_commands_evaluate_float32_weights_where_clip_load_gives_float16(tiny_checkpoint, monkeypatch):
    # clip.load returns float16 weights on CUDA; the commands' precision (default fp32) is an autocast over
    # float32 weights, as in evaluation during training. Here the CPU stands in: clip.load is made to halve.
    from clip import loading
    from clip.cli.common import load_model

    real_load = loading.load_with_source

    def load_as_on_cuda(*args, **kwargs):
        model, preprocess, source = real_load(*args, **kwargs)
        return model.half(), preprocess, source

    monkeypatch.setattr(loading, "load_with_source", load_as_on_cuda)
    model, _, _ = load_model(str(tiny_checkpoint), torch.device("cpu"))
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_the_commands_evaluate_a_float32_checkpoint_unrounded_on_cuda(tiny_checkpoint, monkeypatch):
    # On CUDA clip.load rounds the weights to float16, and load_model's .float() cannot bring back what was
    # rounded off. No GPU here: loading is told it has CUDA, and moving a model there leaves it where it is.
    from clip import loading
    from clip.cli.common import load_model

    monkeypatch.setattr(loading, "available_device", lambda name, accepted: torch.device("cuda"))
    real_to = torch.nn.Module.to
    monkeypatch.setattr(torch.nn.Module, "to",
                        lambda module, *args, **kwargs: module if args == (torch.device("cuda"),) and not kwargs
                        else real_to(module, *args, **kwargs))
    stored = torch.load(tiny_checkpoint, weights_only=True)["model"]

    halved, _ = clip.load(str(tiny_checkpoint), device="cuda")  # the drop-in's float16, as openai/CLIP's
    assert torch.float16 in {value.dtype for value in halved.state_dict().values()}
    model, _, _ = load_model(str(tiny_checkpoint), torch.device("cuda"))
    state = model.state_dict()
    assert state.keys() == stored.keys()
    assert all(state[name].dtype == value.dtype and torch.equal(state[name], value) for name, value in stored.items())


def test_zeroshot_command_end_to_end(tmp_path, tiny_checkpoint, datasets, capsys):
    config = write_config(tmp_path / "eval.toml", tiny_checkpoint, datasets)
    assert zeroshot_cli.main([str(config), "batch_size=3", "--output-dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(summary["results"]) == {"shapes", "cifar10", "synthetic"}
    shapes = summary["results"]["shapes"]
    assert shapes["num_samples"] == 12 and len(shapes["classnames"]) == 48  # classnames.txt of the folder
    assert summary["results"]["cifar10"]["num_samples"] == 4
    assert set(summary["metrics"]["synthetic"]) >= {"top1", "top5", "heldout/top1"}
    for name in ("shapes", "cifar10", "synthetic"):
        assert (tmp_path / "out" / f"confusion_{name}.png").is_file()
    table = capsys.readouterr().out
    assert "shapes" in table and "synthetic/heldout" in table


def test_results_of_other_weights_are_kept_aside_and_those_of_the_same_weights_replaced(
    tmp_path, tiny_checkpoint, datasets, caplog
):
    # The default output folder is named after the config, not the model: evaluating a second checkpoint
    # replaced the first one's results.json without a word
    import shutil

    other = tmp_path / "other.pt"
    shutil.copyfile(tiny_checkpoint, other)

    def load_model(path):  # its WeightsSource
        return common.load_model(str(path), torch.device("cpu"))[2]
    out = tmp_path / "out"
    for model in (tiny_checkpoint, tiny_checkpoint, other):
        config = tmp_path / "eval.toml"
        config.write_text(f'model = "{model}"\ndevice = "cpu"\nworkers = 0\n\n'
                          '[[datasets]]\nkind = "synthetic"\nnum_samples = 4\nimage_size = 32\n')
        with caplog.at_level(logging.INFO):
            assert zeroshot_cli.main([str(config), "--output-dir", str(out)]) == 0
    (kept,) = out.glob("results_kept_*.json")  # the second run of the same weights replaced the first's
    assert json.loads(kept.read_text())["weights"]["path"] == str(tiny_checkpoint.resolve())
    assert json.loads((out / "results.json").read_text())["weights"]["path"] == str(other.resolve())
    assert f"{out / 'results.json'} holds the results of other weights: kept as {kept}" in caplog.text
    # Its confusion matrices go with it: the new run's drew over them
    stamp = kept.stem.removeprefix("results")
    assert sorted(path.name for path in out.glob("confusion_*.png")) == [
        "confusion_synthetic.png", f"confusion_synthetic{stamp}.png"]
    # A dataset's own name holding "_kept_" goes with its results too; a name kept earlier stays where it is
    (out / "confusion_flowers_kept_aside.png").write_bytes(b"png")
    (out / "confusion_x_kept_2020-01-01T00-00-00.png").write_bytes(b"png")
    (out / "results.json").write_text("{}")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        common.keep_results_of_other_weights(out / "results.json", load_model(other), "confusion_*.png")
    assert not (out / "confusion_flowers_kept_aside.png").exists()
    assert (out / "confusion_x_kept_2020-01-01T00-00-00.png").exists()
    # Said as what it is: an earlier version's results record no weights (they were said to be other weights')
    assert "results.json holds results that do not name their weights (an earlier version's): kept as" in caplog.text
    (out / "retrieval_results.json").write_text("not JSON")  # nor a file the command cannot read
    with caplog.at_level(logging.INFO):
        common.keep_results_of_other_weights(out / "retrieval_results.json", load_model(other))
    assert not (out / "retrieval_results.json").exists() and len(list(out.glob("retrieval_results_kept_*"))) == 1
    assert "retrieval_results.json holds no results this command can read: kept as" in caplog.text


def test_results_another_run_wrote_meanwhile_are_kept_aside_before_each_write(
    tmp_path, tiny_checkpoint, monkeypatch, caplog
):
    # Several checkpoints evaluated in parallel with one config share its default folder: the folder was checked
    # once, before the first dataset, and the run that finished last replaced the other's results
    out = tmp_path / "out"
    config = tmp_path / "eval.toml"
    config.write_text(f'model = "{tiny_checkpoint}"\ndevice = "cpu"\nworkers = 0\n\n'
                      '[[datasets]]\nkind = "synthetic"\nnum_samples = 4\nimage_size = 32\n')
    evaluate = zeroshot_cli.evaluate_zeroshot

    def another_run_writes_meanwhile(*args, **kwargs):
        (out / "results.json").write_text(json.dumps({"weights": {"path": "other.pt"}, "results": {}}))
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(zeroshot_cli, "evaluate_zeroshot", another_run_writes_meanwhile)
    with caplog.at_level(logging.INFO):
        assert zeroshot_cli.main([str(config), "--output-dir", str(out)]) == 0
    (kept,) = out.glob("results_kept_*.json")
    assert json.loads(kept.read_text())["weights"] == {"path": "other.pt"}
    assert json.loads((out / "results.json").read_text())["weights"]["path"] == str(tiny_checkpoint.resolve())


def test_retrieval_results_of_another_dataset_are_kept_aside(tmp_path, tiny_checkpoint, caplog, monkeypatch):
    # Two annotation files of one name (dataset.json in two folders) share a default folder; results of the same
    # weights were replaced whatever dataset they were of
    out = tmp_path / "out"
    for folder in ("a", "b"):
        names = [f"{i}.png" for i in range(3)]
        for i, name in enumerate(names):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(tmp_path / folder / name)
        (tmp_path / folder / "pairs.csv").write_text(
            "image,caption\n" + "".join(f"{name},item {i}\n" for i, name in enumerate(names)))
        with caplog.at_level(logging.INFO):
            assert retrieval_cli.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--workers", "0",
                                       "--annotations", str(tmp_path / folder / "pairs.csv"),
                                       "--output-dir", str(out)]) == 0
    (kept,) = out.glob("retrieval_results_kept_*.json")
    assert json.loads(kept.read_text())["dataset"]["annotations"] == str(tmp_path / "a" / "pairs.csv")
    assert "holds the results of another dataset (its 'dataset' record differs): kept as" in caplog.text
    # The same dataset named by a relative path is a rerun, whose results replace its own
    monkeypatch.chdir(tmp_path)
    assert retrieval_cli.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--workers", "0",
                               "--annotations", "./b//pairs.csv", "--output-dir", str(out)]) == 0
    assert len(list(out.glob("retrieval_results_kept_*.json"))) == 1
    # One relative path, started in two folders: two files. The record kept the path as typed, which the second
    # run read as relative to its own folder, and replaced the first's results as its own
    for folder in ("a", "b"):
        monkeypatch.chdir(tmp_path / folder)
        assert retrieval_cli.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--workers", "0",
                                   "--annotations", "pairs.csv", "--output-dir", str(tmp_path / "elsewhere")]) == 0
    (kept,) = (tmp_path / "elsewhere").glob("retrieval_results_kept_*.json")
    assert json.loads(kept.read_text())["dataset"]["annotations"] == str(tmp_path / "a" / "pairs.csv")


def test_results_json_records_what_a_reproduction_needs(tmp_path, tiny_checkpoint, datasets):
    # results.json kept the model and the accuracies, but not which templates (the paper's 18? the built-in 14?),
    # whose class names, which images (a max_samples subset?) nor the precision: two runs could not be compared
    config = write_config(tmp_path / "eval.toml", tiny_checkpoint, datasets)
    templates = ["a photo of a {}.", "a blurry photo of a {}."]
    (tmp_path / "templates.txt").write_text("[\n" + "".join(f"    '{template}',\n" for template in templates) + "]\n")
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (tmp_path / "names.json").write_text(json.dumps(names))
    overrides = [f"datasets[1].templates_file={tmp_path / 'templates.txt'}",
                 f"datasets[1].classnames_file={tmp_path / 'names.json'}", "datasets[0].max_samples=5",
                 "precision=bf16", "confusion_png=false"]
    assert zeroshot_cli.main([str(config), *overrides, "--output-dir", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["settings"]["precision"] == "bf16" and summary["settings"]["device"] == "cpu"
    assert "Resize" in summary["settings"]["preprocess"]
    cifar = summary["datasets"]["cifar10"]
    assert cifar["templates"] == templates and cifar["templates_source"] == str(tmp_path / "templates.txt")
    assert cifar["classnames_source"] == str(tmp_path / "names.json")
    assert summary["results"]["cifar10"]["classnames"] == names
    assert cifar["classnames_sha256"] == zeroshot_cli.list_digest(names)
    assert cifar["templates_sha256"] == zeroshot_cli.list_digest(templates)
    assert (cifar["kind"], cifar["split"], cifar["num_images"], cifar["num_images_found"]) == ("cifar10", "", 4, 4)
    shapes = summary["datasets"]["shapes"]
    assert (shapes["max_samples"], shapes["num_images"], shapes["num_images_found"]) == (5, 5, 12)
    assert shapes["classnames_source"] == str(datasets / "shapes" / "classnames.txt")
    assert shapes["templates_source"] == "the built-in set 'default'"
    assert summary["datasets"]["synthetic"]["templates_source"] == "the synthetic dataset's own"
    # The same names read from another file format give the same digest
    (tmp_path / "names.txt").write_text("\n".join(names))
    assert zeroshot_cli.main([str(config), *overrides, f"datasets[1].classnames_file={tmp_path / 'names.txt'}",
                              "--output-dir", str(tmp_path / "out2")]) == 0
    again = json.loads((tmp_path / "out2" / "results.json").read_text())["datasets"]["cifar10"]
    assert again["classnames_sha256"] == cifar["classnames_sha256"]
    assert "several_names" not in cifar
    # A class given several names (the paper's FER2013 form): named by its first in the results, all recorded
    several = [["plane", "aeroplane"], *names[1:]]
    (tmp_path / "several.json").write_text(json.dumps(several))
    assert zeroshot_cli.main([str(config), *overrides, f"datasets[1].classnames_file={tmp_path / 'several.json'}",
                              "--output-dir", str(tmp_path / "out3")]) == 0
    third = json.loads((tmp_path / "out3" / "results.json").read_text())
    assert third["results"]["cifar10"]["classnames"] == names
    assert third["datasets"]["cifar10"]["several_names"] == several
    assert third["datasets"]["cifar10"]["classnames_sha256"] == zeroshot_cli.list_digest(several)


def test_a_long_evaluation_logs_its_progress(tmp_path, tiny_checkpoint, datasets, monkeypatch, caplog):
    # ImageNet's 50,000 images take minutes on a GPU, hours on a CPU: nothing was said between a dataset's
    # first line and its result. A line every PROGRESS_EVERY_S seconds (here: after every batch but the last)
    monkeypatch.setattr(zeroshot_cli, "PROGRESS_EVERY_S", 0.0)
    config = write_config(tmp_path / "eval.toml", tiny_checkpoint, datasets)
    with caplog.at_level(logging.INFO, logger="clip.zeroshot"):
        assert zeroshot_cli.main([str(config), "batch_size=5", "confusion_png=false",
                                  "--output-dir", str(tmp_path / "out")]) == 0
    progress = [record.getMessage() for record in caplog.records if " images (" in record.getMessage()]
    assert [line.split(" images/s")[0].rsplit(",", 1)[0] for line in progress if line.startswith("shapes")] == [
        "shapes: 5 of 12 images (42%)", "shapes: 10 of 12 images (83%)"]
    assert all("min left" in line for line in progress)


def test_a_dataset_name_with_a_slash_gets_its_confusion_plot_as_one_file(tmp_path, tiny_checkpoint, datasets):
    # "imagenet/val" was written to confusion_imagenet/val.png, a folder that does not exist: a warning, no plot
    config = write_config(tmp_path / "eval.toml", tiny_checkpoint, datasets)
    assert zeroshot_cli.main([str(config), "datasets[0].name=shapes/val", "--output-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "confusion_shapes_val.png").is_file()
    assert "shapes/val" in json.loads((tmp_path / "out" / "results.json").read_text())["results"]


def test_dataset_names_that_would_share_a_confusion_plot_are_refused_before_the_model_loads(tmp_path, capsys):
    # "shapes/val" and "shapes_val" drew to one file, the second replacing the first without a word
    from clip.config_io import ConfigError
    from clip.evaluation.config import ZeroShotDatasetConfig, ZeroShotRunConfig

    def two(**settings):
        return ZeroShotRunConfig(model="RN50", datasets=[
            ZeroShotDatasetConfig(kind="synthetic", name="shapes/val"),
            ZeroShotDatasetConfig(kind="synthetic", name="shapes_val")], **settings)

    with pytest.raises(ConfigError, match=r"'shapes/val' and 'shapes_val' would draw their confusion matrices to the "
                                          r"same file, confusion_shapes_val.png; set `name`"):
        two()
    two(confusion_png=False)  # no plots: nothing shared


def test_zeroshot_command_rejects_bad_overrides_and_configs(tmp_path, tiny_checkpoint, datasets, capsys):
    config = write_config(tmp_path / "eval.toml", tiny_checkpoint, datasets)
    assert zeroshot_cli.main([str(config), "batch_sise=3"]) == 2
    assert "batch_size" in capsys.readouterr().err  # names the closest valid key
    assert zeroshot_cli.main([str(config), "batch_size=many"]) == 2
    (tmp_path / "empty.toml").write_text(f'model = "{tiny_checkpoint}"\n')
    assert zeroshot_cli.main([str(tmp_path / "empty.toml")]) == 2
    assert "no [[datasets]]" in capsys.readouterr().err


def test_zeroshot_run_from_python_checks_a_value_set_after_its_config_was_built(tmp_path, tiny_checkpoint):
    # A notebook's config.batch_size = "4" failed only once the model was loaded and the first dataset listed
    from clip.config_io import ConfigError
    from clip.evaluation.config import ZeroShotDatasetConfig, ZeroShotRunConfig

    config = ZeroShotRunConfig(model=tiny_checkpoint, device="cpu", workers=0,
                               datasets=[ZeroShotDatasetConfig(kind="synthetic", num_samples=4, image_size=32)])
    config.batch_size = "4"
    with pytest.raises(ConfigError, match=r"^batch_size: expected an integer, got '4'$"):
        zeroshot_cli.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config.batch_size = 4
    config.datasets[0].num_samples = 4.0
    with pytest.raises(ConfigError, match=r"^datasets\[0\]\.num_samples: expected an integer, got 4\.0$"):
        zeroshot_cli.run(config, tmp_path / "out")
    # No datasets at all: said before the model loads (it ended in an UnboundLocalError after the model loaded)
    config.datasets = []
    with pytest.raises(ValueError, match=r"^the config has no \[\[datasets\]\] tables$"):
        zeroshot_cli.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zeroshot_script_runs_as_a_subprocess(tmp_path, tiny_checkpoint, datasets):
    config = tmp_path / "one.toml"
    config.write_text(
        f'model = "{tiny_checkpoint}"\ndevice = "cpu"\nworkers = 0\nconfusion_png = false\n'
        f'[[datasets]]\nkind = "synthetic"\nnum_samples = 4\nimage_size = 32\n'
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "zeroshot.py"), str(config), "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert "synthetic" in completed.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"]["synthetic"]["num_samples"] == 4


def test_retrieval_command(tmp_path, tiny_checkpoint, datasets):
    images = sorted((datasets / "shapes").rglob("*.png"))[:4]
    rows = [{"image": str(p), "caption": f"a {p.parent.name.split('_', 1)[1].replace('_', ' ')}"} for p in images]
    rows += [{"image": str(p), "caption": "a shape"} for p in images]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [
        "--model",
        str(tiny_checkpoint),
        "--annotations",
        str(tmp_path / "m.jsonl"),
        "--image-root",
        "/",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--chunk-size",
        "3",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert retrieval_cli.main(argv) == 0
    result = json.loads((tmp_path / "out" / "retrieval_results.json").read_text())
    assert result["num_images"] == 4 and result["num_texts"] == 8 and result["num_skipped"] == 0
    assert result["recalls"]["image_to_text_R@10"] == 1.0
    assert result["ties"] == "pessimistic"  # the default: tied candidates rank above the ground truth
    assert result["caption_template"] == ""  # recorded: the paper's figures used "a photo of {}"
    assert result["dataset"] == {"annotations": str(tmp_path / "m.jsonl"), "format": "manifest", "image_root": "/",
                                 "split": None, "max_images": 0}
    assert result["settings"]["device"] == "cpu" and result["settings"]["chunk_size"] == 3


def test_retrieval_results_say_which_karpathy_split_was_evaluated(tmp_path, tiny_checkpoint, datasets):
    images = sorted((datasets / "shapes").rglob("*.png"))[:6]
    entries = [{"filepath": str(p.parent), "filename": p.name, "split": "val" if i % 2 else "test",
                "sentences": [{"raw": f"shape {i}"}]} for i, p in enumerate(images)]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    argv = ["--model", str(tiny_checkpoint), "--annotations", str(tmp_path / "dataset_coco.json"), "--device", "cpu",
            "--workers", "0", "--split", "val", "--max-images", "2", "--output-dir", str(tmp_path / "out")]
    assert retrieval_cli.main(argv) == 0
    result = json.loads((tmp_path / "out" / "retrieval_results.json").read_text())
    # The name, "dataset_coco", and the counts did not say whether COCO's test or val split was scored
    assert result["dataset"] == {"annotations": str(tmp_path / "dataset_coco.json"), "format": "karpathy",
                                 "image_root": str(tmp_path), "split": "val", "max_images": 2}
    assert result["num_images"] == 2


def test_retrieval_warns_when_images_share_a_caption_under_pessimistic_ties(tmp_path, tiny_checkpoint, datasets, caplog):
    images = sorted((datasets / "shapes").rglob("*.png"))[:3]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"image": str(p), "caption": "a shape"}) + "\n" for p in images))
    argv = ["--model", str(tiny_checkpoint), "--annotations", str(tmp_path / "m.jsonl"), "--image-root", "/"]
    argv += ["--device", "cpu", "--workers", "0", "--output-dir", str(tmp_path / "out")]
    with caplog.at_level("WARNING"):
        assert retrieval_cli.main(argv) == 0
    assert "retrieval m: 3 of 3 images have a caption that another image has too" in caplog.text
    assert "--ties optimistic ranks them in its favour." in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert retrieval_cli.main([*argv, "--ties", "optimistic"]) == 0
    assert "have a caption that another image has too" not in caplog.text


def test_linear_probe_command(tmp_path, tiny_checkpoint):
    argv = [
        "--model",
        str(tiny_checkpoint),
        "--dataset",
        "synthetic",
        "--num-samples",
        "48",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--max-iter",
        "50",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    assert linear_probe_cli.main(argv) == 0
    result = json.loads((tmp_path / "out" / "linear_probe_results.json").read_text())
    assert result["num_test"] == 48 and result["num_train"] + result["num_val"] == 48
    assert 0.0 <= result["test_accuracy"] <= 1.0 and 1e-6 <= result["l2"] <= 1e6
    # the paper's protocol by default: a ViT's features before the projection, the strength chosen by accuracy
    assert result["features"] == "unprojected" and result["metric"] == "accuracy"
    assert 0.0 <= result["test_mean_per_class"] <= 1.0
    # which images and labels: "dataset" alone (the kind) did not say
    assert result["data"] == {"root": None, "train_split": "train", "val_split": None, "val_fraction": 0.2,
                              "test_split": "test", "num_samples": 48, "image_size": 32,
                              "classnames": result["data"]["classnames"]}
    assert len(result["data"]["classnames"]) == 48 and result["data"]["classnames"][0] == "red circle"
    assert result["settings"]["max_iter"] == 50 and result["settings"]["seed"] == 0
    argv += ["--features", "embedding", "--metric", "mean_per_class"]
    assert linear_probe_cli.main(argv) == 0
    result = json.loads((tmp_path / "out" / "linear_probe_results.json").read_text())
    assert result["features"] == "embedding" and result["metric"] == "mean_per_class"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "eval").glob("*.toml")), ids=lambda p: p.name)
def test_example_configs_fit_the_schema_and_say_how_to_run_them(path):
    from clip.config import load_config
    from clip.evaluation.config import ZeroShotRunConfig

    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# python scripts/zeroshot.py configs/eval/" + path.name)
    config = load_config(path, [], ZeroShotRunConfig)
    assert config.model and config.datasets


def write_colour_folder(root: Path, counts: dict[str, int], seed: int) -> None:
    """<root>/<class>/<i>.png: noisy images of one colour per class (red, green, blue), easy to separate."""
    from PIL import Image

    colours = {"a_red": (220, 20, 20), "b_green": (20, 220, 20), "c_blue": (20, 20, 220)}
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(np.array(colours[name]) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def probe_argv(model: Path, output: Path, *options: str) -> list[str]:
    common = ["--device", "cpu", "--workers", "0", "--max-iter", "100", "--output-dir", str(output)]
    return ["--model", str(model), *options, *common]


def test_linear_probe_labels_agree_when_a_split_lacks_a_class(tmp_path, tiny_checkpoint, caplog):
    # test/ has no green folder: numbering each split's own folders would call blue "1" (green) there.
    write_colour_folder(tmp_path / "data" / "train", {"a_red": 8, "b_green": 8, "c_blue": 8}, seed=0)
    write_colour_folder(tmp_path / "data" / "test", {"a_red": 4, "c_blue": 4}, seed=1)
    argv = probe_argv(tiny_checkpoint, tmp_path / "out", "--dataset", "imagefolder", "--root", str(tmp_path / "data"))
    with caplog.at_level("WARNING"):
        assert linear_probe_cli.main(argv) == 0
    # Its synthetic-only options' defaults are not the config's: every other dataset was told they were ignored
    assert "synthetic" not in caplog.text
    result = json.loads((tmp_path / "out" / "linear_probe_results.json").read_text())
    assert result["num_test"] == 8 and result["test_accuracy"] == 1.0
    assert result["num_skipped"] == {"train": 0, "test": 0}
    # The labels are recorded with the root: the union of the splits' folders, in order
    assert result["data"]["root"] == str(tmp_path / "data")
    assert result["data"]["classnames"] == ["a red", "b green", "c blue"]
    # The other way round: a class without training images is reported (the probe can never predict it).
    write_colour_folder(tmp_path / "other" / "train", {"a_red": 8, "c_blue": 8}, seed=0)
    write_colour_folder(tmp_path / "other" / "test", {"a_red": 4, "b_green": 4, "c_blue": 4}, seed=1)
    argv = probe_argv(tiny_checkpoint, tmp_path / "out2", "--dataset", "imagefolder", "--root", str(tmp_path / "other"))
    with caplog.at_level("WARNING"):
        assert linear_probe_cli.main(argv) == 0
    assert "1 of 3 classes have no training images, so the probe never predicts them: ['b green']" in caplog.text
    result = json.loads((tmp_path / "out2" / "linear_probe_results.json").read_text())
    assert result["test_accuracy"] == pytest.approx(8 / 12)


def test_linear_probe_results_of_another_image_folder_are_kept_aside(tmp_path, tiny_checkpoint, monkeypatch, caplog):
    # Two roots probed into one --output-dir: the second's results replaced the first's, of the same weights
    for folder in ("a", "b"):
        write_colour_folder(tmp_path / folder / "train", {"a_red": 3, "c_blue": 3}, seed=0)
        write_colour_folder(tmp_path / folder / "test", {"a_red": 1, "c_blue": 1}, seed=1)
        argv = probe_argv(tiny_checkpoint, tmp_path / "out", "--dataset", "imagefolder",
                          "--root", str(tmp_path / folder))
        with caplog.at_level(logging.INFO):
            assert linear_probe_cli.main(argv) == 0
    (kept,) = (tmp_path / "out").glob("linear_probe_results_kept_*.json")
    assert json.loads(kept.read_text())["data"]["root"] == str(tmp_path / "a")
    assert "holds the results of another dataset (its 'data' record differs): kept as" in caplog.text
    # The same root named by a relative path is a rerun, whose results replace its own
    monkeypatch.chdir(tmp_path)
    assert linear_probe_cli.main(probe_argv(tiny_checkpoint, tmp_path / "out", "--dataset", "imagefolder",
                                            "--root", "./b/")) == 0
    assert len(list((tmp_path / "out").glob("linear_probe_results_kept_*.json"))) == 1


def test_linear_probe_refuses_to_test_on_its_training_images(tmp_path, tiny_checkpoint, capsys):
    write_colour_folder(tmp_path / "flat", {"a_red": 2, "c_blue": 2}, seed=0)
    imagefolder = ["--dataset", "imagefolder", "--root", str(tmp_path / "flat")]
    # No train/ or test/ under the root: an error naming what is there, not the root used for both.
    assert linear_probe_cli.main(probe_argv(tiny_checkpoint, tmp_path / "out", *imagefolder)) == 2
    error = capsys.readouterr().err
    # named by this command's option, not the dataset setting's name
    assert error.startswith("clip-linear-probe: --train-split: split 'train': no folder") and "['a_red', 'c_blue']" in error
    assert "(the split must be one of them" in error
    same = [*imagefolder, "--train-split", "", "--test-split", ""]
    assert linear_probe_cli.main(probe_argv(tiny_checkpoint, tmp_path / "out", *same)) == 2
    assert "--train-split '' and --test-split '' are both the folder" in capsys.readouterr().err
    # Synthetic: a validation split named like the test split is the test images.
    synthetic = ["--dataset", "synthetic", "--num-samples", "4", "--image-size", "32", "--val-split", "test"]
    assert linear_probe_cli.main(probe_argv(tiny_checkpoint, tmp_path / "out", *synthetic)) == 2
    assert (
        "--test-split 'test' and --val-split 'test' are both the synthetic images of seed 0" in capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_commands_report_bad_input_in_one_line(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "m.csv").write_text("path,text\nx.png,a square\n")
    argv = ["--model", str(tiny_checkpoint), "--annotations", str(tmp_path / "m.csv"), "--device", "cpu"]
    assert retrieval_cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(
        f"clip-retrieval: {tmp_path / 'm.csv'}: no column 'image', 'caption'; the columns are ['path', 'text']"
    )
    with pytest.raises(SystemExit) as exit_info:
        retrieval_cli.main([*argv, "--chunk-size", "0"])
    assert exit_info.value.code == 2 and "--chunk-size: must be >= 1, got 0" in capsys.readouterr().err
    config = tmp_path / "eval.toml"
    config.write_text(
        f'model = "{tiny_checkpoint}"\ndevice = "cpu"\n[[datasets]]\nkind = "imagefolder"\nroot = "{tmp_path}/none"\n'
    )
    assert zeroshot_cli.main([str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"clip-zeroshot: image folder not found: {tmp_path}/none")
    assert zeroshot_cli.main([str(config), "text_batch_size=0"]) == 2
    assert "text_batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_clip_debug_adds_the_traceback_to_the_one_line_error(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    config = tmp_path / "eval.toml"
    config.write_text(f'model = "{tiny_checkpoint}"\n[[datasets]]\nkind = "imagefolder"\nroot = "{tmp_path}/none"\n')
    message = f"clip-zeroshot: image folder not found: {tmp_path}/none\n"
    monkeypatch.delenv("CLIP_DEBUG", raising=False)
    assert zeroshot_cli.main([str(config)]) == 2
    assert capsys.readouterr().err == message
    monkeypatch.setenv("CLIP_DEBUG", "1")
    assert zeroshot_cli.main([str(config)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("Traceback (most recent call last):") and "FileNotFoundError" in error
    assert error.endswith(message)


def help_text(command, capsys) -> str:
    with pytest.raises(SystemExit):
        command.parse_args(["--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", [zeroshot_cli, retrieval_cli, linear_probe_cli, export_cli],
                         ids=lambda c: c.__name__)
def test_help_says_how_to_get_the_traceback(command, capsys):
    assert "set CLIP_DEBUG=1 to print its traceback" in help_text(command, capsys)


def test_each_command_s_help_names_input_errors_of_its_own(capsys):
    # One epilog for all of them named "a malformed annotation file" also in the help of the commands that read
    # none: clip-export's, clip-zeroshot's and clip-linear-probe's
    assert "a malformed annotation file" in help_text(retrieval_cli, capsys)
    for command in (zeroshot_cli, linear_probe_cli, export_cli):
        assert "annotation" not in help_text(command, capsys), command.__name__
    assert "an OUTPUT that exists without --overwrite" in help_text(export_cli, capsys)


@pytest.mark.parametrize("command", [zeroshot_cli, retrieval_cli, linear_probe_cli], ids=lambda c: c.__name__)
def test_help_explains_every_option(command, monkeypatch):
    # --train-split, --test-split, --dataset, --format and retrieval's --output-dir were listed bare in --help:
    # neither what they select nor their defaults
    import argparse

    parsers = []

    def keep_the_parser(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", keep_the_parser)
    with pytest.raises(SystemExit):
        command.parse_args(["--help"])
    assert [action.option_strings or action.dest for action in parsers[0]._actions if not action.help] == []


def test_zeroshot_without_a_config_names_the_config_alone(capsys):
    # The optional overrides were listed as required too: "required: config, overrides"
    with pytest.raises(SystemExit):
        zeroshot_cli.parse_args([])
    assert capsys.readouterr().err.strip().endswith("the following arguments are required: config")


def test_zeroshot_lists_every_dataset_before_loading_the_model(tmp_path, tiny_checkpoint, datasets, monkeypatch):
    # A missing folder in the last dataset must fail before the first is evaluated (whose results it would lose).
    config = write_config(tmp_path / "eval.toml", tiny_checkpoint, datasets)
    config.write_text(config.read_text() + f'\n[[datasets]]\nkind = "imagefolder"\nroot = "{tmp_path}/none"\n')

    def refuse_to_load(*args):
        pytest.fail("the model was loaded before every dataset was listed")

    monkeypatch.setattr(zeroshot_cli, "load_model", refuse_to_load)
    assert zeroshot_cli.main([str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_retrieval_reads_a_pandas_quoted_tsv_with_quoting_csv(tmp_path, tiny_checkpoint, datasets, capsys):
    images = sorted((datasets / "shapes").rglob("*.png"))[:2]
    with open(tmp_path / "m.tsv", "w", newline="") as file:  # as pandas' to_csv(sep="\t") writes it
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(["image", "caption"])
        writer.writerows([(images[0], 'a "red" shape'), (images[1], "two\nlines")])
    argv = ["--model", str(tiny_checkpoint), "--annotations", str(tmp_path / "m.tsv"), "--device", "cpu"]
    argv += ["--workers", "0", "--image-root", "/", "--output-dir", str(tmp_path / "out")]
    assert retrieval_cli.main(argv) == 2  # read as written, the quoted line break splits a row
    assert "row 3 needs a non-empty 'image' and 'caption'" in capsys.readouterr().err
    assert retrieval_cli.main([*argv, "--quoting", "csv"]) == 0
    assert json.loads((tmp_path / "out" / "retrieval_results.json").read_text())["num_texts"] == 2


def test_retrieval_refuses_a_split_for_a_manifest(tmp_path, monkeypatch, capsys):
    # A manifest has no splits: "--split val" evaluated every row of it, under the name of a split
    def refuse_to_load(*args):
        pytest.fail("the model was loaded before the options were checked")

    monkeypatch.setattr(retrieval_cli, "load_model", refuse_to_load)
    (tmp_path / "m.csv").write_text("image,caption\na.png,a\nb.png,b\n")
    argv = ["--model", "ViT-B/32", "--annotations", str(tmp_path / "m.csv"), "--split", "val", "--device", "cpu"]
    assert retrieval_cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"clip-retrieval: --split 'val': {tmp_path / 'm.csv'} is a manifest, whose rows are all evaluated; --split "
        "selects a split of a Karpathy JSON file (write the split's rows to a manifest of their own)\n"
    )


def test_retrieval_takes_an_empty_split_for_a_manifest(tmp_path, monkeypatch, capsys):
    # --split '' asks for every image, which is what a manifest gives: a job script passing --split "$SPLIT"
    # for files of both kinds was refused
    class ModelReached(Exception):
        pass

    def model_reached(*args):
        raise ModelReached

    monkeypatch.setattr(retrieval_cli, "load_model", model_reached)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "m.csv").write_text("image,caption\na.png,a\nb.png,b\n")
    argv = ["--model", "ViT-B/32", "--annotations", str(tmp_path / "m.csv"), "--split", "", "--device", "cpu",
            "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ModelReached):
        retrieval_cli.main(argv)
    assert "--split" not in capsys.readouterr().err


def test_an_offline_download_is_a_one_line_error_with_clip_trains_status(capsys):
    # A released name on a machine without network: the download error's message says what to do. Status 1, as
    # clip-train's: it was 2, bad input, which a script retrying on network failures could not tell apart
    from clip.cli.common import run_command
    from clip.download import DownloadError

    def offline(args):
        raise DownloadError("Could not download ViT-B-32.pt; copy it to ~/.cache/clip/ViT-B-32.pt")

    assert run_command("clip-zeroshot", offline, None) == 1
    assert capsys.readouterr().err.strip() == "clip-zeroshot: Could not download ViT-B-32.pt; copy it to ~/.cache/clip/ViT-B-32.pt"


@pytest.mark.parametrize("command", [retrieval_cli, linear_probe_cli], ids=lambda c: c.__name__)
def test_a_negative_worker_count_is_a_usage_error(command, capsys):
    # Taken as an int, -1 failed deep inside torch's DataLoader once the model had loaded
    with pytest.raises(SystemExit):
        command.parse_args(["--workers", "-1"])
    assert "--workers: must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        command.parse_args(["--batch-size", "0"])
    assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("command", [retrieval_cli, linear_probe_cli], ids=lambda c: c.__name__)
def test_a_worker_count_no_machine_could_use_is_a_usage_error(command, capsys):
    # It was taken, and the command tried to start that many DataLoader processes once the model had loaded
    with pytest.raises(SystemExit):
        command.parse_args(["--workers", "99999999999999999999"])
    assert "--workers: must be at most 1024 (processes decoding the images; at most one per CPU this " \
           "process may use is started), got 99999999999999999999" in capsys.readouterr().err
    required = ["--model", "m", *(["--dataset", "synthetic"] if command is linear_probe_cli else ["--annotations", "a"])]
    assert command.parse_args([*required, "--workers", "1024"]).workers == 1024


class WorkersSeen(Exception):
    """Raised by the evaluation in place of its work, with the worker count it was given."""


@pytest.mark.parametrize(("command", "evaluation"), [
    (zeroshot_cli, "evaluate_zeroshot"), (retrieval_cli, "evaluate_retrieval"), (linear_probe_cli, "extract_features"),
], ids=["zeroshot", "retrieval", "linear_probe"])
def test_more_workers_than_cpus_start_one_per_cpu_and_say_so(
    command, evaluation, tmp_path, tiny_checkpoint, datasets, monkeypatch, caplog,
):
    # configs/eval/zeroshot_imagefolder.toml's workers = 8, written for a GPU server, made torch warn on a 2-core
    # machine of "excessive worker creation" that "might get DataLoader running slow or even freeze"
    def seen(*args, workers, **kwargs):
        raise WorkersSeen(workers)

    monkeypatch.setattr(command, evaluation, seen)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # where there is no sched_getaffinity
    argv = device_argv(command, tmp_path, tiny_checkpoint, datasets, "cpu")
    argv += ["workers=8"] if command is zeroshot_cli else ["--workers", "8"]
    with caplog.at_level(logging.INFO), pytest.raises(WorkersSeen) as raised:
        command.main(argv)
    assert raised.value.args == (2,)
    setting = "workers =" if command is zeroshot_cli else "--workers"
    assert f"{setting} 8 is more than the 2 CPU(s) this process may use: 2 worker processes decode the images" \
           in caplog.messages
    argv[-1] = "workers=1" if command is zeroshot_cli else "1"
    with pytest.raises(WorkersSeen) as raised:
        command.main(argv)
    assert raised.value.args == (1,)  # as many as asked for, up to the CPUs


@pytest.mark.parametrize(("command", "required"), [
    (retrieval_cli, ["--model", "m", "--annotations", "a.csv"]),
    (linear_probe_cli, ["--model", "m", "--dataset", "synthetic"]),
], ids=["retrieval", "linear_probe"])
def test_the_default_precision_is_float32_without_autocast(command, required):
    # As --help says ("fp32: none"): any other default would score every model in reduced precision unasked
    assert command.parse_args(required).precision == "fp32"


@pytest.mark.parametrize("debug", ["", "0", "1"])
def test_clip_debug_0_is_off_as_unset_is(capsys, monkeypatch, debug):
    # CLIP_DEBUG=0 is how a script turns it off: read as on, every input error came with a traceback
    from clip.cli.common import run_command

    def missing(args):
        raise FileNotFoundError("no such file: eval.toml")

    monkeypatch.setenv("CLIP_DEBUG", debug)
    assert run_command("clip-zeroshot", missing, None) == 2
    error = capsys.readouterr().err
    assert error.endswith("clip-zeroshot: no such file: eval.toml\n")
    assert ("Traceback (most recent call last):" in error) == (debug == "1")


@pytest.mark.parametrize("debug", ["", "1"], ids=["plain", "CLIP_DEBUG"])
def test_a_python_warning_is_a_log_line_of_the_command(caplog, monkeypatch, debug):
    # clip.load's warnings (a file's unrecorded conventions) printed the library's source path and line and its
    # warnings.warn( call, which tell a command's user nothing; CLIP_DEBUG keeps Python's form, place included
    import warnings

    from clip.cli.common import run_command

    def warn(args):
        warnings.warn("weights.pt records no activation", stacklevel=2)
        warnings.warn("an old format", FutureWarning, stacklevel=2)
        return 0

    monkeypatch.setenv("CLIP_DEBUG", debug)
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        before = warnings.showwarning
        assert run_command("clip-zeroshot", warn, None) == 0
        assert warnings.showwarning is before  # put back: a notebook's own warnings print as they did
    logged = [(record.name, record.getMessage()) for record in caplog.records]
    if debug:
        assert logged == [] and [str(warning.message) for warning in raised] == [
            "weights.pt records no activation", "an old format"]
    else:
        assert logged == [("py.warnings", "weights.pt records no activation"),
                          ("py.warnings", "FutureWarning: an old format")]
        assert raised == []


def test_a_dataset_of_one_class_is_a_one_line_error_before_the_model_loads(tmp_path, tiny_checkpoint, monkeypatch,
                                                                          capsys):
    # With one class every prediction is right: the probe reported 100% accuracy without a word
    def refuse_to_load(*args):
        pytest.fail("the model was loaded before the classes were counted")

    write_colour_folder(tmp_path / "data" / "train", {"a_red": 4}, seed=0)
    write_colour_folder(tmp_path / "data" / "test", {"a_red": 2}, seed=1)
    monkeypatch.setattr(linear_probe_cli, "load_model", refuse_to_load)
    argv = probe_argv(tiny_checkpoint, tmp_path / "out", "--dataset", "imagefolder", "--root", str(tmp_path / "data"))
    assert linear_probe_cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"clip-linear-probe: --root {tmp_path / 'data'}: the splits hold 1 class (a_red); a linear probe needs at "
        "least 2 classes to tell apart\n"
    )
    assert not (tmp_path / "out").exists()


def test_features_kept_in_an_earlier_versions_default_folder_are_pointed_to(tmp_path, tiny_checkpoint, monkeypatch,
                                                                            caplog):
    # The default folder was the root's name alone: the features kept there were extracted again, unsaid
    monkeypatch.chdir(tmp_path)
    write_colour_folder(tmp_path / "pets" / "train", {"a_red": 5, "c_blue": 5}, seed=0)
    write_colour_folder(tmp_path / "pets" / "test", {"a_red": 2, "c_blue": 2}, seed=1)
    (tmp_path / "linear_probe_results" / "pets" / "features").mkdir(parents=True)
    argv = ["--model", str(tiny_checkpoint), "--device", "cpu", "--workers", "0", "--max-iter", "20",
            "--dataset", "imagefolder", "--root", "pets"]
    with caplog.at_level(logging.WARNING, logger="clip.linear_probe"):
        assert linear_probe_cli.main(argv) == 0
    (folder,) = [path for path in (tmp_path / "linear_probe_results").iterdir() if path.name != "pets"]
    assert (f"linear_probe_results/pets, this dataset's default folder before, holds kept features (this version's "
            f"is linear_probe_results/{folder.name}): move its features/ folder there") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clip.linear_probe"):  # once there are features of its own: unsaid
        assert linear_probe_cli.main(argv) == 0
    assert "default folder before" not in caplog.text
    # Nor where --output-dir is given, a folder of the user's choosing, not the default the earlier one was
    with caplog.at_level(logging.WARNING, logger="clip.linear_probe"):
        assert linear_probe_cli.main([*argv, "--output-dir", "chosen"]) == 0
    assert "default folder before" not in caplog.text


def test_class_folders_named_alike_in_two_unicode_forms_are_refused(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    # A split copied from macOS names "café" decomposed: the two spellings were two classes, the test images of
    # one never predicted (accuracy halved on separable data), said only as "no training images"
    monkeypatch.setattr(linear_probe_cli, "load_model", lambda *args: pytest.fail("loaded before the check"))
    for split, name in (("train", "caf\u00e9"), ("test", "cafe\u0301")):
        write_colour_folder(tmp_path / "data" / split, {"a_red": 2, "c_blue": 2}, seed=0)
        (tmp_path / "data" / split / "c_blue").rename(tmp_path / "data" / split / name)
    argv = probe_argv(tiny_checkpoint, tmp_path / "out", "--dataset", "imagefolder", "--root", str(tmp_path / "data"))
    assert linear_probe_cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"clip-linear-probe: --root {tmp_path / 'data'}: the splits' class folders 'cafe\\u0301' and 'caf\\xe9' "
        "are one name written in two Unicode forms (composed and decomposed accents); rename them alike\n"
    )


def test_linear_probe_lists_its_data_before_loading_the_model(tmp_path, monkeypatch, capsys):
    # A released name is a download: a missing CIFAR folder must fail first.
    def refuse_to_load(*args):
        pytest.fail("the model was loaded before the data was listed")

    monkeypatch.setattr(linear_probe_cli, "load_model", refuse_to_load)
    argv = ["--model", "ViT-B/32", "--dataset", "cifar10", "--root", str(tmp_path / "none"), "--device", "cpu"]
    assert linear_probe_cli.main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("clip-linear-probe: ")


def test_zeroshot_refuses_a_dataset_of_one_class_before_loading_the_model(tmp_path, monkeypatch, capsys):
    # Every image of a one-class dataset is classified right: the table said 100.00 without a word, as the
    # linear probe did before it refused one class
    monkeypatch.setattr(zeroshot_cli, "load_model", lambda *args: pytest.fail("the model was loaded"))
    write_colour_folder(tmp_path / "data" / "val", {"a_red": 2}, seed=0)
    config = tmp_path / "eval.toml"
    config.write_text(
        f'model = "m"\ndevice = "cpu"\n[[datasets]]\nname = "one"\nkind = "imagefolder"\nroot = "{tmp_path / "data"}"\n'
        'split = "val"\n'
    )
    assert zeroshot_cli.main([str(config), "--output-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "clip-zeroshot: dataset 'one' has 1 class (a red); zero-shot classification needs at least 2 classes to "
        "choose between (with one, every image is classified right)\n"
    )


@pytest.mark.parametrize("unreadable", ["train", "test"])
def test_linear_probe_names_the_split_without_a_readable_image(tmp_path, tiny_checkpoint, capsys, unreadable):
    # "no image features to probe: none of its 4 images is readable" did not say of which split
    for split in ("train", "test"):
        write_colour_folder(tmp_path / "data" / split, {"a_red": 2, "b_green": 2}, seed=0)
    for image in (tmp_path / "data" / unreadable).rglob("*.png"):
        image.write_bytes(b"not an image")
    argv = probe_argv(tiny_checkpoint, tmp_path / "out", "--dataset", "imagefolder", "--root", str(tmp_path / "data"))
    assert linear_probe_cli.main(argv) == 2
    assert capsys.readouterr().err == (
        f"clip-linear-probe: {unreadable} split {unreadable!r}: no image features to probe: none of its 4 images "
        "is readable\n"
    )


@pytest.mark.parametrize("dataset", ["imagefolder", "cifar10"])
def test_linear_probe_without_root_names_the_missing_option(tmp_path, monkeypatch, capsys, dataset):
    # An empty --root read the current folder: "split 'train': no folder train; the folders in . are [...]"
    # listed whatever was there, and where train/ and test/ were there, "an imagefolder dataset needs `root`"
    # named a config key that this command does not have
    monkeypatch.setattr(linear_probe_cli, "load_model", lambda *args: pytest.fail("the model was loaded"))
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "m", "--dataset", dataset, "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    assert linear_probe_cli.main(argv) == 2
    assert capsys.readouterr().err == f"clip-linear-probe: --dataset {dataset} needs --root, the folder of its data\n"


def device_argv(command, tmp_path: Path, model: Path, data: Path, device: str) -> list[str]:
    """Arguments that would run `command` on `device`, with valid data (so only the device can fail)."""
    if command is zeroshot_cli:
        config = write_config(tmp_path / "eval.toml", model, data)
        return [str(config), f"device={device}", "--output-dir", str(tmp_path / "out")]
    if command is retrieval_cli:
        images = sorted((data / "shapes").rglob("*.png"))[:2]
        (tmp_path / "m.csv").write_text("image,caption\n" + "".join(f"{path},a shape\n" for path in images))
        return ["--model", str(model), "--annotations", str(tmp_path / "m.csv"), "--image-root", "/",
                "--device", device, "--output-dir", str(tmp_path / "out")]
    synthetic = ["--dataset", "synthetic", "--num-samples", "4", "--image-size", "32"]
    return ["--model", str(model), *synthetic, "--device", device, "--output-dir", str(tmp_path / "out")]


@pytest.mark.parametrize("command", [zeroshot_cli, retrieval_cli, linear_probe_cli], ids=lambda c: c.__name__)
def test_an_unavailable_or_unknown_device_is_a_one_line_error_before_the_model_loads(
    command, tmp_path, tiny_checkpoint, datasets, monkeypatch, capsys
):
    def refuse_to_load(*args):
        pytest.fail("the model was loaded before the device was checked")

    monkeypatch.setattr(command, "load_model", refuse_to_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)  # the error lists the devices there are
    prog = command.__name__.rsplit(".", 1)[1].replace("_", "-")
    assert command.main(device_argv(command, tmp_path, tiny_checkpoint, datasets, "cuda")) == 2
    assert capsys.readouterr().err == (
        f"clip-{prog}: device 'cuda' is not available: CUDA is not available on this machine "
        f"(torch.cuda.is_available() is False); devices here: 'cpu'\n"
    )
    assert command.main(device_argv(command, tmp_path, tiny_checkpoint, datasets, "gpu")) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"clip-{prog}: device 'gpu' is not a torch device")
    # meta (shapes without data) and a kind this machine lacks failed with torch's traceback in the first batch
    assert command.main(device_argv(command, tmp_path, tiny_checkpoint, datasets, "meta")) == 2
    assert capsys.readouterr().err.startswith(f"clip-{prog}: device 'meta' holds no data to compute with")
    assert command.main(device_argv(command, tmp_path, tiny_checkpoint, datasets, "cpu:1")) == 2  # was taken for cpu
    assert capsys.readouterr().err.startswith(f"clip-{prog}: device 'cpu:1' names no device of its own")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert command.main(device_argv(command, tmp_path, tiny_checkpoint, datasets, "mps")) == 2
    assert capsys.readouterr().err == (
        f"clip-{prog}: device 'mps' is not available: this machine has no mps device; devices here: 'cpu'\n")
    assert not (tmp_path / "out").exists()


def test_a_validation_hold_out_that_leaves_no_training_images_is_a_one_line_error(
    tmp_path, tiny_checkpoint, monkeypatch, capsys
):
    def refuse_to_load(*args):
        pytest.fail("the model was loaded before the hold-out was checked")

    monkeypatch.setattr(linear_probe_cli, "load_model", refuse_to_load)
    synthetic = ["--dataset", "synthetic", "--image-size", "32"]
    argv = probe_argv(tiny_checkpoint, tmp_path / "out", *synthetic, "--num-samples", "12", "--val-fraction", "0.99")
    assert linear_probe_cli.main(argv) == 2
    assert capsys.readouterr().err == (
        "clip-linear-probe: --train-split 'train' (--val-fraction 0.99): holding out 12 of 12 training example(s) "
        "for validation (fraction 0.99) leaves none to fit the probe on; use more training data, a smaller "
        "validation fraction or a separate validation split\n"
    )
    assert linear_probe_cli.main(probe_argv(tiny_checkpoint, tmp_path / "out", *synthetic, "--num-samples", "1")) == 2
    assert "holding out 1 of 1 training example(s)" in capsys.readouterr().err
    for fraction in ("0", "1", "1.5", "-0.2"):  # refused by the argument parser, before any data is read
        with pytest.raises(SystemExit) as exit_info:
            linear_probe_cli.main(probe_argv(tiny_checkpoint, tmp_path / "out", *synthetic, "--val-fraction", fraction))
        assert exit_info.value.code == 2
        assert "--val-fraction: must be between 0 and 1 (exclusive)" in capsys.readouterr().err
    # With a validation split nothing of train is held out: the fraction would be ignored without a word
    with pytest.raises(SystemExit) as exit_info:
        linear_probe_cli.main(
            probe_argv(tiny_checkpoint, tmp_path / "out", *synthetic, "--val-split", "val", "--val-fraction", "0.3")
        )
    assert exit_info.value.code == 2
    assert "--val-fraction holds out part of train, which --val-split replaces" in capsys.readouterr().err


@pytest.mark.parametrize("command", [zeroshot_cli, retrieval_cli, linear_probe_cli], ids=lambda c: c.__name__)
def test_an_output_folder_that_cannot_be_written_is_a_one_line_error_before_the_model_loads(
    command, tmp_path, tiny_checkpoint, datasets, monkeypatch, capsys
):
    # Found only when the results were written, it lost the whole evaluation's work
    def refuse_to_load(*args):
        pytest.fail("the model was loaded before the output folder was checked")

    monkeypatch.setattr(command, "load_model", refuse_to_load)
    argv = device_argv(command, tmp_path, tiny_checkpoint, datasets, "cpu")
    (tmp_path / "out").write_text("a file where the results folder should be")
    prog = command.__name__.rsplit(".", 1)[1].replace("_", "-")
    assert command.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"clip-{prog}: cannot write results to {tmp_path / 'out'}: ")


RESULTS_FILE = {zeroshot_cli: "results.json", retrieval_cli: "retrieval_results.json",
                linear_probe_cli: "linear_probe_results.json"}


@pytest.mark.parametrize("command", [zeroshot_cli, retrieval_cli, linear_probe_cli], ids=lambda c: c.__name__)
def test_the_results_name_the_checkpoint_of_a_run_directory_that_was_evaluated(
    command, tmp_path, tiny_checkpoint, datasets
):
    # "model" was the run directory alone: of a run still training, nobody could tell afterwards which
    # checkpoint had been evaluated
    from clip.checkpoint import CHECKPOINT_FORMAT

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    state = torch.load(tiny_checkpoint, weights_only=True)
    torch.save({"format": CHECKPOINT_FORMAT, "step": 7, **state}, run / "checkpoints" / "step_00000007.pt")
    argv = device_argv(command, tmp_path, run, datasets, "cpu")
    assert command.main(argv if command is zeroshot_cli else [*argv, "--workers", "0"]) == 0
    results = json.loads((tmp_path / "out" / RESULTS_FILE[command]).read_text())
    assert results["model"] == str(run)
    evaluated = run / "checkpoints" / "step_00000007.pt"
    assert results["weights"] == {"path": str(evaluated.resolve()), "step": 7, "released": None,
                                  "sha256": hashlib.sha256(evaluated.read_bytes()).hexdigest()}


def test_results_json_is_strict_and_replaces_the_old_file_whole(tmp_path, monkeypatch):
    import builtins
    import io

    from clip.cli.common import write_json

    path = write_json(tmp_path / "results.json", {"top1": float("nan"), "l2": 1.0})
    assert json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(name)) == {"top1": None, "l2": 1.0}

    real_open, opened = io.open, []

    class FullDisk(io.StringIO):  # writes a part, then the disk is full
        def write(self, text):
            opened[-1].write(text[:5])
            raise OSError(28, "No space left on device")

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if "w" not in mode:
            return real_open(file, mode, *args, **kwargs)
        opened.append(real_open(file, mode, *args, **kwargs))
        return FullDisk()

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    monkeypatch.setattr(io, "open", open_on_full_disk)
    with pytest.raises(OSError):
        write_json(path, {"top1": 0.5})
    monkeypatch.undo()
    opened[-1].close()
    assert json.loads(path.read_text()) == {"top1": None, "l2": 1.0}  # the old results, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_zeroshot_keeps_the_results_of_the_datasets_before_a_failure(tmp_path, tiny_checkpoint, datasets, monkeypatch,
                                                                     capsys):
    config = write_config(tmp_path / "eval.toml", tiny_checkpoint, datasets)
    evaluate = zeroshot_cli.evaluate_zeroshot

    def interrupted_at_the_third(*args, name, **kwargs):
        if name == "synthetic":
            raise KeyboardInterrupt
        return evaluate(*args, name=name, **kwargs)

    monkeypatch.setattr(zeroshot_cli, "evaluate_zeroshot", interrupted_at_the_third)
    # Ctrl-C: one line and the shell's status for it, not a traceback of wherever the evaluation was
    assert zeroshot_cli.main([str(config), "confusion_png=false", "--output-dir", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().endswith("clip-zeroshot: interrupted; the files it wrote before are kept")
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(summary["results"]) == ["shapes", "cifar10"] and set(summary["metrics"]) == {"shapes", "cifar10"}


def test_a_class_with_validation_images_alone_is_not_said_to_be_never_predicted(tmp_path, tiny_checkpoint, caplog):
    # The probe is refitted on train + validation, so it predicts blue, which only val/ has
    write_colour_folder(tmp_path / "data" / "train", {"a_red": 6, "b_green": 6}, seed=0)
    write_colour_folder(tmp_path / "data" / "val", {"a_red": 3, "b_green": 3, "c_blue": 3}, seed=1)
    write_colour_folder(tmp_path / "data" / "test", {"a_red": 3, "b_green": 3, "c_blue": 3}, seed=2)
    options = ["--dataset", "imagefolder", "--root", str(tmp_path / "data"), "--val-split", "val"]
    with caplog.at_level("WARNING"):
        assert linear_probe_cli.main(probe_argv(tiny_checkpoint, tmp_path / "out", *options)) == 0
    assert "no training images" not in caplog.text
    assert json.loads((tmp_path / "out" / "linear_probe_results.json").read_text())["test_accuracy"] == 1.0


def test_the_evaluation_commands_read_a_leading_tilde_in_output_dir_as_the_home_folder(monkeypatch):
    # bash leaves "~" alone after "--output-dir=": the results went to a folder named "~" in the current one
    monkeypatch.setenv("HOME", "/home/someone")
    assert zeroshot_cli.parse_args(["eval.toml", "--output-dir=~/z"]).output_dir == "/home/someone/z"
    retrieval = retrieval_cli.parse_args(["--model", "m", "--annotations", "a.json", "--output-dir=~/r"])
    assert retrieval.output_dir == "/home/someone/r"
    probe = linear_probe_cli.parse_args(["--model", "m", "--dataset", "cifar10", "--output-dir=~/p"])
    assert probe.output_dir == "/home/someone/p"


def test_each_dataset_gets_its_own_default_output_folder(tmp_path, tiny_checkpoint, datasets, monkeypatch):
    # In one default folder for all, a second dataset replaced the first one's results, and for the probe its
    # kept features: hours of extraction for a large training split
    monkeypatch.chdir(tmp_path)
    images = sorted((datasets / "shapes").rglob("*.png"))[:3]
    for stem in ("dataset_coco", "dataset_flickr30k"):
        entries = [{"filepath": str(p.parent), "filename": p.name, "split": "test",
                    "sentences": [{"raw": f"{stem} {i}"}]} for i, p in enumerate(images)]
        (tmp_path / f"{stem}.json").write_text(json.dumps({"images": entries}))
        argv = ["--model", str(tiny_checkpoint), "--annotations", str(tmp_path / f"{stem}.json"), "--device", "cpu",
                "--workers", "0"]
        assert retrieval_cli.main(argv) == 0
    for stem in ("dataset_coco", "dataset_flickr30k"):
        result = json.loads((tmp_path / "retrieval_results" / stem / "retrieval_results.json").read_text())
        assert result["dataset"]["annotations"] == str(tmp_path / f"{stem}.json")
    assert retrieval_cli.main([*argv, "--name", "flickr/test"]) == 0  # a name with a slash is one folder
    assert (tmp_path / "retrieval_results" / "flickr_test" / "retrieval_results.json").is_file()
    # COCO's val and test splits share the file's name: scoring val replaced test's results
    assert retrieval_cli.main([*argv, "--split", ""]) == 0
    assert json.loads((tmp_path / "retrieval_results" / "dataset_flickr30k_all" / "retrieval_results.json")
                      .read_text())["dataset"]["split"] == ""
    assert json.loads((tmp_path / "retrieval_results" / "dataset_flickr30k" / "retrieval_results.json")
                      .read_text())["dataset"]["split"] == "test"
    # Two image folders of one name ("images") too: named after the folder alone, the second replaced the first's
    # results and features
    roots = [tmp_path / "pets", tmp_path / "flowers", tmp_path / "a" / "images", tmp_path / "b" / "images"]
    for root in roots:
        write_colour_folder(root / "train", {"a_red": 5, "c_blue": 5}, seed=0)
        write_colour_folder(root / "test", {"a_red": 2, "c_blue": 2}, seed=1)
    probe_options = ["--model", str(tiny_checkpoint), "--device", "cpu", "--workers", "0", "--max-iter", "20"]
    for dataset in ([["--dataset", "imagefolder", "--root", str(root)] for root in roots]
                    + [["--dataset", "imagefolder", "--root", str(tmp_path / "flowers") + "/"],
                       ["--dataset", "synthetic", "--num-samples", "12", "--image-size", "32"]]):
        assert linear_probe_cli.main([*probe_options, *dataset]) == 0
    folders = sorted(path.name for path in (tmp_path / "linear_probe_results").iterdir())
    assert len(folders) == 5 and "synthetic" in folders  # flowers/ is flowers
    # and its results a rerun's, which replace its own
    assert not list((tmp_path / "linear_probe_results").glob("*/linear_probe_results_kept_*"))
    for root in [*roots, None]:
        name = "synthetic" if root is None else \
            f"{root.name}-{hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:8]}"
        assert name in folders
        result = json.loads((tmp_path / "linear_probe_results" / name / "linear_probe_results.json").read_text())
        assert result["data"]["root"] == (None if root is None else str(root))  # absolute, without the "/"
        assert (tmp_path / "linear_probe_results" / name / "features" / "train.pt").is_file()


@pytest.mark.parametrize("variables, said", [
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
      "TORCHELASTIC_RUN_ID": "x"}, "rank 1 of 2 (torchrun)"),
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "3",
      "SLURM_JOB_NODELIST": "node1", "SLURM_STEP_NODELIST": "node1", "SLURM_STEP_ID": "0"}, "rank 3 of 4 (slurm)"),
    # A job script's MASTER_PORT for training, beyond a port's range: still several tasks, each doing the whole job
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "node1",
      "MASTER_PORT": "4152956"}, "rank 1 of 4 (slurm)"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
      "TORCHELASTIC_RUN_ID": "x"}, None),
    # An sbatch script's own shell (no srun step): one process, though SLURM_PROCID and the job's tasks are set
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "node1",
      "SLURM_JOB_ID": "7"}, None),
])
def test_an_evaluation_command_started_as_one_of_several_processes_is_refused(capsys, monkeypatch, variables, said):
    # Under torchrun or a several-task srun every process evaluated everything and wrote the same results files
    from clip.cli.common import run_command

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name in [name for name in os.environ if name.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    ran = []
    status = run_command("clip-zeroshot", lambda args: ran.append(args) or 0, "args")
    if said is None:
        assert (status, ran) == (0, ["args"])
    else:
        assert (status, ran) == (2, [])
        error = capsys.readouterr().err
        assert error.startswith(f"clip-zeroshot: runs in one process, but was started as {said}:")
        assert error.endswith("Start it once: without torchrun, or with `srun -n1`\n")


def test_class_folders_and_images_named_in_bytes_that_are_not_utf8_are_evaluated_and_written(tmp_path,
                                                                                            tiny_checkpoint):
    # A Latin-1 folder name ('red\xff'): clip-zeroshot's digest of the class names encoded it strictly and failed
    # once the whole dataset was evaluated, no results written, and then its confusion plot; the linear probe's
    # feature-cache digest of the file names failed the same way
    import os

    root = tmp_path / "pets"
    for folder, colour in ((os.fsdecode(b"red\xff"), (200, 0, 0)), ("blue", (0, 0, 200))):
        for split in ("train", "test"):
            (root / split / folder).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), colour).save(root / split / folder / os.fsdecode(b"%d\xfe.png" % i))
    config = tmp_path / "eval.toml"
    config.write_text(f'model = "{tiny_checkpoint}"\ndevice = "cpu"\nworkers = 0\n\n[[datasets]]\nname = "pets"\n'
                      f'kind = "imagefolder"\nroot = "{root}"\nsplit = "test"\n', encoding="utf-8")
    assert zeroshot_cli.main([str(config), "--output-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "confusion_pets.png").is_file()
    assert linear_probe_cli.main(["--model", str(tiny_checkpoint), "--device", "cpu", "--workers", "0",
                                  "--max-iter", "20", "--dataset", "imagefolder", "--root", str(root),
                                  "--output-dir", str(tmp_path / "probe")]) == 0
    assert (tmp_path / "probe" / "linear_probe_results.json").is_file()


def test_clip_zeroshot_refuses_a_training_runs_folder_as_its_output(tmp_path, tiny_checkpoint, datasets, capsys):
    # Both write results.json: the trainer's was moved aside as "an earlier version's" and replaced
    from clip import checkpoint as ckpt

    run_dir = tmp_path / "run"
    (run_dir / ckpt.CHECKPOINT_DIR).mkdir(parents=True)
    (run_dir / ckpt.CHECKPOINT_DIR / "step_00000002.pt").write_bytes(b"a checkpoint")
    (run_dir / "results.json").write_text('{"step": 2}')
    config = write_config(tmp_path / "eval.toml", tiny_checkpoint, datasets)
    assert zeroshot_cli.main([str(config), "--output-dir", str(run_dir)]) == 2
    assert capsys.readouterr().err == (f"clip-zeroshot: {run_dir} is a training run's folder, whose results.json is "
                                       f"the trainer's: give another output folder ({run_dir / 'zeroshot'}, say)\n")
    assert sorted(path.name for path in run_dir.iterdir()) == ["checkpoints", "results.json"]
