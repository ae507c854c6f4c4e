"""The zero-shot command agrees with a training run's own evaluation, on the synthetic set and on the same
images exported as an ImageFolder tree (the demo's documented workflow, shrunk)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from clip.checkpoint import list_checkpoints
from clip.cli.zeroshot import main as zeroshot_main
from clip.train import train

from test_train_loop import tiny_config

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def export_synthetic():
    # The repository's own script, loaded by its path: pytest.importorskip turned a script broken by an import
    # error into skipped tests, and the suite passed
    spec = importlib.util.spec_from_file_location("export_synthetic", ROOT / "scripts" / "export_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_zeroshot_cli_reproduces_the_runs_evaluation(tmp_path, export_synthetic):
    run = tmp_path / "run"
    results = train(tiny_config(run, "eval.every_n_steps=0", "eval.zeroshot.0.num_samples=96"))
    expected = results["zeroshot/synthetic/top1"]

    common = [f"model={run}", "device=cpu", "workers=0", "datasets.0.num_samples=96"]
    assert zeroshot_main([str(ROOT / "configs/eval/zeroshot_demo.toml"), *common, "--output-dir", str(tmp_path / "a")]) == 0
    cli = json.loads((tmp_path / "a" / "results.json").read_text())
    step, checkpoint = list_checkpoints(run)[0]  # the trainer's newest, named with its step
    assert cli["weights"] == {"path": str(checkpoint.resolve()), "step": step, "released": None,
                              "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}

    folder = tmp_path / "run" / "heldout_images"
    assert export_synthetic.main([str(folder), "--num-samples", "96", "--image-size", "32", "--seed", "1"]) == 0
    assert export_synthetic.main([str(folder)]) == 2  # a folder that holds files: one line, not a traceback
    folder_config = [
        f"model={run}", "device=cpu", "workers=0",
        f"datasets.0.root={folder}", f"datasets.0.templates_file={folder / 'templates.txt'}",
    ]
    assert zeroshot_main([str(ROOT / "configs/eval/zeroshot_demo_folder.toml"), *folder_config,
                          "--output-dir", str(tmp_path / "b")]) == 0
    from_folder = json.loads((tmp_path / "b" / "results.json").read_text())

    # top-5 too: a few steps of a tiny model are near chance at top-1, but its top-5 is not zero
    expected_top5 = results["zeroshot/synthetic/top5"]
    assert expected_top5 > 0
    for name, output in [("synthetic", cli), ("demo_heldout_folder", from_folder)]:
        metrics = output["metrics"][name]
        assert metrics["top1"] == pytest.approx(expected, abs=1e-9)
        assert metrics["top5"] == pytest.approx(expected_top5, abs=1e-9)


@pytest.mark.parametrize("option", [["--num-samples", "0"], ["--num-samples", "-5"], ["--image-size", "8"],
                                    ["--seed", "-1"]])
def test_export_synthetic_refuses_numbers_it_cannot_use_in_one_line(tmp_path, option, capsys, export_synthetic):
    # 0 images wrote an empty tree with status 0; the others were tracebacks
    with pytest.raises(SystemExit) as exited:
        export_synthetic.main([str(tmp_path / "out"), *option])
    assert exited.value.code == 2 and f"argument {option[0]}: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_synthetic_into_a_file_is_one_line(tmp_path, capsys, export_synthetic):
    (tmp_path / "file").write_text("x")
    assert export_synthetic.main([str(tmp_path / "file"), "--num-samples", "2"]) == 2
    assert capsys.readouterr().err.startswith("export_synthetic: ")
