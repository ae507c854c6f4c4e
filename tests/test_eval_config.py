"""Evaluation configs are checked when they are built: dataset names that would key the same metrics, and
sizes that would only fail deep inside an evaluation loop."""

from __future__ import annotations

import re

import pytest

from clip.config import ConfigError, from_dict
from clip.config_io import load_config
from clip.evaluation.config import (
    EvalConfig,
    RetrievalDatasetConfig,
    ZeroShotDatasetConfig,
    ZeroShotRunConfig,
    repeated_names,
    require_unique_names,
)
from clip.evaluation.datasets import warn_about_duplicate_classnames


def test_zeroshot_names_must_be_unique_after_defaults_apply():
    # Two unnamed imagefolder datasets are both "imagefolder": their metrics would overwrite each other.
    with pytest.raises(ValueError, match=r"^zeroshot needs a unique name per dataset.*'imagefolder' occurs more"):
        EvalConfig(zeroshot=[ZeroShotDatasetConfig(kind="imagefolder", root="a"),
                             ZeroShotDatasetConfig(kind="imagefolder", root="b")])
    # the names are listed, so that the repeated one can be found among many
    with pytest.raises(ValueError, match=re.escape("occurs more than once in ['a', 'imagefolder', 'imagefolder']")):
        EvalConfig(zeroshot=[ZeroShotDatasetConfig(name="a"), *[ZeroShotDatasetConfig(kind="imagefolder", root="x")] * 2])
    EvalConfig(
        zeroshot=[ZeroShotDatasetConfig(kind="imagefolder", root="a"),
                  ZeroShotDatasetConfig(name="b", kind="imagefolder", root="b")]
    )


def test_retrieval_names_default_to_the_file_stem_and_must_be_unique():
    same_stem = [
        RetrievalDatasetConfig(annotations="coco/captions.jsonl"),
        RetrievalDatasetConfig(annotations="flickr/captions.jsonl"),
    ]
    with pytest.raises(ValueError, match=r"^retrieval needs a unique name.*'captions'"):
        EvalConfig(retrieval=same_stem)
    # Zero-shot and retrieval metrics have their own key prefixes, so one name may serve both kinds.
    EvalConfig(zeroshot=[ZeroShotDatasetConfig(name="coco")],
               retrieval=[RetrievalDatasetConfig(name="coco", annotations="coco.json")])


def test_a_training_configs_eval_section_is_checked_when_read():
    section = {"zeroshot": [{"kind": "synthetic"}, {"kind": "synthetic", "seed": 3}]}
    with pytest.raises(ConfigError, match=r"^eval.zeroshot needs a unique name per dataset"):
        from_dict(EvalConfig, section, "eval")


def test_zeroshot_run_config_names_must_be_unique(tmp_path):
    path = tmp_path / "eval.toml"
    path.write_text('model = "m"\n[[datasets]]\nkind = "synthetic"\n[[datasets]]\nkind = "synthetic"\n')
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: datasets needs a unique name per dataset"):
        load_config(path, [], ZeroShotRunConfig)
    assert len(load_config(path, ["datasets.1.name=other"], ZeroShotRunConfig).datasets) == 2


@pytest.mark.parametrize(
    ("schema", "field", "value", "minimum"),
    [
        (EvalConfig, "text_batch_size", 0, 1),
        (EvalConfig, "batch_size", 0, 1),
        (EvalConfig, "retrieval_chunk_size", 0, 1),
        (EvalConfig, "every_n_steps", -5, 0),
        (ZeroShotRunConfig, "text_batch_size", 0, 1),
        (ZeroShotRunConfig, "batch_size", -1, 1),
        (ZeroShotDatasetConfig, "max_samples", -1, 0),
        (ZeroShotDatasetConfig, "num_samples", 0, 1),
        (ZeroShotDatasetConfig, "image_size", 0, 1),
        (ZeroShotDatasetConfig, "seed", -1, 0),
        (RetrievalDatasetConfig, "max_images", -2, 0),
    ],
)
def test_sizes_out_of_range_are_refused_with_the_fields_name(schema, field, value, minimum):
    with pytest.raises(ConfigError, match=rf"^{field} must be >= {minimum}, got {value}$"):
        from_dict(schema, {field: value})


@pytest.mark.parametrize("schema", [EvalConfig, ZeroShotRunConfig])
@pytest.mark.parametrize("workers", [-1, 1025])
def test_worker_counts_are_refused_outside_0_to_1024(schema, workers):
    with pytest.raises(ConfigError, match=rf"^workers must be in \[0, 1024\] \(0 = decode in the main process\), "
                                          rf"got {workers}$"):
        from_dict(schema, {"workers": workers})


def test_range_errors_name_the_dotted_key_of_the_file():
    with pytest.raises(ConfigError, match=r"^eval.text_batch_size must be >= 1, got 0$"):
        from_dict(EvalConfig, {"text_batch_size": 0}, "eval")


class CountedName(str):
    """A class name that counts how often it is compared for equality."""

    comparisons = 0

    def __eq__(self, other):
        CountedName.comparisons += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def test_repeated_names_are_found_with_a_linear_number_of_comparisons(caplog):
    # ImageNet-21k has 21,843 classes; a list.count per name made n^2 comparisons (seconds), at every
    # evaluation, on every rank. Counted, not timed: timings belong in benchmarks/.
    assert repeated_names(["b", "a", "b", "c", "a", "b"]) == ["a", "b"]
    names = [CountedName(f"class {i}") for i in range(500)]
    CountedName.comparisons = 0
    require_unique_names("datasets", names)
    with caplog.at_level("WARNING"):
        warn_about_duplicate_classnames([*names, CountedName("class 7")], "big")
    assert CountedName.comparisons < 5 * len(names)  # quadratic counting: ~250,000
    assert "share the name(s) ['class 7']" in caplog.text
    assert "differ only in case" not in caplog.text  # exact repeats are said once, above
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_about_duplicate_classnames(["Apple", "apple", "red  fox", "red fox", "pear"], "fruit")
    assert "fruit: class names that differ only in case or spacing give the same prompts (the tokenizer " \
           "lowercases and collapses spaces), so zero-shot classification cannot tell them apart: 'Apple' = 'apple', " \
           "'red  fox' = 'red fox'" in caplog.text and "share the name" not in caplog.text


def test_retrieval_quoting_takes_the_training_sources_values():
    section = {"retrieval": [{"annotations": "captions.tsv", "quoting": "csv"}]}
    assert from_dict(EvalConfig, section, "eval").retrieval[0].quoting == "csv"
    assert RetrievalDatasetConfig(annotations="captions.tsv").quoting == "auto"
    section["retrieval"][0]["quoting"] = "pandas"
    with pytest.raises(ConfigError, match=r"eval.retrieval\[0\].quoting: 'pandas' is not one of 'auto', 'none', 'csv'"):
        from_dict(EvalConfig, section, "eval")


def test_an_unknown_builtin_template_set_is_a_config_error_naming_the_key():
    # It was found when the dataset was listed, in a message that named no key
    from clip.config import TrainConfig

    with pytest.raises(ConfigError, match=r"eval\.zeroshot\[0\]\.builtin_templates must be one of 'default', "
                                          r"'simple', got 'fancy'"):
        from_dict(TrainConfig, {"eval": {"zeroshot": [{"builtin_templates": "fancy"}]}})


def test_a_zeroshot_output_dir_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    # No shell expands a TOML file's "~/results": it made a folder named "~" in the current one
    monkeypatch.setenv("HOME", "/home/someone")
    config_file = tmp_path / "eval.toml"
    config_file.write_text('model = "RN50"\noutput_dir = "~/results"\n')
    assert load_config(config_file, [], ZeroShotRunConfig).output_dir == "/home/someone/results"


def test_path_settings_built_in_python_take_a_pathlib_path(tmp_path, monkeypatch):
    # As the training config's do: home_expanded failed on them with AttributeError: 'PosixPath' object has no
    # attribute 'split', and ZeroShotRunConfig kept model a Path, which its results.json cannot hold
    from pathlib import Path

    monkeypatch.setenv("HOME", "/home/someone")
    zeroshot = ZeroShotDatasetConfig(kind="imagefolder", root=Path("~") / "imagenet", split="val",
                                     classnames_file=tmp_path / "classes.txt", templates_file=tmp_path / "t.txt")
    assert (zeroshot.root, zeroshot.classnames_file, zeroshot.templates_file) == (
        "/home/someone/imagenet", str(tmp_path / "classes.txt"), str(tmp_path / "t.txt"))
    retrieval = RetrievalDatasetConfig(annotations=tmp_path / "coco.json", image_root=Path("~/coco"))
    assert (retrieval.annotations, retrieval.image_root) == (str(tmp_path / "coco.json"), "/home/someone/coco")
    assert retrieval.resolved_name() == "coco"
    run = ZeroShotRunConfig(model=tmp_path / "run", output_dir=Path("~/results"), datasets=[zeroshot])
    assert (run.model, run.output_dir) == (str(tmp_path / "run"), "/home/someone/results")


def test_an_evaluation_config_built_in_python_refuses_a_wrong_type_as_a_file_does():
    with pytest.raises(ConfigError, match=r"^num_samples: expected an integer, got '500'$"):
        ZeroShotDatasetConfig(num_samples="500")
    with pytest.raises(ConfigError, match=r"^kind: 'cifar' is not one of 'imagefolder', 'cifar10', 'cifar100', "):
        ZeroShotDatasetConfig(kind="cifar")
    with pytest.raises(ConfigError, match=r"^max_images: expected an integer, got 1\.5$"):
        RetrievalDatasetConfig(max_images=1.5)
    # a dataset's table as a dict was kept, to fail as AttributeError: 'dict' object has no attribute
    # 'resolved_name'; now read as a file's [[datasets]] table is
    assert ZeroShotRunConfig(datasets=[{"kind": "synthetic", "name": "shapes"}]).datasets == [
        ZeroShotDatasetConfig(kind="synthetic", name="shapes")]
    with pytest.raises(ConfigError, match=r"^confusion_png: expected true or false, got 0$"):
        ZeroShotRunConfig(confusion_png=0)


def test_a_synthetic_image_size_beyond_any_model_s_input_is_refused_with_the_config():
    # 100000 pixels a side asked numpy for 75 GB: a traceback once the model had loaded
    with pytest.raises(ConfigError, match=r"^image_size must be at most 4096 .* got 100000$"):
        ZeroShotDatasetConfig(image_size=100000)
    assert ZeroShotDatasetConfig(image_size=4096).image_size == 4096


def test_a_count_option_beyond_64_bits_is_refused_by_the_option():
    # --batch-size 99999999999999999999 failed deep inside, "Stop argument for islice() must be ..."
    import argparse

    from clip.cli.common import positive_int

    with pytest.raises(argparse.ArgumentTypeError, match=r"must be below 2\*\*63"):
        positive_int("99999999999999999999")
    assert positive_int(str(2**63 - 1)) == 2**63 - 1
