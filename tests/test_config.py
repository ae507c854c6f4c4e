"""The typed config loader: TOML files, overrides, unknown keys, wrong types, and round trips."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from clip.architectures import RELEASED_ARCHITECTURES, ModelConfig, VisionConfig
from clip.config_io import ConfigError, from_dict, load_config, to_dict, to_toml


@dataclass
class Source:
    path: str = ""
    weight: float = 1.0


@dataclass
class Section:
    lr: float = 1e-3
    steps: int = 10
    name: str = "x"
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    clip_norm: float | None = None
    betas: tuple[float, ...] = (0.9, 0.98)


@dataclass
class Schema:
    section: Section = field(default_factory=Section)
    model: ModelConfig = field(default_factory=ModelConfig)
    sources: list[Source] = field(default_factory=list)
    output_dir: str = "runs/x"


def write(tmp_path, text: str):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_file_and_overrides(tmp_path):
    path = write(tmp_path, '[section]\nlr = 0.5\nsteps = 3\n[[sources]]\npath = "a.tar"\nweight = 2\n')
    config = load_config(path, ["section.steps=7", "section.mode=b", "model.vision.layers=[3,4,6,3]",
                                "model.vision.kind=resnet", "section.clip_norm=1.5", "output_dir=/tmp/run"], Schema)
    assert config.section.lr == 0.5 and config.section.steps == 7 and config.section.mode == "b"
    assert config.section.clip_norm == 1.5
    assert config.model.vision.layers == (3, 4, 6, 3)
    assert config.sources == [Source("a.tar", 2.0)]
    assert config.output_dir == "/tmp/run"  # a bare string needs no quotes
    config = load_config(path, ["sources.0.weight=0.5"], Schema)
    assert config.sources == [Source("a.tar", 0.5)]
    with pytest.raises(ConfigError, match="no index 3"):
        load_config(path, ["sources.3.weight=0.5"], Schema)
    with pytest.raises(ConfigError, match="Did you mean 'sources.0.weight'"):
        load_config(path, ["sources.0.wieght=0.5"], Schema)


def test_a_shard_range_the_shell_expanded_is_refused(tmp_path):
    # `sources.0.path=d/{00000..00003}.tar` unquoted reaches the program as four overrides; the last one won and
    # the run trained on one shard of four without a word
    path = write(tmp_path, '[[sources]]\npath = "x.tar"\n')
    expanded = [f"sources.0.path=d/{i:05d}.tar" for i in range(4)]
    with pytest.raises(ConfigError, match=re.escape(
            "override key 'sources.0.path' is given 4 times ('d/00000.tar', 'd/00001.tar', ..., 'd/00003.tar'): the "
            "shell expanded an unquoted {first..last} range")) as error:
        load_config(path, expanded, Schema)
    assert "Quote the override: 'sources.0.path=DIR/{00000..00009}.tar'" in str(error.value)
    with pytest.raises(ConfigError, match=re.escape("given 3 times ('d/00000.tar', 'd/00001.tar', 'd/00002.tar'):")):
        load_config(path, expanded[:3], Schema)  # three are all shown
    with pytest.raises(ConfigError, match=r"'sources.0.path' is given 2 times \('d/1.tar', 'd/2.tar'\)"):
        load_config(path, ["sources[0].path=d/1.tar", "sources.0.path=d/2.tar"], Schema)  # one key, two spellings
    # The quoted pattern is one override; another key repeated keeps its last value, as before
    config = load_config(path, ["sources.0.path=d/{00000..00003}.tar", "section.steps=1", "section.steps=2"], Schema)
    assert config.sources == [Source("d/{00000..00003}.tar", 1.0)] and config.section.steps == 2
    assert load_config(path, ["sources.0.path=a.tar", "sources.0.path=b.tar"], Schema).sources[0].path == "b.tar"
    # Quoted patterns that differ in their numbers alone (a wrapper's dataset replaced by the user's) were
    # refused as an expansion, which leaves no brace in its values
    quoted = ["sources.0.path=cc3m/{00000..00331}.tar", "sources.0.path=cc12m/{00000..01242}.tar"]
    assert load_config(path, quoted, Schema).sources[0].path == "cc12m/{00000..01242}.tar"
    # Nor are paths whose numbers do not count by one (the shell's range would): a wrapper's path then the user's
    replaced = ["sources.0.path=/data/pairs_2019.csv", "sources.0.path=/data/pairs_2023.csv"]
    assert load_config(path, replaced, Schema).sources[0].path == "/data/pairs_2023.csv"
    two_numbers = ["sources.0.path=v1/0.tar", "sources.0.path=v2/1.tar"]
    assert load_config(path, two_numbers, Schema).sources[0].path == "v2/1.tar"
    with pytest.raises(ConfigError, match="given 3 times"):  # counting down is a range too
        load_config(path, ["sources.0.path=d/3.tar", "sources.0.path=d/2.tar", "sources.0.path=d/1.tar"], Schema)


def test_an_override_written_with_spaces_around_its_parts_is_read_without_them():
    # 'section.name = y' quoted as one word: the key and the text are what the spaces surround
    config = load_config(None, ["section.name = y", " section.steps =3", "section.betas= [1, 2] "], Schema)
    assert (config.section.name, config.section.steps, config.section.betas) == ("y", 3, (1.0, 2.0))


def test_an_override_below_a_key_an_earlier_override_set_to_a_value_is_refused():
    with pytest.raises(ConfigError, match=re.escape("override 'section.lr=1': section is 5, not a section")):
        load_config(None, ["section=5", "section.lr=1"], Schema)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"section\.lrr.*Did you mean 'lr'"):
        load_config(write(tmp_path, "[section]\nlrr = 1.0\n"), [], Schema)
    with pytest.raises(ConfigError, match=r"'section.stesp'.*Did you mean 'section.steps'"):
        load_config(None, ["section.stesp=3"], Schema)
    with pytest.raises(ConfigError, match="Did you mean 'section'"):
        load_config(None, ["sectoin.lr=3"], Schema)


def test_an_error_in_a_config_files_contents_names_the_file(tmp_path):
    # As a syntax error did: "unknown config key" in a cluster job's log did not say which recipe held it
    path = write(tmp_path, "[section]\nlrr = 1.0\nsteps = 0\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: unknown config key 'section.lrr'"):
        load_config(path, [], Schema)
    path = write(tmp_path, "[section]\nmode = 'c'\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: section.mode: 'c' is not one of"):
        load_config(path, ["section.lr=0.5"], Schema)  # an override beside it changes nothing
    assert load_config(path, ["section.mode=b"], Schema).section.mode == "b"  # an override may fix the file
    # An override's value is not the file's
    with pytest.raises(ConfigError, match="^section.mode: 'd' is not one of 'a', 'b'$"):
        load_config(write(tmp_path, "[section]\nlr = 0.5\n"), ["section.mode=d"], Schema)


def test_an_unknown_key_near_none_lists_the_valid_keys_of_its_table_in_a_file_as_in_an_override(tmp_path):
    # From a file the list said "Valid keys: ..." without the table, which an override named
    listed = "Valid keys in section: betas, clip_norm, flag, lr, mode, name, steps."
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key 'section.zzzzzz'. {listed}")):
        load_config(write(tmp_path, "[section]\nzzzzzz = 1\n"), [], Schema)
    with pytest.raises(ConfigError, match=re.escape(listed)):
        load_config(None, ["section.zzzzzz=1"], Schema)
    with pytest.raises(ConfigError, match=re.escape("'zzzzzz'. Valid keys: model, output_dir, section, sources.")):
        load_config(write(tmp_path, "zzzzzz = 1\n"), [], Schema)  # a top-level key names no table
    # a quoted key holding a dot has no siblings among the table's keys: its list left out the table
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key 'section.zz.zz'. {listed}")):
        load_config(write(tmp_path, '[section]\n"zz.zz" = 1\n'), [], Schema)


@dataclass
class Hinted:
    """A schema with a word for its users: on a value its field refuses and on a key it does not have."""

    mode: Literal["a", "b"] = "a"
    section: Section = field(default_factory=Section)

    @staticmethod
    def config_hint(key: str, value: object) -> str:
        hints = {"mode": "modes are lower case" if value == "A" else "", "section": "a section is a table",
                 "epochs": "the length is 'section.steps'", "lr": "never shown: another section has it"}
        return hints.get(key, "")


def test_a_schema_s_hint_joins_the_error_for_a_value_it_refuses_and_a_key_it_lacks(tmp_path):
    for path, overrides in [(write(tmp_path, 'mode = "A"\n'), []), (None, ["mode=A"])]:
        with pytest.raises(ConfigError, match=re.escape("mode: 'A' is not one of 'a', 'b' (modes are lower case)")):
            load_config(path, overrides, Hinted)
    with pytest.raises(ConfigError, match=r"^mode: 'c' is not one of 'a', 'b'$"):  # "" from the hook: no hint
        load_config(None, ["mode=c"], Hinted)
    # An unknown key: the hint instead of a guessed spelling, and the table's valid keys
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'epochs' (the length is 'section.steps'). "
                                                    "Valid keys: mode, section.")):
        load_config(write(tmp_path, "epochs = 3\n"), [], Hinted)
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'epochs' in override 'epochs=3' (the length "
                                                    "is 'section.steps'). Valid keys: mode, section.")):
        load_config(None, ["epochs=3"], Hinted)


def test_a_schema_s_hint_is_not_added_to_an_error_inside_a_table_nor_over_another_section_s_key(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("section: expected a table of Section fields, got 5 (a section "
                                                    "is a table)")):
        load_config(None, ["section=5"], Hinted)
    # The error is about a key inside the table, which Section (with no hint) was asked about
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, '[section]\nmode = "c"\n'), [], Hinted)
    assert "a section is a table" not in str(raised.value)
    # A key that another section has is named as such, the hint aside
    for path, overrides in [(write(tmp_path, "lr = 1.0\n"), []), (None, ["lr=1.0"])]:
        with pytest.raises(ConfigError, match=re.escape("Did you mean 'section.lr'?")) as raised:
            load_config(path, overrides, Hinted)
        assert "never shown" not in str(raised.value)


@dataclass
class HintedList:
    """A schema whose hint looks at the value given for a key it lacks, and has a list of tables."""

    sections: list[Section] = field(default_factory=list)

    @staticmethod
    def config_hint(key: str, value: object) -> str:
        hints = {"sections": "sections are tables", "epochs": f"epochs given as {type(value).__name__}"}
        return hints.get(key, "")


def test_a_schema_s_hint_gets_an_override_s_value_as_read_and_is_not_added_inside_a_list_of_tables(tmp_path):
    # The hook is given the value as TOML reads it (the number 3), as for the same key in a file
    for path, overrides in [(write(tmp_path, "epochs = 3\n"), []), (None, ["epochs=3"])]:
        with pytest.raises(ConfigError, match=re.escape("(epochs given as int)")):
            load_config(path, overrides, HintedList)
    # A key inside an element's table is refused by Section, which has no hint; the list's own one is not said
    with pytest.raises(ConfigError, match="mode") as raised:
        load_config(write(tmp_path, '[[sections]]\nmode = "c"\n'), [], HintedList)
    assert "sections are tables" not in str(raised.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("section.steps=1.5", "expected an integer"),
        ("section.steps=true", "expected an integer"),
        ("section.flag=1", "expected true or false"),
        ("section.mode=c", "not one of"),
        ("section.lr=fast", "expected a number"),
        ("model.vision.kind=cnn", "vision.kind"),
        ("model.vision.layers=[1,2]", "four stage depths"),
        ("section.lr", "section.key=value"),
    ],
)
def test_wrong_types_are_errors(override, message):
    base = ["model.vision.kind=resnet", "model.vision.layers=[3,4,6,3]"] if "layers=[1" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config(None, base + [override], Schema)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml", [], Schema)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[section\nlr = 1"), [], Schema)


def test_toml_round_trip():
    config = from_dict(Schema, {"section": {"lr": 0.25, "clip_norm": None, "name": 'say "hi"\n\t\r\x01\x7f\\'},
                                "sources": [{"path": "a"}, {"path": "b", "weight": 0.5}],
                                "model": {"vision": {"kind": "resnet", "layers": [2, 2, 2, 2], "heads": 4, "width": 32}}})
    text = to_toml(to_dict(config))
    again = from_dict(Schema, tomllib.loads(text))
    assert again == config


def test_toml_writes_an_empty_list_as_a_value_and_ends_each_line():
    # An empty array of tables has no [[table]] to write: left out, it would read back as its default list
    assert to_toml({"a": [], "t": {"b": 1}}) == "a = []\n\n[t]\nb = 1\n"


def test_train_config_round_trips_through_a_checkpoint_dict(tmp_path):
    from clip.config import TrainConfig

    config = load_config(None, ["schedule.steps=5", "model.embed_dim=64", "train.precision=bf16"], TrainConfig)
    data = to_dict(config)
    assert from_dict(TrainConfig, data) == config
    assert from_dict(TrainConfig, tomllib.loads(to_toml(data))) == config
    assert ModelConfig.from_dict(data["model"]) == config.model


def test_every_recipe_in_configs_loads():
    from pathlib import Path

    from clip.config import TrainConfig

    recipes = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))
    assert recipes, "no recipes found"
    for recipe in recipes:
        first_line = recipe.read_text().splitlines()[0]
        assert first_line.startswith("#") and "train.py" in first_line, f"{recipe} must start with its command"
        config = load_config(recipe, [], TrainConfig)
        if config.train.init_weights in RELEASED_ARCHITECTURES:  # a fine-tuning recipe states that architecture
            assert config.model == RELEASED_ARCHITECTURES[config.train.init_weights], recipe


# The paper's recipes: the released architecture each trains from scratch, and the paper's learning rate,
# Adam beta2 and epsilon for it (Tables 19 and 20; ResNets and ViTs differ in the Adam settings).
PAPER_RECIPES = {
    "rn50_paper.toml": ("RN50", 5e-4, 0.999, 1e-8),
    "vit_b32_paper.toml": ("ViT-B/32", 5e-4, 0.98, 1e-6),
    "vit_b16_paper.toml": ("ViT-B/16", 5e-4, 0.98, 1e-6),
    "vit_l14_paper.toml": ("ViT-L/14", 4e-4, 0.98, 1e-6),
}


@pytest.mark.parametrize("recipe", sorted(PAPER_RECIPES))
def test_a_paper_recipe_trains_its_released_architecture_with_the_papers_settings(recipe):
    from pathlib import Path

    from clip.config import TrainConfig

    name, lr, beta2, eps = PAPER_RECIPES[recipe]
    path = Path(__file__).parent.parent / "configs" / recipe
    config = load_config(path, [], TrainConfig)
    assert config.model == RELEASED_ARCHITECTURES[name]
    assert config.train.init_weights is None  # from scratch
    optimizer = config.optimizer
    assert (optimizer.lr, optimizer.beta2, optimizer.eps, optimizer.weight_decay) == (lr, beta2, eps, 0.2)
    assert (optimizer.beta1, optimizer.grad_clip_norm, optimizer.decay_embeddings) == (0.9, None, True)
    # 32 epochs of 400M pairs at a global batch of 32,768 on the 32 x 8 GPUs of the first line's command
    assert config.train.batch_size * 32 * 8 == 32_768
    assert config.schedule.steps == 32 * 400_000_000 // 32_768 and config.schedule.warmup_steps == 2_000
    assert config.loss.max_logit_scale == 100.0
    assert "--nnodes 32 --nproc-per-node 8" in path.read_text().splitlines()[0]


def test_the_336_pixel_recipe_is_one_more_epoch_of_the_224_pixel_run_at_336_pixels():
    # ViT-L/14@336px, as the paper made it: one more epoch at the higher resolution, from the ViT-L/14 run
    import dataclasses
    from pathlib import Path

    from clip.config import TrainConfig

    folder = Path(__file__).parent.parent / "configs"
    base = load_config(folder / "vit_l14_paper.toml", [], TrainConfig)
    config = load_config(folder / "vit_l14_336_paper.toml", [], TrainConfig)
    assert config.model == RELEASED_ARCHITECTURES["ViT-L/14@336px"]
    assert config.train.init_weights == base.output_dir
    assert config.schedule.steps == 400_000_000 // 32_768 and config.train.batch_size * 32 * 8 == 32_768
    assert config.optimizer.lr < base.optimizer.lr and config.output_dir != base.output_dir
    assert dataclasses.replace(config.model, vision=base.model.vision) == base.model  # the image size alone differs


def test_vision_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        VisionConfig(kind="vit", image_size=225, patch_size=32)


RESNET = {"kind": "resnet", "image_size": 64, "width": 16, "layers": (1, 1, 1, 1), "heads": 4}


@pytest.mark.parametrize("fields, message", [
    # The tower downsamples by 32: a 48-pixel image would give no whole grid for the attention pool
    ({**RESNET, "image_size": 48}, "a ResNet downsamples by 32: vision.image_size=48 is not a multiple"),
    # A stage without blocks: the check read one depth of the four
    ({**RESNET, "layers": (1, 0, 1, 1)}, "layers must be > 0, got 0"),
    ({**RESNET, "heads": 3}, "attention-pool width 512 is not divisible by 3 heads"),
    ({"kind": "vit", "image_size": 64, "width": 48, "layers": 1, "heads": 5, "patch_size": 32},
     "vision.width=48 is not divisible by vision.heads=5"),
])
def test_vision_config_refuses_a_tower_that_cannot_be_built(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        VisionConfig(**fields)


def test_resnet_heads_divide_the_attention_pools_width_not_the_stems():
    # The attention pool runs at width * 32 channels: 32 heads of 16 channels for a stem 16 wide
    assert VisionConfig(**{**RESNET, "heads": 32}).heads == 32


@pytest.mark.parametrize("setting", ["patch_size", "mlp_ratio"])
def test_resnets_that_differ_only_in_a_vit_setting_are_the_same_model(setting):
    from clip.architectures import architecture_differences

    theirs = ModelConfig(vision=VisionConfig(**RESNET)).to_dict()
    ours = ModelConfig(vision=VisionConfig(**RESNET, **{setting: 2})).to_dict()
    assert architecture_differences(theirs, ours) == []
    # a ViT reads them: the same difference between two ViTs is named
    vit_theirs = ModelConfig().to_dict()
    vit_ours = ModelConfig(vision=VisionConfig(**{setting: 2})).to_dict()
    assert [key for key, _, _ in architecture_differences(vit_theirs, vit_ours)] == [f"vision.{setting}"]


def test_a_model_dict_without_an_activation_reads_as_openais_quick_gelu():
    # from_dict reads a missing key as the default, QuickGELU: not GELU, another function for the same weights
    data = RELEASED_ARCHITECTURES["RN50"].to_dict()
    del data["activation"]
    assert ModelConfig.from_dict(data) == RELEASED_ARCHITECTURES["RN50"]


def test_text_config_refuses_a_width_its_heads_do_not_divide():
    from clip.architectures import TextConfig

    with pytest.raises(ValueError, match=re.escape("text.width=48 is not divisible by text.heads=5")):
        TextConfig(width=48, heads=5)


# ---- range checks: a value that cannot work is a ConfigError naming its dotted key ----------------------

@pytest.mark.parametrize(
    "overrides, message",
    [
        (["logging.every_n_steps=0"], "logging.every_n_steps must be >= 1, got 0"),
        # Ids of the BPE tokenizer past the embedding table: an IndexError in the first step, before
        (["model.text.vocab_size=1000"], "model.text.vocab_size must be >= 49408 (the BPE tokenizer's ids go up to"),
        # The synthetic renderer's minimum: a traceback from inside the data loader, before
        (["model.vision.image_size=12", "model.vision.patch_size=4"],
         "data.sources.0.synthetic_image_size must be set to 16 or more for model.vision.image_size=12"),
        (["train.accumulation_steps=0"], "train.accumulation_steps must be >= 1"),
        (["train.batch_size=0"], "train.batch_size must be >= 1, got 0"),
        (["train.batch_size=10", "train.accumulation_steps=4"],
         "train.batch_size must be divisible by accumulation_steps"),
        (["train.max_consecutive_nonfinite=0"], "train.max_consecutive_nonfinite must be >= 1, got 0"),
        (["train.threads=0"], "train.threads must be in [1, 2147483647]"),
        # torch.set_num_threads's limit: "ValueError: Overflow when unpacking long" as the run started
        (["train.threads=2147483648"], "train.threads must be in [1, 2147483647], or \"none\" for the default"),
        (["loss.max_logit_scale=0"], "loss.max_logit_scale must be >= 1"),
        (["loss.max_logit_scale=0.5"], "loss.max_logit_scale must be >= 1"),
        (["loss.max_logit_scale=nan"], "loss.max_logit_scale must be >= 1"),
        (["loss.chunk_size=0"], "loss.chunk_size must be >= 1"),
        (["loss.kind=siglip", "loss.chunk_size=64"], "loss.chunk_size applies to the CLIP loss only"),
        (["schedule.steps=0"], "schedule.steps must be >= 1, got 0"),
        (["schedule.steps=-1"], "schedule.steps must be >= 1, got -1"),
        (["schedule.warmup_steps=-1"], "schedule.warmup_steps must be >= 0"),
        (["schedule.min_lr_ratio=2"], "schedule.min_lr_ratio must be in [0, 1], got 2.0"),
        (["schedule.min_lr_ratio=-0.1"], "schedule.min_lr_ratio must be in [0, 1]"),
        (["schedule.kind=linear"], "schedule.kind"),
        (["train.lock_image_unlocked_layers=1"], "train.lock_image_unlocked_layers applies to a locked tower only"),
        (["train.lock_text=true", "train.lock_text_unlocked_layers=-1"], "train.lock_text_unlocked_layers must be >= 0"),
        (["train.lock_text=true", "train.lock_text_unlocked_layers=13"],
         "train.lock_text_unlocked_layers must be at most the text tower's 12 layers, got 13"),
        (["model.vision.kind=resnet", "model.vision.layers=[1,1,1,1]", "train.lock_image=true",
          "train.lock_image_unlocked_layers=5"], "train.lock_image_unlocked_layers must be at most the image tower's 4 stages"),
        (["train.lock_image=true", "train.lock_text=true"], "train.lock_text cannot be true with lock_image"),
        (["schedule.cooldown_steps=10"], 'schedule.cooldown_steps is used only with kind = "constant_cooldown"'),
        (["schedule.kind=constant_cooldown"], "schedule.cooldown_steps must be in [1, steps - warmup_steps = "),
        (["schedule.kind=constant_cooldown", "schedule.steps=100", "schedule.warmup_steps=10",
          "schedule.cooldown_steps=91"], "schedule.cooldown_steps must be in [1, steps - warmup_steps = 90]"),
        (["schedule.kind=constant_cooldown", "schedule.steps=3", "schedule.warmup_steps=5", "schedule.cooldown_steps=1"],
         'schedule.warmup_steps (5) leaves none of the run\'s 3 steps for the cooldown of kind = "constant_cooldown"'),
        (["schedule.kind=constant", "schedule.min_lr_ratio=0.1"], 'schedule.min_lr_ratio is not used with kind = "constant"'),
        (["train.device=gpu"], "train.device must be \"auto\" or a torch device such as \"cpu\", \"cuda\" or \"cuda:1\", got 'gpu'"),
        (["train.device=cuda:x"], "train.device must be \"auto\" or a torch device"),
        (["checkpoint.every_n_steps=-1"], "checkpoint.every_n_steps must be >= 0"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last must be >= 1, got 0"),
        (["optimizer.lr=0"], "optimizer.lr must be a finite number > 0, got 0.0"),
        (["optimizer.lr=-1e-3"], "optimizer.lr must be a finite number > 0"),
        (["optimizer.lr=nan"], "optimizer.lr must be a finite number > 0"),
        (["optimizer.lr=inf"], "optimizer.lr must be a finite number > 0"),
        (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay must be a finite number >= 0"),
        (["optimizer.beta1=1"], "optimizer.beta1 must be in [0, 1), got 1.0"),
        (["optimizer.beta2=-0.5"], "optimizer.beta2 must be in [0, 1)"),
        (["optimizer.eps=0"], "optimizer.eps must be a finite number > 0"),
        (["optimizer.grad_clip_norm=0"], "optimizer.grad_clip_norm must be a finite number > 0"),
        (["optimizer.grad_clip_norm=-1"], "optimizer.grad_clip_norm must be a finite number > 0"),
        (["data.workers=-1"], "data.workers must be in [0, 1024]"),
        (["data.workers=100000"], "data.workers must be in [0, 1024]"),  # a slip of the keyboard
        (["data.prefetch_factor=0"], "data.prefetch_factor must be in [1, 1024]"),
        (["data.prefetch_factor=100000000"], "data.prefetch_factor must be in [1, 1024]"),  # 22 GB before step 1
        (["eval.workers=5000"], "eval.workers must be in [0, 1024]"),
        (["data.shuffle_buffer=0"], "data.shuffle_buffer must be >= 1"),
        (["data.resampled=true", "data.epoch_samples=0"], "data.epoch_samples must be >= 1"),
        (["data.max_image_pixels=0"], "data.max_image_pixels must be >= 1"),
        (["data.log_every_s=-1"], "data.log_every_s must be a finite number >= 0"),
        (["data.worker_timeout_s=inf"], "data.worker_timeout_s must be a finite number >= 0"),
        # a month: the loader's poll() takes at most 2**31 - 1 ms, and the run failed at its first batch
        (["data.worker_timeout_s=2592000"],
         "data.worker_timeout_s must be a finite number >= 0 and at most 2147483.647 (about 24.8 days; 0 = no limit)"),
        (["data.sources=[]"], "data.sources is empty: add at least one [[data.sources]] table"),
        (["data.sources.0.weight=0"], "data.sources[0].weight must be a finite number > 0, got 0.0"),
        (["data.sources.0.weight=inf"], "data.sources[0].weight must be a finite number > 0"),
        (["data.sources.0.num_samples=0"], "data.sources[0].num_samples must be >= 1"),
        (["data.sources.0.synthetic_image_size=8"], "data.sources[0].synthetic_image_size must be >= 16"),
        (["data.sources.0.synthetic_seed=-1"], "data.sources[0].synthetic_seed must be >= 0"),
        (["data.log_every_s=inf"], "data.log_every_s must be a finite number >= 0, got inf"),
        (["data.sources.0.weight=nan"], "data.sources[0].weight must be a finite number > 0, got nan"),
        (["data.sources.0.synthetic_image_size=15"], "data.sources[0].synthetic_image_size must be >= 16"),
        (["data.sources.0.kind=manifest"], "data.sources[0].path must be set for a manifest source"),
        (["data.sources.0.kind=manifest", "data.sources.0.path=a.csv", "data.sources.0.num_samples=5"],
         "data.sources[0].num_samples is for synthetic and shard sources; a manifest's rows are its samples"),
    ],
)
def test_values_out_of_range_are_config_errors_naming_the_key(overrides, message):
    from clip.config import TrainConfig

    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides, TrainConfig)
    assert str(caught.value).startswith(message), str(caught.value)


def test_the_longest_worker_timeout_allowed_is_one_the_loaders_wait_takes():
    # The DataLoader waits on its workers' queue through multiprocessing's poll, with this timeout
    import multiprocessing

    from clip.data.config import MAX_WORKER_TIMEOUT_S, DataConfig

    assert DataConfig(worker_timeout_s=MAX_WORKER_TIMEOUT_S).worker_timeout_s == MAX_WORKER_TIMEOUT_S
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader, writer:
        writer.send("batch")
        assert reader.poll(MAX_WORKER_TIMEOUT_S)


def test_a_source_table_without_a_kind_is_synthetic(tmp_path):
    from clip.config import TrainConfig

    source = load_config(write(tmp_path, "[[data.sources]]\nnum_samples = 5\n"), [], TrainConfig).data.sources[0]
    assert (source.kind, source.num_samples) == ("synthetic", 5)


def test_the_demos_source_turned_into_a_manifest_says_how_to_unset_its_sample_count():
    # The demo's synthetic source sets num_samples; `data.sources.0.kind=manifest` on it (the README's override for
    # your own pairs) was refused for a num_samples the user never wrote, without the way to clear it
    from clip.config import TrainConfig

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(demo, ["data.sources.0.kind=manifest", "data.sources.0.path=pairs.csv"], TrainConfig)
    assert 'set it to "none"' in str(caught.value), str(caught.value)
    fixed = load_config(demo, ["data.sources.0.kind=manifest", "data.sources.0.path=pairs.csv",
                               "data.sources.0.num_samples=none"], TrainConfig)
    assert fixed.data.sources[0].num_samples is None


def test_boundary_values_that_mean_something_are_accepted():
    from clip.config import TrainConfig

    config = load_config(None, [
        "checkpoint.every_n_steps=0",  # only at the end of the run
        "schedule.warmup_steps=0", "schedule.min_lr_ratio=1", "schedule.steps=1",
        "optimizer.beta1=0", "optimizer.weight_decay=0",
        "loss.max_logit_scale=1", "loss.chunk_size=1",
        "train.batch_size=1", "train.max_consecutive_nonfinite=1",
        "data.workers=0", "data.log_every_s=0", "data.worker_timeout_s=0",
        "data.sources.0.synthetic_image_size=16",
    ], TrainConfig)
    assert config.checkpoint.every_n_steps == 0 and config.schedule.min_lr_ratio == 1.0
    for device in ("auto", "cpu", "cuda", "cuda:1"):  # checked as names only: the machine need not have them
        assert load_config(None, [f"train.device={device}"], TrainConfig).train.device == device
    # No upper limit on the temperature: log(inf) is inf, a valid clamp bound.
    assert load_config(None, ["loss.max_logit_scale=inf"], TrainConfig).loss.max_logit_scale == float("inf")


def test_an_override_makes_the_default_source_a_manifest_without_a_synthetic_sample_count(tmp_path):
    from clip.config import TrainConfig
    from clip.data.config import DEFAULT_SYNTHETIC_SAMPLES
    from clip.data.sources import SyntheticSource

    source = load_config(None, ["data.sources.0.kind=manifest", "data.sources.0.path=x.csv"], TrainConfig).data.sources[0]
    assert (source.kind, source.path, source.num_samples) == ("manifest", "x.csv", None)
    default = load_config(None, [], TrainConfig).data.sources[0]
    assert SyntheticSource("demo", default, image_size=32).num_samples == DEFAULT_SYNTHETIC_SAMPLES


def test_sections_built_in_python_raise_config_errors_too():
    from clip.config import CheckpointConfig, OptimizerConfig, ScheduleConfig
    from clip.data import DataConfig, SourceConfig

    with pytest.raises(ConfigError, match=r"^lr must be a finite number > 0, got 0\.0$"):
        OptimizerConfig(lr=0.0)
    with pytest.raises(ConfigError, match="min_lr_ratio must be in"):
        ScheduleConfig(min_lr_ratio=1.5)
    with pytest.raises(ConfigError, match="keep_last must be >= 1"):
        CheckpointConfig(keep_last=0)
    with pytest.raises(ConfigError, match="weight must be a finite number > 0"):
        SourceConfig(kind="synthetic", num_samples=10, weight=0.0)
    with pytest.raises(ConfigError, match=r"workers must be in \[0, 1024\]"):
        DataConfig(workers=-1)
    assert isinstance(ConfigError("x"), ValueError)  # callers catching ValueError still see them


def test_paths_in_a_config_built_in_python_are_taken_as_their_text(tmp_path):
    # A notebook passes pathlib.Paths, as it does to clip.load: the checks failed on them with
    # AttributeError: 'PosixPath' object has no attribute 'strip' (or 'split'), and TOML cannot record them
    from clip.config import TrainConfig, TrainLoopConfig
    from clip.data import DataConfig, SourceConfig

    config = TrainConfig(
        output_dir=Path("~") / "runs" / "tuned",
        train=TrainLoopConfig(init_weights=tmp_path / "released.pt"),
        data=DataConfig(sources=[SourceConfig(kind="manifest", path=tmp_path / "train.csv")]),
    )
    assert config.output_dir == str(Path.home() / "runs" / "tuned")
    assert config.train.init_weights == str(tmp_path / "released.pt")
    assert config.data.sources[0].path == str(tmp_path / "train.csv")
    assert from_dict(TrainConfig, tomllib.loads(to_toml(to_dict(config)))) == config
    with pytest.raises(ConfigError, match="init_weights must be a released name"):
        TrainLoopConfig(init_weights="")  # a Path cannot be empty ("." is the current folder), a str still can


# ---- configs built in Python: the file's type checks, in its words -------------------------------------

def _section(schema: type):
    from clip.architectures import TextConfig
    from clip.config import (
        CheckpointConfig,
        DataConfig,
        EvalConfig,
        LoggingConfig,
        LossConfig,
        OptimizerConfig,
        ScheduleConfig,
        TrainLoopConfig,
    )

    return {TrainLoopConfig: "train", OptimizerConfig: "optimizer", ScheduleConfig: "schedule", LossConfig: "loss",
            DataConfig: "data", EvalConfig: "eval", LoggingConfig: "logging", CheckpointConfig: "checkpoint",
            TextConfig: "model.text"}[schema]


@pytest.mark.parametrize("schema_name, key, value", [
    ("TrainLoopConfig", "batch_size", "32"),  # failed in a range check: '>=' not supported between 'str' and 'int'
    ("TrainLoopConfig", "batch_size", 32.0),  # these went through, to fail or do something else later
    ("TrainLoopConfig", "accumulation_steps", True),
    ("TrainLoopConfig", "compile", 1),
    ("TrainLoopConfig", "precision", "amp_bf16"),  # a schema's hint too
    ("TrainLoopConfig", "init_weights", 3),
    ("OptimizerConfig", "lr", "1e-4"),
    ("ScheduleConfig", "steps", 100.5),
    ("LossConfig", "kind", "sigmoid"),
    ("DataConfig", "workers", "2"),
    ("EvalConfig", "batch_size", 2.5),
    ("LoggingConfig", "wandb", "yes"),
    ("CheckpointConfig", "keep_last", None),
    ("TextConfig", "width", "512"),
])
def test_a_config_built_in_python_refuses_a_wrong_type_as_a_file_does(schema_name, key, value):
    import dataclasses

    import clip.architectures
    import clip.config
    from clip.config import TrainConfig

    schema = getattr(clip.config, schema_name, None) or getattr(clip.architectures, schema_name)
    section = _section(schema)
    data: dict = {key: value}
    for part in reversed(section.split(".")):
        data = {part: data}
    with pytest.raises(ConfigError) as from_file:
        from_dict(TrainConfig, data)
    with pytest.raises(ConfigError) as built:
        schema(**{key: value})
    # The same words, the field named within its dataclass (as a range check names it when built in Python)
    assert f"{section}.{built.value}" == str(from_file.value)
    with pytest.raises(ConfigError) as replaced:
        dataclasses.replace(schema(), **{key: value})
    assert str(replaced.value) == str(built.value)


def test_a_table_given_as_a_dict_in_python_is_read_as_a_file_reads_it():
    # TrainConfig(model={...}) failed with AttributeError: 'dict' object has no attribute 'text'
    from clip.config import TrainConfig
    from clip.data import DataConfig

    model = RELEASED_ARCHITECTURES["RN50"].to_dict()
    assert TrainConfig(model=model) == from_dict(TrainConfig, {"model": model})
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.name'"):
        TrainConfig(model={"name": "ViT-B/32"})
    with pytest.raises(ConfigError, match=r"^model: expected a table of ModelConfig fields, got 'ViT-B/32' \(a name "
                                          r"is not an architecture here"):
        TrainConfig(model="ViT-B/32")
    # a list of [[data.sources]] tables: the elements were left dicts, to fail in the loader
    data = DataConfig(sources=[{"kind": "manifest", "path": "pairs.csv"}])
    assert data == from_dict(DataConfig, {"sources": [{"kind": "manifest", "path": "pairs.csv"}]})
    with pytest.raises(ConfigError, match=r"^sources\[0\]\.weight: expected a number, got '2'"):
        DataConfig(sources=[{"kind": "synthetic", "weight": "2"}])


def test_a_valid_config_built_in_python_keeps_its_values():
    import numpy as np

    from clip.config import OptimizerConfig, TrainConfig, TrainLoopConfig
    from clip.config_io import rechecked
    from clip.data import DataConfig, SourceConfig

    for recipe in sorted((Path(__file__).parent.parent / "configs").glob("*.toml")):
        config = load_config(recipe, [], TrainConfig)
        assert rechecked(config) == config and to_dict(rechecked(config)) == to_dict(config), recipe.name
    sources = [SourceConfig(kind="synthetic", num_samples=8)]
    assert DataConfig(sources=sources).sources is sources  # a value of its type is kept, the same object
    # Taken as a file gives them: a notebook's numpy integer as an int, an int for a float as a float
    loop = TrainLoopConfig(batch_size=np.int64(32), seed=np.int32(3))
    assert (loop.batch_size, loop.seed) == (32, 3) and type(loop.batch_size) is int and type(loop.seed) is int
    optimizer = OptimizerConfig(lr=1, beta2=np.float32(0.5))
    assert optimizer.lr == 1.0 and type(optimizer.lr) is float and type(optimizer.beta2) is float
    assert VisionConfig(kind="resnet", image_size=64, width=8, layers=[1, 1, 1, 1], heads=2).layers == (1, 1, 1, 1)
    # Within a tuple too: equal to the tuple of ints it becomes, it was kept with its numpy integers, and the
    # config could not be written as TOML ("cannot write np.int64(1) to TOML")
    vision = VisionConfig(kind="resnet", image_size=64, width=8, layers=tuple(np.array([1, 1, 1, 1])), heads=2)
    assert [type(depth) for depth in vision.layers] == [int] * 4
    assert "layers = [1, 1, 1, 1]" in to_toml(to_dict(ModelConfig(vision=vision)))
    # numpy's bool as a bool (it is no numbers.Integral, and was refused); an int field still refuses it
    loop = TrainLoopConfig(lock_image=np.array([1, 0]).any(), grad_checkpointing=np.False_)
    assert (loop.lock_image, loop.grad_checkpointing) == (True, False) and type(loop.lock_image) is bool
    with pytest.raises(ConfigError, match=r"^batch_size: expected an integer"):
        TrainLoopConfig(batch_size=np.True_)


def test_rechecked_names_the_dotted_key_of_a_value_set_after_the_config_was_built(tmp_path):
    # Assignment after construction runs no check: train() and the evaluation entry points check the whole
    # config again with rechecked, whose errors name the key as a file's do
    from clip.config import TrainConfig
    from clip.config_io import rechecked

    config = TrainConfig()
    config.train.batch_size = "8"
    with pytest.raises(ConfigError, match=r"^train\.batch_size: expected an integer, got '8'$"):
        rechecked(config)
    config = TrainConfig()
    config.data.sources[0].weight = 0.0
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.weight must be a finite number > 0, got 0\.0$"):
        rechecked(config)
    config = TrainConfig()
    config.train.patch_dropout = 0.5
    config.train.lock_image = True  # each value fits; together they are refused, as in a file
    with pytest.raises(ConfigError, match=r"^train\.patch_dropout has no effect on a locked image tower"):
        rechecked(config)
    config = TrainConfig()
    config.train.init_weights = tmp_path / "released.pt"
    config.output_dir = Path("~") / "runs" / "x"
    checked = rechecked(config)
    assert checked.train.init_weights == str(tmp_path / "released.pt")
    assert checked.output_dir == str(Path.home() / "runs" / "x")
    assert config.train.init_weights == tmp_path / "released.pt"  # the caller's config is left as it was


def test_evaluation_dataset_paths_in_a_config_built_in_python_are_taken_as_their_text(tmp_path):
    # As for output_dir and a source's paths: an evaluation dataset's root, class-name and template files, and
    # a retrieval dataset's annotations and image folder failed as AttributeError: 'PosixPath' object has no
    # attribute 'split'
    from clip.config import TrainConfig
    from clip.evaluation.config import EvalConfig, RetrievalDatasetConfig, ZeroShotDatasetConfig

    zeroshot = ZeroShotDatasetConfig(kind="imagefolder", root=tmp_path / "val", classnames_file=tmp_path / "names.txt",
                                     templates_file=Path("~") / "templates.txt")
    retrieval = RetrievalDatasetConfig(annotations=tmp_path / "captions.json", image_root=tmp_path / "images")
    assert (zeroshot.root, zeroshot.classnames_file, zeroshot.templates_file) == (
        str(tmp_path / "val"), str(tmp_path / "names.txt"), str(Path.home() / "templates.txt"))
    assert (retrieval.annotations, retrieval.image_root) == (str(tmp_path / "captions.json"), str(tmp_path / "images"))
    config = TrainConfig(output_dir=str(tmp_path), eval=EvalConfig(zeroshot=[zeroshot], retrieval=[retrieval]))
    assert from_dict(TrainConfig, tomllib.loads(to_toml(to_dict(config)))) == config


def test_epoch_samples_without_resampled_is_an_error():
    from clip.config import TrainConfig

    # The loader sizes only resampled epochs with it; an exact epoch would ignore it without a word.
    with pytest.raises(ConfigError, match=r"data\.epoch_samples applies only with resampled = true"):
        load_config(None, ["data.epoch_samples=1000"], TrainConfig)
    config = load_config(None, ["data.epoch_samples=1000", "data.resampled=true"], TrainConfig)
    assert config.data.epoch_samples == 1000
    assert load_config(None, ["data.epoch_samples=none"], TrainConfig).data.epoch_samples is None


# ---- None: the string "none" in files and overrides, and written back by to_toml -------------------------

def test_none_sentinel_in_files_and_overrides(tmp_path):
    from clip.config import TrainConfig

    path = write(tmp_path, '[optimizer]\ngrad_clip_norm = "none"\n[data]\nmax_image_pixels = "None"\n')
    config = load_config(path, [], TrainConfig)
    assert config.optimizer.grad_clip_norm is None and config.data.max_image_pixels is None
    for text in ("none", "NONE", '"none"', "None"):
        config = load_config(None, [f"optimizer.grad_clip_norm={text}"], TrainConfig)
        assert config.optimizer.grad_clip_norm is None, text
    assert load_config(None, ["section.clip_norm=none"], Schema).section.clip_norm is None


def test_none_sentinel_only_where_the_type_allows_none(tmp_path):
    from clip.config import TrainConfig

    with pytest.raises(ConfigError, match="optimizer.lr: expected a number, got 'none'"):
        load_config(None, ["optimizer.lr=none"], TrainConfig)
    # A Literal that has "none" among its choices keeps the string.
    path = write(tmp_path, '[[data.sources]]\nkind = "manifest"\npath = "x.csv"\nnum_samples = "none"\n')
    source = load_config(path, ["data.sources.0.quoting=none"], TrainConfig).data.sources[0]
    assert source.quoting == "none" and source.num_samples is None
    with pytest.raises(ConfigError, match=r'is not a float or "none"'):
        load_config(None, ["optimizer.grad_clip_norm=off"], TrainConfig)


def test_none_round_trips_through_the_written_config(tmp_path):
    from clip.config import TrainConfig

    config = load_config(None, ["optimizer.grad_clip_norm=none", "data.max_image_pixels=none", "train.threads=3",
                                "loss.chunk_size=256"], TrainConfig)
    text = to_toml(to_dict(config))
    assert 'grad_clip_norm = "none"' in text and 'max_image_pixels = "none"' in text
    path = write(tmp_path, text)
    assert load_config(path, [], TrainConfig) == config
    # The defaults too: fields whose default is None (train.threads, data.epoch_samples) come back as None.
    default = TrainConfig()
    assert load_config(write(tmp_path, to_toml(to_dict(default))), [], TrainConfig) == default


# ---- overrides of list elements -----------------------------------------------------------------------------

def test_index_override_changes_the_default_list_when_the_file_has_none(tmp_path):
    from clip.config import TrainConfig
    from clip.data import DataConfig, SourceConfig

    path = write(tmp_path, "[data]\nworkers = 0\n")  # no [[data.sources]]: the default list applies
    config = load_config(path, ["data.sources.0.num_samples=500"], TrainConfig)
    default_source = DataConfig().sources[0]
    assert config.data.sources == [SourceConfig(kind=default_source.kind, num_samples=500)]
    assert load_config(path, [], TrainConfig).data.sources == [default_source]  # defaults untouched


def test_index_override_beyond_the_list_says_what_to_do(tmp_path):
    from clip.config import TrainConfig

    no_sources = write(tmp_path, "[data]\nworkers = 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(no_sources, ["data.sources.1.num_samples=500"], TrainConfig)
    message = str(caught.value)
    assert "data.sources has 1 entry by default (the config file has no [[data.sources]] table), no index 1" in message
    assert "add a [[data.sources]] table to the config file" in message
    with pytest.raises(ConfigError, match=r"eval\.zeroshot has 0 entries by default .*no index 0"):
        load_config(no_sources, ["eval.zeroshot.0.num_samples=10"], TrainConfig)
    two = write(tmp_path, '[[data.sources]]\nnum_samples = 5\n[[data.sources]]\nnum_samples = 6\n')
    with pytest.raises(ConfigError, match=r"data\.sources has 2 entries in the config file, no index 2"):
        load_config(two, ["data.sources.2.weight=2"], TrainConfig)
    with pytest.raises(ConfigError, match=r"must name a field of the element: data\.sources\.0\.<field>=value"):
        load_config(two, ["data.sources.0=5"], TrainConfig)
    not_a_list = write(tmp_path, '[data]\nsources = "foo"\n')
    with pytest.raises(ConfigError, match=r"data\.sources is not an array of tables"):
        load_config(not_a_list, ["data.sources.0.weight=2"], TrainConfig)
    # an element that is no table (in the file or from an earlier override) was a TypeError's traceback
    not_tables = write(tmp_path, "[data]\nsources = [1]\n")
    with pytest.raises(ConfigError, match=r"data\.sources\.0 is 1, not a table of SourceConfig fields"):
        load_config(not_tables, ["data.sources.0.weight=2"], TrainConfig)
    with pytest.raises(ConfigError, match=r"data\.sources\.0 is 'x', not a table of SourceConfig fields"):
        load_config(not_tables, ["data.sources=['x']", "data.sources.0.weight=2"], TrainConfig)


def test_index_override_of_a_list_an_earlier_override_set_names_that_override(tmp_path):
    # The file was blamed: "data.sources has 0 entries in the config file" after 'data.sources=[]'
    from clip.config import TrainConfig

    with_sources = write(tmp_path, "[[data.sources]]\nnum_samples = 5\n")
    for emptied in ["data.sources=[]", "data={sources=[]}"]:
        with pytest.raises(ConfigError) as caught:
            load_config(with_sources, [emptied, "data.sources.0.weight=2.0"], TrainConfig)
        assert str(caught.value) == (
            f"override 'data.sources.0.weight=2.0': data.sources has 0 entries as the earlier override {emptied!r} set "
            "it, no index 0. An override changes an existing element only; to add one, write it into the list that "
            "override sets"
        )
    with pytest.raises(ConfigError, match=re.escape(
        "override 'data.sources.0.weight=2.0': data.sources is not an array of tables ([[data.sources]]): the earlier "
        "override 'data.sources=5' set it to 5"
    )):
        load_config(with_sources, ["data.sources=5", "data.sources.0.weight=2.0"], TrainConfig)
    # The latest override that set the list is the one named; one that merged other keys of [data] is not
    with pytest.raises(ConfigError, match=r"has 1 entry as the earlier override 'data\.sources=\[\{\}\]' set it"):
        load_config(with_sources, ["data.sources=[]", "data.sources=[{}]", "data={workers=0}",
                                   "data.sources.1.weight=2.0"], TrainConfig)
    with pytest.raises(ConfigError, match=r"has 1 entry as the earlier override 'data=\{sources=\[\{\}\]\}' set it"):
        load_config(with_sources, ["data.sources=[]", "data=5", "data={sources=[{}]}", "data.sources.1.weight=2.0"],
                    TrainConfig)
    with pytest.raises(ConfigError, match=r"data\.sources has 1 entry in the config file, no index 1"):
        load_config(with_sources, ["data={workers=0}", "data.sources.0.weight=2.0", "data.sources.1.weight=2.0"],
                    TrainConfig)
    # A default list an earlier index override changed is still the default, not the file's
    no_sources = write(tmp_path, "[data]\nworkers = 0\n")
    with pytest.raises(ConfigError, match=r"data\.sources has 1 entry by default \(the config file has no "):
        load_config(no_sources, ["data.sources.0.weight=2.0", "data.sources.1.weight=2.0"], TrainConfig)


@pytest.mark.parametrize("override, message", [
    ("model.vision.heads=0", "vision.heads must be > 0, got 0"),
    ("model.text.layers=0", "text.layers must be > 0, got 0"),
    ("model.embed_dim=-1", "embed_dim must be > 0, got -1"),
    ("model.text.context_length=1", "context_length must hold the start and end tokens"),
    # inf was accepted, then failed building the model with OverflowError
    ("model.vision.mlp_ratio=inf", "vision.mlp_ratio must be a finite number > 0, got inf"),
    ("model.text.mlp_ratio=inf", "text.mlp_ratio must be a finite number > 0, got inf"),
    # Finite ratios whose MLP width is not: 1e308 x 128 overflowed to inf (OverflowError building the model),
    # and 1e-9 x 128 gave an MLP of 0 units, which trained without a word
    ("model.vision.mlp_ratio=1e308", "vision.mlp_ratio must be such that width x mlp_ratio gives at least 1"),
    ("model.text.mlp_ratio=1e308", "text.mlp_ratio must be such that width x mlp_ratio gives at least 1"),
    ("model.vision.mlp_ratio=1e-9", "vision.mlp_ratio must be such that width x mlp_ratio gives at least 1"),
    ("model.text.mlp_ratio=0.005", "text.mlp_ratio must be such that width x mlp_ratio gives at least 1 and fewer "
                                   "than 2**63 MLP units (width = 128), got 0.005"),
])
def test_model_sizes_out_of_range_are_config_errors(override, message):
    # Before: heads=0 raised ZeroDivisionError from inside the config's own checks.
    from clip.config import TrainConfig, load_config

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(demo, [override], TrainConfig)


def test_a_value_of_neither_type_of_a_union_names_both_in_plain_words():
    from clip.config import TrainConfig, load_config

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    with pytest.raises(ConfigError, match=re.escape("model.vision.layers: '1,1,1,1' is not an int or list of int "
                                                    "(written [a, b, ...])")):
        load_config(demo, ["model.vision.layers=1,1,1,1"], TrainConfig)


def test_an_unknown_key_inside_a_list_element_is_named_with_its_whole_path():
    from clip.config import TrainConfig, load_config

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'data.sources.0.wieght'")) as raised:
        load_config(demo, ["data.sources.0.wieght=2"], TrainConfig)
    assert "Did you mean 'data.sources.0.weight'?" in str(raised.value)
    # Judged by the key's last part among its siblings: the whole dotted names share their prefix, so any
    # sibling looked close ('data.sources.0.file' got 'data.sources.0.name'; 'eval.retrieval.0.path' got 'split')
    with pytest.raises(ConfigError) as raised:
        load_config(demo, ["data.sources.0.file=x"], TrainConfig)
    assert str(raised.value).endswith("Valid keys in data.sources.0: caption_column, image_column, kind, name, "
                                      "num_samples, path, quoting, separator, size_index, synthetic_image_size, "
                                      "synthetic_seed, weight.")


def test_a_synthetic_source_refuses_a_path_it_would_ignore():
    from clip.config import TrainConfig, load_config

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    with pytest.raises(ConfigError, match="is not read by a synthetic source"):
        load_config(demo, ["data.sources.0.path=/data/train.tsv"], TrainConfig)


def test_augment_takes_true_false_or_a_crop_name() -> None:
    from clip.config import TrainConfig

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    crops = {
        value: load_config(demo, [f"data.augment={value}"], TrainConfig).data.crop
        for value in ("false", "true", "random_square_crop", "random_resized_crop")
    }
    assert crops == {"false": "center", "true": "random_resized", "random_square_crop": "random_square",
                     "random_resized_crop": "random_resized"}
    # true is stored by the crop's name: config.toml and resume comparisons see one spelling
    assert load_config(demo, ["data.augment=true"], TrainConfig).data.augment == "random_resized_crop"
    with pytest.raises(ConfigError, match="data.augment: 'random_crop' is not a bool or one of 'random_square_crop', "):
        load_config(demo, ["data.augment=random_crop"], TrainConfig)
    from clip.data import DataConfig, SourceConfig

    for wrong in (0, 1, None, "center", "random_square"):  # built in Python: the file's type check, its words
        with pytest.raises(ConfigError, match="^augment: .* is not a bool or one of 'random_square_crop', "):
            DataConfig(sources=[SourceConfig(kind="synthetic", num_samples=8)], augment=wrong)


def test_differences_name_the_element_of_an_array_of_tables_that_changed():
    from clip.config_io import differences

    before = {"data": {"sources": [{"path": "a.tar", "weight": 1.0}, {"path": "b.csv", "weight": 1.0}]}, "x": [1, 2]}
    after = {"data": {"sources": [{"path": "a.tar", "weight": 1.0}, {"path": "b.csv", "weight": 2.0}]}, "x": [1, 3]}
    assert differences(before, after) == [("data.sources.1.weight", 1.0, 2.0), ("x", [1, 2], [1, 3])]
    fewer = {"data": {"sources": before["data"]["sources"][:1]}, "x": [1, 2]}
    assert differences(before, fewer) == [("data.sources", before["data"]["sources"], fewer["data"]["sources"])]
    # a list that holds a table among other values is compared whole, as a value
    assert differences({"x": [{"a": 1}, 2]}, {"x": [{"a": 1}, 3]}) == [("x", [{"a": 1}, 2], [{"a": 1}, 3])]


def test_a_checkpoint_with_the_default_synthetic_size_written_out_resumes_without_a_warning(caplog):
    import copy
    import logging
    from pathlib import Path

    from clip.config import TrainConfig, to_dict
    from clip.resume import check_resumable

    current = to_dict(TrainConfig())
    saved = copy.deepcopy(current)
    saved["data"]["sources"][0]["num_samples"] = 10_000  # as checkpoints before the default was left unset
    with caplog.at_level(logging.WARNING):
        check_resumable(saved, current, Path("runs/x"))
        assert caplog.text == ""
        saved["data"]["sources"][0]["num_samples"] = 20_000
        check_resumable(saved, current, Path("runs/x"))
    assert "data.sources.0.num_samples: 20000 -> 10000" in caplog.text



def test_a_checkpoint_with_the_test_split_written_out_resumes_without_a_warning(caplog):
    # Checkpoints before split's default became "" wrote "test": the same images for synthetic and CIFAR sets,
    # not for an image folder ("" its root, "test" its test/ subfolder)
    import copy
    import logging
    from pathlib import Path

    from clip.config import TrainConfig, load_config, to_dict
    from clip.resume import check_resumable

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    current = to_dict(load_config(demo, [], TrainConfig))
    assert current["eval"]["zeroshot"][0]["split"] == ""
    saved = copy.deepcopy(current)
    saved["eval"]["zeroshot"][0]["split"] = "test"
    with caplog.at_level(logging.WARNING):
        check_resumable(saved, current, Path("runs/x"))
        for kind in ("cifar10", "cifar100"):
            for config in (saved, current):
                config["eval"]["zeroshot"][0].update(kind=kind, root="/data/cifar")
            check_resumable(saved, current, Path("runs/x"))
        assert caplog.text == ""
        for config in (saved, current):
            config["eval"]["zeroshot"][0].update(kind="imagefolder", root="/data/pets")
        check_resumable(saved, current, Path("runs/x"))
    assert "eval.zeroshot.0.split: \"test\" -> \"\"" in caplog.text


def test_a_run_directory_moved_or_copied_resumes_without_a_warning(caplog):
    # output_dir is where the run is now, not a setting it continues under
    import logging
    from pathlib import Path

    from clip.config import TrainConfig, to_dict
    from clip.resume import check_resumable

    saved = to_dict(TrainConfig())
    with caplog.at_level(logging.WARNING):
        check_resumable({**saved, "output_dir": "/old/place/run"}, {**saved, "output_dir": "/new/place/run"},
                        Path("/new/place/run"))
        assert caplog.text == ""
        check_resumable(saved, {**saved, "train": {**saved["train"], "seed": 7}}, Path("runs/x"), warn=False)
        assert caplog.text == ""  # a rank other than 0: rank 0 says it
        check_resumable(saved, {**saved, "train": {**saved["train"], "seed": 7}}, Path("runs/x"))
    assert "train.seed: 0 -> 7" in caplog.text


def test_a_file_that_is_not_utf8_is_a_config_error_naming_the_byte(tmp_path):
    # read_text raised a bare UnicodeDecodeError
    path = tmp_path / "latin1.toml"
    path.write_bytes('[section]\nname = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml: not valid TOML: TOML files are UTF-8, but byte 21 \(line 2\) is 0xe9"):
        load_config(path, [], Schema)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf[section]\nsteps = 3\n")
    assert load_config(path, [], Schema).section.steps == 3


def test_a_directory_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, [], Schema)


def test_deeply_nested_values_are_config_errors_not_recursion_errors(tmp_path):
    nested = "[" * 5000 + "]" * 5000
    path = write(tmp_path, f"[section]\nbetas = {nested}\n")
    with pytest.raises(ConfigError, match="nest too deeply"):
        load_config(path, [], Schema)
    with pytest.raises(ConfigError, match=r"override value '\[\[\[.*\.\.\. \(10002 characters\) nests .* too deeply"):
        load_config(None, [f"section.betas={nested}"], Schema)


def test_an_integer_past_pythons_digit_limit_is_a_config_error(tmp_path):
    # tomllib's int() raised ValueError ("Exceeds the limit (4300 digits)", advising sys.set_int_max_str_digits)
    digits = "1" * 5000
    with pytest.raises(ConfigError, match=r"\.toml: holds an integer of more than \d+ digits"):
        load_config(write(tmp_path, f"[section]\nsteps = {digits}\n"), [], Schema)
    with pytest.raises(ConfigError, match=r"override value '1+\.\.\. \(5002 characters\) holds an integer of more"):
        load_config(None, [f"section.steps={digits}"], Schema)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("section.lr=" + "9" * 400, r"section\.lr: 9{60}\.\.\. \(400 characters\) is too large for a number"),
        ("section.steps=" + "9" * 25, r"section\.steps: 9{25} is too large \(integers must fit in 64 bits\)"),
        ("section.steps=-9223372036854775809", r"too large \(integers must fit in 64 bits\)"),
        ("section.steps=9223372036854775808", r"section\.steps: 9223372036854775808 is too large"),
    ],
    ids=["float", "int", "negative int", "one past int64"],
)
def test_numbers_beyond_64_bits_are_config_errors(override, message):
    # float(10**400) raised a bare OverflowError; 25-digit integers were accepted and failed later, deep in torch
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], Schema)
    assert load_config(None, ["section.steps=9223372036854775807"], Schema).section.steps == 2**63 - 1
    assert load_config(None, ["section.steps=-9223372036854775808"], Schema).section.steps == -(2**63)


def test_none_may_be_written_with_spaces_and_in_any_case():
    for written in ('"none"', '"None"', '" NONE "', '"none\\t"'):
        assert load_config(None, [f"section.clip_norm={written}"], Schema).section.clip_norm is None, written


def test_a_tuple_of_fixed_length_takes_each_position_in_its_own_type():
    from clip.config_io import _coerce

    assert _coerce([1, "a"], tuple[float, str], "pair") == (1.0, "a")
    with pytest.raises(ConfigError, match=r"pair: expected 2 values, got 3"):
        _coerce([1, "a", "b"], tuple[float, str], "pair")
    with pytest.raises(ConfigError, match=r"pair\[1\]: expected a string, got 2"):
        _coerce([1, 2], tuple[float, str], "pair")
    # named "list of T" only where every position is a T
    with pytest.raises(ConfigError, match=re.escape("pair: 'x' is not an int or list (written [a, b, ...])")):
        _coerce("x", int | tuple[float, str], "pair")
    with pytest.raises(ConfigError, match=re.escape("pair: 'x' is not an int or list of float (written")):
        _coerce("x", int | tuple[float, float], "pair")


def test_a_list_field_refuses_a_single_value(tmp_path):
    # a text is no list of its characters, nor a number a list of one
    with pytest.raises(ConfigError, match=re.escape("section.betas: expected a list, got 'ab'")):
        load_config(None, ["section.betas=ab"], Schema)
    with pytest.raises(ConfigError, match=re.escape("sources: expected a list, got 5")):
        load_config(write(tmp_path, "sources = 5\n"), [], Schema)


def test_true_is_no_number():
    # bool is an int in Python: lr = true read as 1.0
    with pytest.raises(ConfigError, match=r"section\.lr: expected a number, got True"):
        load_config(None, ["section.lr=true"], Schema)


def test_a_value_is_shown_whole_up_to_60_characters():
    from clip.config_io import short_repr

    assert short_repr("x" * 58) == repr("x" * 58)  # 60 characters with its quotes
    assert short_repr("x" * 59) == repr("x" * 59)[:60] + "... (61 characters)"


def test_the_schedule_kinds_give_the_rates_they_describe():
    from clip.config import ScheduleConfig
    from clip.optim import learning_rate

    def rates(**schedule):
        return [learning_rate(step, 2.0, ScheduleConfig(steps=10, warmup_steps=2, **schedule)) for step in range(12)]

    warmup = [1.0, 2.0]
    assert rates(kind="constant") == warmup + [2.0] * 10  # also past the end
    # held until the last 4 steps, each of them lower, in equal steps towards the floor (0.2 = 2.0 x 0.1),
    # which comes at `steps`
    cooldown = rates(kind="constant_cooldown", cooldown_steps=4, min_lr_ratio=0.1)
    assert cooldown == pytest.approx(warmup + [2.0] * 4 + [1.64, 1.28, 0.92, 0.56, 0.2, 0.2])
    assert rates(kind="constant_cooldown", cooldown_steps=1)[-3:] == pytest.approx([1.0, 0.0, 0.0])  # one step: half
    assert rates(kind="constant_cooldown", cooldown_steps=8)[2] < 2.0  # the whole run after warmup decays
    with pytest.raises(ConfigError, match="kind: 'constnat' is not one of 'cosine', 'constant', 'constant_cooldown'"):
        ScheduleConfig(kind="constnat")  # built in Python: the file's type check, in its words
    cosine = rates()  # the default: half-way through the decay (step 6 of 2..10) at half the peak
    assert cosine[:3] == warmup + [2.0] and cosine[6] == pytest.approx(1.0) and cosine[-1] == 0.0


def test_an_override_path_through_a_value_or_a_list_says_how_to_write_it():
    # Both said "Valid keys: ." (the keys of a section that is none)
    from clip.config import TrainConfig

    with pytest.raises(ConfigError, match=re.escape("train.batch_size is a value, not a section: write "
                                                    "train.batch_size=value")):
        load_config(None, ["train.batch_size.x=5"], TrainConfig)
    with pytest.raises(ConfigError, match=re.escape("data.sources is a list; name an element by its index from 0, "
                                                    "e.g. data.sources.0.kind=value")):
        load_config(None, ["data.sources.kind=manifest"], TrainConfig)
    with pytest.raises(ConfigError, match=re.escape("e.g. data.sources.0.<field>=value")):
        load_config(None, ["data.sources.-1.kind=manifest"], TrainConfig)
    # A digit that is no decimal one ("²", "①") passed the index check, and int() then raised a ValueError
    # out of clip-train as a traceback
    for index in ("\u00b2", "\u2460"):
        with pytest.raises(ConfigError, match="data.sources is a list; name an element by its index"):
            load_config(None, [f"data.sources.{index}.kind=manifest"], TrainConfig)


def test_an_inline_table_override_sets_the_keys_it_names_and_keeps_the_others():
    # It replaced the file's whole table: the demo's 32-pixel model became a 224-pixel ViT-B without a word
    from clip.config import TrainConfig

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    config = load_config(demo, ["model={vision = {patch_size = 4}}", "train={seed = 1}"], TrainConfig)
    assert (config.model.vision.image_size, config.model.vision.patch_size, config.model.embed_dim) == (32, 4, 128)
    assert (config.train.seed, config.train.batch_size) == (1, 128)
    assert load_config(None, ["train={seed = 1}"], TrainConfig).train.seed == 1  # a table the file lacks
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'train.sed'")):
        load_config(demo, ["train={sed = 1}"], TrainConfig)


def test_a_text_field_takes_an_override_as_written():
    # TOML reads 2024 as a number, 2024-01-01 as a date and true as a boolean, which the text field then refused
    from clip.config import TrainConfig

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    for text in ("2024", "2024-01-01", "true", "1e3", "nan"):
        assert load_config(demo, [f"output_dir={text}"], TrainConfig).output_dir == text
    assert load_config(demo, ["eval.zeroshot.0.name=10"], TrainConfig).eval.zeroshot[0].name == "10"
    assert load_config(demo, ["train.init_weights=42"], TrainConfig).train.init_weights == "42"  # str | None
    assert load_config(demo, ["train.init_weights=none"], TrainConfig).train.init_weights is None
    assert load_config(demo, ['output_dir="quoted"'], TrainConfig).output_dir == "quoted"
    with pytest.raises(ConfigError, match="train.batch_size: expected an integer"):  # other fields as before
        load_config(demo, ["train.batch_size=2024-01-01"], TrainConfig)


def test_an_empty_run_directory_or_init_weights_is_a_config_error_and_a_home_folder_is_expanded(monkeypatch):
    # output_dir="" trained in the current folder; init_weights="" read it as a run directory to start from;
    # "~/runs/x" in a file, which no shell expands, made a folder named "~" in the current one
    from clip.config import TrainConfig

    with pytest.raises(ConfigError, match=re.escape("output_dir must be a folder for the run, got ''")):
        load_config(None, ["output_dir="], TrainConfig)
    with pytest.raises(ConfigError, match=re.escape("train.init_weights must be a released name, a weights file or a "
                                                    "run directory, or \"none\" to start from scratch, got ' '")):
        load_config(None, ["train.init_weights=' '"], TrainConfig)
    monkeypatch.setenv("HOME", "/home/someone")
    assert load_config(None, ["output_dir=~/runs/x"], TrainConfig).output_dir == "/home/someone/runs/x"


def test_a_run_directory_with_a_nul_character_is_a_config_error(tmp_path):
    # TOML writes one as "\u0000"; the run failed making the folder, with ValueError: embedded null byte
    from clip.config import TrainConfig

    with pytest.raises(ConfigError, match=re.escape("output_dir must be a folder name without a NUL character, "
                                                    "got 'runs/a\\x00b'")):
        load_config(write(tmp_path, 'output_dir = "runs/a\\u0000b"\n'), [], TrainConfig)
    with pytest.raises(ConfigError, match="output_dir must be a folder name without a NUL character"):
        load_config(None, ['output_dir="x\\u0000"'], TrainConfig)



def test_data_and_evaluation_paths_in_a_config_file_read_a_leading_tilde_as_the_home_folder(monkeypatch):
    # No shell expands a TOML file's values: path = "~/data/train.tsv" was said not to exist
    from clip.config import TrainConfig
    from clip.evaluation.config import ZeroShotRunConfig

    monkeypatch.setenv("HOME", "/home/someone")
    config = load_config(None, ['data.sources=[{kind="shards", path="~/a/{0..3}.tar::~/b/{0..1}.tar", '
                                'size_index="~/a/sizes.json"}]',
                                'eval.retrieval=[{annotations="~/coco/karpathy.json", image_root="~/coco"}]'],
                         TrainConfig)
    assert config.data.sources[0].path == "/home/someone/a/{0..3}.tar::/home/someone/b/{0..1}.tar"
    assert config.data.sources[0].size_index == "/home/someone/a/sizes.json"
    retrieval = config.eval.retrieval[0]
    assert (retrieval.annotations, retrieval.image_root) == ("/home/someone/coco/karpathy.json", "/home/someone/coco")
    assert retrieval.resolved_name() == "karpathy"
    config = load_config(None, ['datasets=[{kind="imagefolder", root="~/imagenet", classnames_file="~/names.txt", '
                                'templates_file="~/prompts.txt"}]'], ZeroShotRunConfig)
    dataset = config.datasets[0]
    assert (dataset.root, dataset.classnames_file, dataset.templates_file) == (
        "/home/someone/imagenet", "/home/someone/names.txt", "/home/someone/prompts.txt")
    # Others as written: a URL, a pipe: command (the shell it starts expands its own), a path relative to here
    config = load_config(None, ['data.sources=[{kind="shards", path="pipe:cat ~/a.tar::s3://b/{0..1}.tar::c/~d.tar"}]'],
                         TrainConfig)
    assert config.data.sources[0].path == "pipe:cat ~/a.tar::s3://b/{0..1}.tar::c/~d.tar"

def test_the_meta_device_is_a_config_error():
    # It holds no data: the run stopped in its first step with torch's "unsupported scalarType"
    from clip.config import TrainConfig

    with pytest.raises(ConfigError, match="train.device must be \"auto\" or a torch device"):
        load_config(None, ["train.device=meta"], TrainConfig)


def test_an_index_on_the_cpu_is_a_config_error_saying_there_is_one():
    # torch takes "cpu:1" for "cpu": the run trained on the same CPU, the index promising a choice nothing made
    from clip.config import TrainConfig

    with pytest.raises(ConfigError) as raised:
        load_config(None, ["train.device=cpu:1"], TrainConfig)
    assert str(raised.value) == (
        'train.device must be "auto" or a torch device such as "cpu", "cuda" or "cuda:1", got \'cpu:1\', which '
        "names no device of its own: torch has one CPU device, 'cpu', which uses all the cores it is given"
    )
    assert load_config(None, ["train.device=cpu:0"], TrainConfig).train.device == "cpu:0"


def test_a_config_read_from_a_pipe(tmp_path):
    # clip-train <(sed ... recipe.toml): the pipe was said not to exist
    import os
    import threading

    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text("[section]\nsteps = 4\n"), daemon=True)
    writer.start()
    try:
        assert load_config(pipe, [], Schema).section.steps == 4
    finally:
        if writer.is_alive():  # not read: a reader lets the writer's open return
            os.close(os.open(pipe, os.O_RDONLY | os.O_NONBLOCK))
        writer.join(timeout=10)


def test_an_element_is_overridden_as_error_messages_name_it():
    # "data.sources[0].weight must be ..." pasted back was an unknown key 'data.sources[0]'
    from clip.config import TrainConfig

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    with pytest.raises(ConfigError, match=re.escape("data.sources[0].weight must be a finite number > 0")):
        load_config(demo, ["data.sources.0.weight=0"], TrainConfig)
    assert load_config(demo, ["data.sources[0].weight=2"], TrainConfig).data.sources[0].weight == 2.0
    assert load_config(demo, ["eval.zeroshot[0].seed=3"], TrainConfig).eval.zeroshot[0].seed == 3


def test_a_files_key_in_another_section_names_that_section(tmp_path):
    # A file's [train] warmup_steps was asked if it meant 'accumulation_steps', [train] lr if it meant 'lr'... of
    # nothing near; a top-level init_weights listed the sections. An override's check named the right section.
    from clip.config import TrainConfig

    for text, meant in [("[train]\nwarmup_steps = 10\n", "'schedule.warmup_steps'"),
                        ("[train]\nlr = 1e-5\n", "'optimizer.lr'"),
                        ('init_weights = "w.pt"\n', "'train.init_weights'")]:
        (tmp_path / "c.toml").write_text(text)
        # (and nothing more: the note on TOML's tables is for a top-level key read into a table)
        with pytest.raises(ConfigError, match=re.escape(f"Did you mean {meant}?") + "$"):
            load_config(tmp_path / "c.toml", [], TrainConfig)
    # output_dir at the end of a file: TOML reads it into the last table
    (tmp_path / "c.toml").write_text('[train]\nseed = 1\n\n[[eval.zeroshot]]\nname = "a"\noutput_dir = "runs/x"\n')
    with pytest.raises(ConfigError, match=re.escape("'eval.zeroshot[0].output_dir'. Did you mean 'output_dir'? (TOML "
                                                    "reads a key into the [table] whose header is above it")):
        load_config(tmp_path / "c.toml", [], TrainConfig)
    (tmp_path / "c.toml").write_text("[train]\nbatchsize = 8\n")
    with pytest.raises(ConfigError, match=re.escape("Did you mean 'batch_size'?")):  # a misspelling as before
        load_config(tmp_path / "c.toml", [], TrainConfig)


def test_an_override_of_a_key_in_another_section_names_that_section():
    # "batch_size=8" listed the ten top-level keys; "train.lr=1e-4" every key of [train]; "image_size=1" was
    # asked if it meant 'optimizer'
    from clip.config import TrainConfig

    for override, meant in [("batch_size=8", "'eval.batch_size' or 'train.batch_size'"),
                            ("train.lr=1e-4", "'optimizer.lr'"), ("image_size=64", "'model.vision.image_size'"),
                            ("vision.layers=2", "'model.vision'")]:
        with pytest.raises(ConfigError, match=re.escape(f"Did you mean {meant}?")):
            load_config(None, [override], TrainConfig)
    with pytest.raises(ConfigError, match=re.escape("Did you mean 'train.batch_size'?")):  # a misspelling as before
        load_config(None, ["train.batchsize=8"], TrainConfig)


def test_override_values_the_shell_passed_undecoded_or_as_spaces_alone_or_with_endless_digits():
    from clip.config import TrainConfig

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    # Bytes not in the locale's encoding reach Python as lone surrogates: they passed every check and ended the run
    # on a traceback where its config.toml (UTF-8) was written
    with pytest.raises(ConfigError, match=r"^data.sources\[0\].name 'caf\\udce9' holds bytes that are not UTF-8"):
        load_config(demo, ["data.sources.0.name=caf\udce9"], TrainConfig)
    # An evaluation writes no config.toml: a dataset folder of such a name is evaluated as before
    from clip.evaluation.config import ZeroShotRunConfig

    assert from_dict(ZeroShotRunConfig, {"datasets": [{"kind": "imagefolder", "root": "caf\udce9"}]}).datasets
    # A text value of spaces alone is kept: the tab separator (separator=$'\t') became "", the suffix's separator
    config = load_config(demo, ["data.sources.0.kind=manifest", "data.sources.0.path=x.tsv",
                                "data.sources.0.num_samples=none", "data.sources.0.separator=\t"], TrainConfig)
    assert config.data.sources[0].separator == "\t"
    assert load_config(demo, ["output_dir= runs/x "], TrainConfig).output_dir == "runs/x"  # spaces around: gone
    # More digits than Python converts: a ValueError's traceback, where a value that long is one line already
    with pytest.raises(ConfigError, match=r"eval.zeroshot has no element 0000"):
        load_config(demo, [f"eval.zeroshot.{'0' * 5000}.num_samples=3"], TrainConfig)


def test_an_environment_variable_in_output_dir_is_refused_with_the_way_to_give_it():
    # No config expands "$SCRATCH/runs/x": it made a folder named "$SCRATCH" in the current one
    from clip.config import TrainConfig

    demo = Path(__file__).parent.parent / "configs" / "demo.toml"
    for written in ("$SCRATCH/runs/x", "${SCRATCH}/runs/x"):
        with pytest.raises(ConfigError, match=r"^output_dir holds \$\{?SCRATCH\}?, which a config does not expand .*"
                                              r"--output-dir \""):
            load_config(demo, [f"output_dir={written}"], TrainConfig)
    assert load_config(demo, ["output_dir=runs/cost$"], TrainConfig).output_dir == "runs/cost$"  # no variable there


def test_output_dir_given_by_the_command_replaces_a_refused_one_before_it_is_checked(tmp_path, monkeypatch):
    # The refusal says to give --output-dir instead; it was put in after the file's value had been checked, so the
    # same refusal came back. Also for a file's output_dir = "" and for clip-train itself
    import clip.cli.train as train_cli
    from clip.config import TrainConfig

    recipe = tmp_path / "scratch.toml"
    demo = (Path(__file__).parent.parent / "configs" / "demo.toml").read_text(encoding="utf-8")
    for written in ("", "$SCRATCH/runs/demo"):
        recipe.write_text(f'output_dir = "{written}"\n' + demo.replace("output_dir", "# output_dir"), encoding="utf-8")
        with pytest.raises(ConfigError, match="^" + re.escape(str(recipe)) + ": output_dir"):
            load_config(recipe, [], TrainConfig)
        given = {"output_dir": str(tmp_path / "run")}
        assert load_config(recipe, [], TrainConfig, given=given).output_dir == str(tmp_path / "run")
    with pytest.raises(ConfigError, match="^output_dir"):  # the given value is checked as the file's is
        load_config(recipe, [], TrainConfig, given={"output_dir": ""})
    with pytest.raises(ConfigError, match=r"^output_dir holds \$SCRATCH"):  # its fault, not the file's, said alike
        load_config(recipe, [], TrainConfig, given={"output_dir": "$SCRATCH/runs/demo"})
    started = []
    monkeypatch.setattr(train_cli, "run", lambda config, *rest: started.append(config.output_dir) or 0)
    assert train_cli.main([str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    assert started == [str(tmp_path / "run")]


@pytest.mark.parametrize(("table", "key", "said"), [
    ('[[eval.retrieval]]\nname = "coco"\n', "eval.retrieval[0].annotations", "Karpathy JSON or CSV/TSV/JSONL manifest"),
    ('[[eval.zeroshot]]\nkind = "imagefolder"\n', "eval.zeroshot[0].root", "the image folder"),
    ('[[eval.zeroshot]]\nkind = "cifar10"\n', "eval.zeroshot[0].root", "cifar-10-batches-py/"),
])
def test_an_evaluation_dataset_without_its_files_is_refused_with_the_config(tmp_path, table, key, said):
    # Found when the dataset was listed, at the run's start: "a retrieval dataset needs `annotations`" named
    # neither the file nor the table, and the run's folder had been made
    from clip.config import TrainConfig

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(table, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(recipe))}: {re.escape(key)} must be .*{re.escape(said)}"):
        load_config(recipe, [], TrainConfig)
    assert load_config(None, ['eval.zeroshot=[{kind="synthetic"}]'], TrainConfig).eval.zeroshot[0].root == ""


def test_a_field_of_a_sections_array_of_tables_written_in_the_section_names_the_table(tmp_path):
    # data.kind / data.path (open_clip's --train-data habit) were asked if they meant loss.kind or listed [data]'s
    # keys; [data.sources] with one bracket "expected a list" without a word of the two brackets
    from clip.config import TrainConfig

    with pytest.raises(ConfigError, match=r"'data\.kind' in override 'data\.kind=shards'\. Did you mean "
                                          r"'data\.sources\.0\.kind'\?$"):
        load_config(None, ["data.kind=shards"], TrainConfig)
    with pytest.raises(ConfigError, match=r"Did you mean 'eval\.zeroshot\.0\.name' or 'eval\.retrieval\.0\.name'\?$"):
        load_config(None, ["eval.name=x"], TrainConfig)
    recipe = tmp_path / "recipe.toml"
    for written, said in (('[data]\nkind = "shards"\n', r"'data\.kind'\. Did you mean 'kind' in a \[\[data\.sources\]\] "
                                                        r"table\?$"),
                          ('[data]\npath = "x.tar"\n', r"Did you mean 'path' in a \[\[data\.sources\]\] table\?$"),
                          ('[data.sources]\nkind = "synthetic"\n', r"data\.sources: expected a list \(an array of "
                                                                   r"tables: each one headed \[\[data\.sources\]\], with "
                                                                   r"two brackets\)")):
        recipe.write_text(written, encoding="utf-8")
        with pytest.raises(ConfigError, match=said):
            load_config(recipe, [], TrainConfig)
    with pytest.raises(ConfigError, match=r"Did you mean 'optimizer\.lr'\?"):  # another section's key: as before
        load_config(None, ["train.lr=1"], TrainConfig)
    with pytest.raises(ConfigError, match=r"Did you mean 'eval\.zeroshot\.0\.seed' or 'train\.seed'\?$"):
        load_config(None, ["eval.seed=1"], TrainConfig)  # both: the one other section's key of that name too


def test_a_runs_own_config_started_from_inside_the_run_is_refused_naming_the_run(tmp_path, monkeypatch, capsys):
    # config.toml records output_dir as given ("runs/a"): `cd runs/a && clip-train config.toml` trained a new run in
    # runs/a/runs/a, exit 0, where the resume of runs/a was meant
    import clip.cli.train as train_cli
    from clip import checkpoint as ckpt

    run_dir = tmp_path / "runs" / "a"
    (run_dir / ckpt.CHECKPOINT_DIR).mkdir(parents=True)
    (run_dir / ckpt.CHECKPOINT_DIR / "step_00000002.pt").write_bytes(b"a checkpoint")
    assert ckpt.list_checkpoints(run_dir)
    demo = (Path(__file__).parent.parent / "configs" / "demo.toml").read_text(encoding="utf-8")
    (run_dir / "config.toml").write_text(demo.replace('output_dir = "runs/demo"', 'output_dir = "runs/a"'),
                                         encoding="utf-8")
    started = []
    monkeypatch.setattr(train_cli, "run", lambda config, *rest: started.append(config.output_dir) or 0)
    monkeypatch.chdir(run_dir)
    assert train_cli.main(["config.toml"]) == 2
    assert capsys.readouterr().err.startswith(f"clip-train: config.toml is the config of the run in {run_dir}, but its "
                                              f"output_dir, runs/a, is {run_dir / 'runs' / 'a'} from here: to continue "
                                              f"that run, give --output-dir {run_dir}")
    assert train_cli.main(["config.toml", "--output-dir", "."]) == 0  # said on the command line: meant
    assert train_cli.main(["config.toml", "output_dir=elsewhere"]) == 0
    assert train_cli.main(["config.toml", "output_dir = spaced"]) == 0  # as the loader reads it
    monkeypatch.chdir(tmp_path)  # from the folder it was started in: its resume
    assert train_cli.main(["runs/a/config.toml"]) == 0
    assert started == [".", "elsewhere", "spaced", "runs/a"]


def test_a_number_python_reads_but_toml_does_not_says_how_toml_writes_it(tmp_path):
    # optimizer.lr=.5 was "expected a number, got '.5'", which reads as a number to anyone but TOML
    from clip.config import TrainConfig

    for written in (".5", "5."):
        with pytest.raises(ConfigError, match=re.escape(f"optimizer.lr: expected a number, got '{written}' (written as "
                                                        "TOML writes numbers: digits on both sides of a '.'")):
            load_config(None, [f"optimizer.lr={written}"], TrainConfig)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[optimizer]\nlr = "1e-3"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape("got '1e-3' (a text: write the number without quotes)")):
        load_config(recipe, [], TrainConfig)
    for other in ("fast", "05"):  # not a matter of the '.': no word of it
        with pytest.raises(ConfigError, match=f"expected a number, got '{other}'$"):
            load_config(None, [f"optimizer.lr={other}"], TrainConfig)


def test_settings_are_named_in_messages_as_a_config_writes_them():
    from clip.config_io import as_toml

    assert [as_toml(value) for value in (False, None, "test", "", 0.001, 3, [1, "a"], {"kind": "synthetic"})] == [
        "false", '"none"', '"test"', '""', "0.001", "3", '[1, "a"]', '{kind = "synthetic"}']
