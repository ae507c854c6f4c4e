"""What open_clip's users type out of habit: its training flags, its precision names and its model names. Each is
refused with what to write here instead, not with an error that names nothing to do."""

from __future__ import annotations

import dataclasses
import re

import pytest

import clip
from clip.cli.train import main
from clip.config import TrainConfig, load_config
from clip.config_io import ConfigError
from clip.evaluation.config import ZeroShotRunConfig


def test_open_clip_training_flags_are_refused_naming_each_override(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--train-data", "shards/{00000..00009}.tar", "--batch-size", "64", "--epochs=2", "--lr", "1e-3"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "section.key=value" in error
    for flag, equivalent in [("--train-data", "a [[data.sources]] table: data.sources.0.kind=shards data.sources.0.path="),
                             ("--batch-size", "train.batch_size="), ("--epochs", "schedule.steps="),
                             ("--lr", "optimizer.lr=")]:
        assert f"{flag} -> {equivalent}" in error
    assert "unrecognized arguments" not in error


def test_a_flag_open_clip_does_not_have_keeps_argparse_s_error(capsys):
    with pytest.raises(SystemExit):
        main(["configs/demo.toml", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize(("spelling", "here"), [("amp_bf16", "'bf16'"), ("amp", "'fp16'"), ("pure_bf16", "'bf16'")])
def test_open_clip_precision_names_say_what_they_are_here(spelling, here):
    with pytest.raises(ConfigError, match=f"open_clip's '{spelling}'.*{here}"):
        load_config(None, [f"train.precision={spelling}"], TrainConfig)


def test_every_precision_field_says_what_open_clip_s_names_are_here():
    # Each config with a precision field offers the hint itself: the evaluation's and clip-zeroshot's too
    with pytest.raises(ConfigError, match=r"^eval\.precision: .*\(open_clip's 'amp_bf16' is 'bf16' here"):
        load_config(None, ["eval.precision=amp_bf16"], TrainConfig)
    with pytest.raises(ConfigError, match=r"^precision: .*\(open_clip's 'amp' is 'fp16' here"):
        load_config(None, ["precision=amp"], ZeroShotRunConfig)


@pytest.mark.parametrize(("written", "table", "key"), [
    ("[train]\nepochs = 2\n", "train", "epochs"), ("[train]\nepoch = 2\n", "train", "epoch"),
    ("epochs = 2\n", "", "epochs"), ("[schedule]\nepochs = 2\n", "schedule", "epochs"),
    ("[optimizer]\nnum_epochs = 2\n", "optimizer", "num_epochs"),
])
def test_a_number_of_epochs_says_the_run_length_is_schedule_steps(tmp_path, written, table, key):
    # open_clip counts a run in epochs. [train] epochs listed [train]'s keys, [schedule] epochs was asked if it
    # meant 'steps' and [optimizer] epochs if it meant 'eps', none with a word of the unit
    config = tmp_path / "epochs.toml"
    config.write_text(written, encoding="utf-8")
    name = f"{table}.{key}" if table else key
    with pytest.raises(ConfigError) as raised:
        load_config(config, [], TrainConfig)
    assert str(raised.value).startswith(
        f"{config}: unknown config key {name!r} (the run's length is 'schedule.steps' here, counted in optimiser steps: "
        f"epochs x samples per epoch / global batch). Valid keys{f' in {table}' if table else ''}: ")
    with pytest.raises(ConfigError, match=re.escape(f"in override '{name}=2' (the run's length is 'schedule.steps'")):
        load_config(None, [f"{name}=2"], TrainConfig)


@pytest.mark.parametrize(("theirs", "ours"), [
    ("max_steps", "schedule.steps"), ("total_steps", "schedule.steps"), ("learning_rate", "optimizer.lr"),
    ("wd", "optimizer.weight_decay"), ("warmup", "schedule.warmup_steps"), ("lr_scheduler", "schedule.kind"),
    ("accum_freq", "train.accumulation_steps"), ("gradient_accumulation_steps", "train.accumulation_steps"),
    ("max_grad_norm", "optimizer.grad_clip_norm"), ("pretrained", "train.init_weights"),
    ("num_workers", "data.workers"),
])
def test_other_trainers_names_say_which_key_they_are_here(theirs, ours):
    # Their closest spelling misled ([train] max_steps: 'train.accumulation_steps'; [train] pretrained:
    # 'train.precision') or there was none. Said in each section they are likely written in, and the key named
    # is one: an override of it is taken
    for section in ("", "train.", "optimizer.", "schedule."):
        with pytest.raises(ConfigError, match=re.escape(f"'{ours}' here")):
            load_config(None, [f"{section}{theirs}=1"], TrainConfig)
    section, key = ours.split(".")
    assert key in {field.name for field in dataclasses.fields(getattr(TrainConfig(), section))}


def test_open_clip_s_constant_schedules_say_what_they_are_here():
    with pytest.raises(ConfigError, match=re.escape("(open_clip's 'const-cooldown' is 'constant_cooldown' here)")):
        load_config(None, ["schedule.kind=const-cooldown"], TrainConfig)
    with pytest.raises(ConfigError, match=re.escape("(open_clip's 'const' is 'constant' here)")):
        load_config(None, ["schedule.kind=const"], TrainConfig)


def test_open_clip_gelu_model_names_are_not_pointed_at_the_quickgelu_architecture():
    # "Did you mean 'ViT-B/32'?" built OpenAI's QuickGELU model for open_clip's GELU ViT-B-32
    with pytest.raises(ValueError, match=r"'ViT-B-32' is 'ViT-B/32' with GELU: .*'activation': 'gelu'"):
        clip.create_model("ViT-B-32")
    with pytest.raises(ValueError, match=r"'RN50-quickgelu' is 'RN50' here"):
        clip.create_model("RN50-quickgelu")


def test_open_clip_model_names_are_read_whatever_their_case_and_surrounding_spaces():
    # A name typed in lower case or pasted with a space still gets its open_clip hint, not difflib's guess (which,
    # for a GELU name, points at the QuickGELU release) -- and a spaced '-quickgelu' name is still that release
    with pytest.raises(ValueError, match=r"'vit-b-32' is 'ViT-B/32' with GELU"):
        clip.create_model("vit-b-32")
    with pytest.raises(ValueError, match=r"'vit-l-14-336' is 'ViT-L/14@336px' with GELU"):
        clip.create_model("vit-l-14-336")
    with pytest.raises(ValueError, match=r"'RN50-quickgelu ' is 'RN50' here"):
        clip.create_model("RN50-quickgelu ")
    with pytest.raises(ValueError, match=r"' ViT-B-32' is 'ViT-B/32' with GELU"):
        clip.create_model(" ViT-B-32")


def test_a_model_name_in_the_config_says_to_write_a_model_table(tmp_path):
    # open_clip's --model habit; the error named the expected type only
    config = tmp_path / "named.toml"
    config.write_text('model = "ViT-B-32"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"write a \[model\] table.*RELEASED_ARCHITECTURES\['ViT-B/32'\].*\"gelu\""):
        load_config(config, [], TrainConfig)


def test_open_clip_s_unlocked_groups_of_one_is_said_to_have_no_counterpart(capsys):
    # Its 1 unlocks the projection alone; N-1 = 0 here locks the whole tower, projection included
    with pytest.raises(SystemExit):
        main(["configs/demo.toml", "--lock-image", "--lock-image-unlocked-groups", "1"])
    error = capsys.readouterr().err
    assert "--lock-image-unlocked-groups -> train.lock_image_unlocked_layers=N-1 for open_clip's N >= 2" in error
    assert "the projection alone, is not offered" in error


def test_open_clip_s_resnet_names_say_they_are_gelu_models_there():
    # open_clip's RN50 (no -quickgelu) has a GELU text tower; the name here is OpenAI's QuickGELU model, and the
    # hint gave its sizes without a word of the activation
    named_gelu = r"RELEASED_ARCHITECTURES\['RN50'\].*activation = \"gelu\" for open_clip's RN50"
    with pytest.raises(ConfigError, match=named_gelu):
        load_config(None, ["model=RN50"], TrainConfig)
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["model=ViT-B/32"], TrainConfig)  # OpenAI's spelling: its own activation
    assert "gelu" not in str(raised.value)


def test_open_clip_s_quickgelu_model_names_are_not_said_to_be_gelu_models():
    with pytest.raises(ConfigError, match=r"RELEASED_ARCHITECTURES\['ViT-B/32'\]") as raised:
        load_config(None, ["model=ViT-B-32-quickgelu"], TrainConfig)
    assert "gelu" not in str(raised.value).replace("quickgelu", "")


@pytest.mark.parametrize("override", ["schedule.kind=[1]", "train.precision=[1]", "eval.precision=[1]", "model=[1]",
                                      "model=5", "schedule.kind=5"])
def test_a_value_of_another_type_than_a_habit_s_name_is_a_plain_type_error(override):
    # The hints look their value up among names: a list there raised TypeError (unhashable) out of the loader
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override], TrainConfig)
    assert "open_clip" not in str(raised.value) and "a name is not an architecture" not in str(raised.value)


def test_open_clip_s_precision_names_are_hinted_at_for_the_precision_field_only():
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["train.batch_size=amp_bf16"], TrainConfig)
    assert "open_clip" not in str(raised.value)


def test_an_override_written_as_an_option_says_to_drop_the_dashes(capsys):
    # argparse's "unrecognized arguments: --train.seed=3" did not say that an override is written without them
    with pytest.raises(SystemExit) as exit_info:
        main(["configs/demo.toml", "--train.seed=3", "--schedule.steps", "4"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "written without dashes" in error and "unrecognized arguments" not in error
    assert "--train.seed=3 -> train.seed=3" in error and "--schedule.steps -> schedule.steps=VALUE" in error
