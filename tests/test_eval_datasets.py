"""Local dataset readers: ImageFolder class names and split folders, CIFAR-10/100 pickles (checked against
torchvision's own reader), the restricted unpickler, and config -> dataset resolution."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip.evaluation.config import ZeroShotDatasetConfig
from clip.evaluation.datasets import (
    CIFARDataset,
    ImageFolderDataset,
    UnreadableImageError,
    classnames_from_folders,
    folder_to_classname,
    load_cifar_pickle,
    load_classification_data,
    synthetic_split_seed,
    with_split,
)
from clip.evaluation.image_folder import ends_of


def write_image_folder(root: Path, folders: dict[str, int]) -> None:
    for k, (folder, count) in enumerate(folders.items()):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (8, 6), (10 * k, i, 0)).save(root / folder / f"{i}.png")


def test_folder_names_become_class_names(caplog):
    assert folder_to_classname("n01440764") == "n01440764"
    assert folder_to_classname("golden_retriever") == "golden retriever"
    assert folder_to_classname("03_red_circle", numbered=True) == "red circle"
    assert folder_to_classname("red_circle", numbered=True) == "red circle"  # no prefix to drop
    assert folder_to_classname("red_circle_") == "red circle"  # no stray space in the prompts
    # The label prefix goes only when every folder carries it, numbered 0, 1, 2, ... as the library's own
    # writer (clip.data.synthetic.write_image_folder) names them.
    with caplog.at_level("WARNING"):
        assert classnames_from_folders(["00_red_circle", "01_blue_square"]) == ["red circle", "blue square"]
        assert classnames_from_folders(["00_red", "blue"]) == ["00 red", "blue"]
        assert classnames_from_folders(["0_a", "01_b"]) == ["0 a", "01 b"]  # not one zero-padded width
    assert not caplog.records


@pytest.mark.parametrize(
    ("folders", "names"),
    [
        (["00_a", "01_b", "03_d"], ["00 a", "01 b", "03 d"]),  # "02_c" deleted
        (["01_a", "02_b"], ["01 a", "02 b"]),
        (["2007_Audi_S4", "2012_Audi_S4"], ["2007 Audi S4", "2012 Audi S4"]),  # numbers that are names
    ],
)
def test_numbered_folders_not_numbered_0_to_n_keep_their_numbers_with_a_warning(caplog, folders, names):
    with caplog.at_level("WARNING"):
        assert classnames_from_folders(folders, warn=False) == names
    assert not caplog.records
    with caplog.at_level("WARNING"):
        assert classnames_from_folders(folders) == names
    assert "not numbered 0, 1, 2, ... in order (is a folder missing?)" in caplog.text
    assert f"numbers were kept in the class names ({names[0]!r}, ...)" in caplog.text


def test_the_library_writers_folders_read_back_as_its_class_names(tmp_path):
    from clip.data.synthetic import SyntheticClassification, write_image_folder

    source = SyntheticClassification(4, image_size=16, seed=0)
    write_image_folder(source, tmp_path / "shapes")
    (tmp_path / "shapes" / "classnames.txt").unlink()  # so the names come from the folders
    assert ImageFolderDataset(tmp_path / "shapes").classes == source.classes


def test_classes_that_share_a_name_are_reported(tmp_path, caplog):
    write_image_folder(tmp_path, {"Audi_S4": 1, "Audi S4": 1})
    config = ZeroShotDatasetConfig(kind="imagefolder", root=str(tmp_path))
    with caplog.at_level("WARNING"):
        data = load_classification_data(config, None)
    assert data.classnames == ["Audi S4", "Audi S4"]
    assert "share the name(s) ['Audi S4']" in caplog.text


def test_data_warnings_can_be_left_to_another_rank(tmp_path, caplog):
    # Ranks other than 0 load the same data: warn=False keeps their logs free of the same lines.
    write_image_folder(tmp_path / "data", {"00_S4": 1, "02_S4": 1, "03_S4": 1})
    config = ZeroShotDatasetConfig(kind="imagefolder", root=str(tmp_path / "data"))
    (tmp_path / "names.txt").write_text("a\na\nb\n")
    named = dataclasses.replace(config, classnames_file=str(tmp_path / "names.txt"))
    for dataset, warning in [(config, "numbers were kept"), (named, "share the name(s) ['a']")]:
        caplog.clear()
        with caplog.at_level("WARNING"):
            load_classification_data(dataset, None, warn=False)
        assert not caplog.records
        with caplog.at_level("WARNING"):
            load_classification_data(dataset, None)
        assert len(caplog.records) == 1 and warning in caplog.text  # the file's names: no word on the folders


def test_a_classnames_file_replaces_a_stale_classnames_txt(tmp_path):
    # The folder's classnames.txt, which the file replaces, was read first: one of another length (a class
    # folder added since) stopped the evaluation though the file named every class
    write_image_folder(tmp_path / "data" / "test", {"a": 1, "b": 1, "c": 1})
    (tmp_path / "names.txt").write_text("ant\nbee\ncat\n")
    for stale in (tmp_path / "data" / "test" / "classnames.txt", tmp_path / "data" / "classnames.txt"):
        stale.write_text("apple\nbanana\n")
        config = ZeroShotDatasetConfig(
            kind="imagefolder", root=str(tmp_path / "data"), split="test", classnames_file=str(tmp_path / "names.txt")
        )
        assert load_classification_data(config, None).classnames == ["ant", "bee", "cat"]
        stale.unlink()


def test_image_folder_labels_follow_sorted_folders(tmp_path):
    write_image_folder(tmp_path, {"01_blue_square": 2, "00_red_circle": 3, "02_empty": 0})
    (tmp_path / "00_red_circle" / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["red circle", "blue square", "empty"]
    assert len(dataset) == 5
    image, label = dataset[4]
    # Sorted order puts "01_blue_square" (written first: red channel 0) second; its image 1 has green = 1.
    assert label == 1 and image.getpixel((0, 0)) == (0, 1, 0)


def test_class_names_from_classnames_txt_or_a_user_file(tmp_path):
    write_image_folder(tmp_path / "data", {"a": 1, "b": 1})
    (tmp_path / "data" / "classnames.txt").write_text("apple\nbanana\n")
    assert ImageFolderDataset(tmp_path / "data").classes == ["apple", "banana"]
    (tmp_path / "names.json").write_text('["ant", "bee"]')
    config = ZeroShotDatasetConfig(
        kind="imagefolder", root=str(tmp_path / "data"), classnames_file=str(tmp_path / "names.json")
    )
    assert load_classification_data(config, None).classnames == ["ant", "bee"]
    (tmp_path / "three.txt").write_text("x\ny\nz\n")
    with pytest.raises(ValueError, match="3 class names; the dataset has 2 classes"):
        load_classification_data(
            ZeroShotDatasetConfig(
                kind="imagefolder", root=str(tmp_path / "data"), classnames_file=str(tmp_path / "three.txt")
            ),
            None,
        )



def test_a_classnames_file_may_give_a_class_several_names_as_the_papers_fer2013(tmp_path, caplog):
    write_image_folder(tmp_path / "data", {"0_angry": 1, "1_happy": 1})
    (tmp_path / "fer.txt").write_text("classes = [\n    ['angry'],\n    ['happy', 'smiling'],\n]\n")
    config = ZeroShotDatasetConfig(kind="imagefolder", root=str(tmp_path / "data"),
                                   classnames_file=str(tmp_path / "fer.txt"))
    data = load_classification_data(config, None)
    # Named in results by the first name, prompted with all; a file of one name each has nothing more
    assert data.classnames == ["angry", "happy"]
    assert data.prompted_names == ["angry", ["happy", "smiling"]]
    # A name given to two classes is said (the first names differ, so the repeated-name warning says nothing)
    (tmp_path / "shared.txt").write_text('[["angry", "upset"], ["happy", "Upset "]]')
    with caplog.at_level("WARNING"):
        load_classification_data(dataclasses.replace(config, classnames_file=str(tmp_path / "shared.txt")), None)
    assert "some names are given to several classes, whose prompts they make alike: 'upset' (classes 0, 1)" in (
        caplog.text)
    (tmp_path / "plain.txt").write_text("angry\nhappy\n")
    plain = load_classification_data(dataclasses.replace(config, classnames_file=str(tmp_path / "plain.txt")), None)
    assert plain.several_names is None and plain.prompted_names == plain.classnames == ["angry", "happy"]
    # A folder's own classnames.txt labels its folders one name each: said so, not a class named by a list
    (tmp_path / "data" / "classnames.txt").write_text('[["angry"], ["happy", "smiling"]]')
    with pytest.raises(ValueError, match=r"classnames\.txt: gives class 1 several names .* give a file of several "
                                         r"names as the dataset's classnames_file"):
        load_classification_data(ZeroShotDatasetConfig(kind="imagefolder", root=str(tmp_path / "data")), None)
    # Names passed to the dataset in Python: said of them; names that are not text are no lists of names
    with pytest.raises(ValueError, match=r"ImageFolderDataset's classnames\[1\] is several names"):
        ImageFolderDataset(tmp_path / "data", classnames=["angry", ["happy", "smiling"]])
    assert ImageFolderDataset(tmp_path / "data", classnames=[0, 1]).classes == [0, 1]

IMAGENET_VAL_FOLDERS = {"n01440764": 1, "n01443537": 1, "n01484850": 1}  # ImageNet's first three synsets


@pytest.mark.parametrize("names, refusal", [
    (None, "its class names are WordNet ids"),  # the folder names themselves
    ("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\nn01484850 great white shark\n",
     "the class names file is a mapping of folders to names"),  # the devkit's LOC_synset_mapping.txt
])
def test_imagenet_synset_ids_as_zero_shot_class_names_are_refused(tmp_path, names, refusal):
    # "a photo of a n01440764." names nothing the text encoder knows: ImageNet evaluated with its folder names,
    # or with the synset mapping file as its class names, ran and reported near-chance accuracy as a result
    from clip.cli.zeroshot import list_datasets
    from clip.evaluation.config import EvalConfig, ZeroShotRunConfig
    from clip.evaluation.during_training import check_evaluation_datasets

    write_image_folder(tmp_path / "imagenet" / "val", IMAGENET_VAL_FOLDERS)
    dataset = ZeroShotDatasetConfig(name="imagenet", kind="imagefolder", root=str(tmp_path / "imagenet"), split="val")
    if names is not None:
        (tmp_path / "LOC_synset_mapping.txt").write_text(names)
        dataset.classnames_file = str(tmp_path / "LOC_synset_mapping.txt")
    with pytest.raises(ValueError, match=refusal + ".*one readable name per line"):
        list_datasets(ZeroShotRunConfig(model="m", datasets=[dataset]))
    with pytest.raises(ValueError, match=refusal):
        check_evaluation_datasets(EvalConfig(zeroshot=[dataset]))
    # Readable names in the sorted order of the synset folders are what the evaluation needs
    (tmp_path / "classnames.txt").write_text("tench\ngoldfish\ngreat white shark\n")
    dataset.classnames_file = str(tmp_path / "classnames.txt")
    listed = list_datasets(ZeroShotRunConfig(model="m", datasets=[dataset]))
    assert listed["imagenet"].classnames == ["tench", "goldfish", "great white shark"]
    check_evaluation_datasets(EvalConfig(zeroshot=[dataset]))
    # A linear probe never reads the names: the folders alone still make a dataset
    folders_only = dataclasses.replace(dataset, classnames_file="")
    assert load_classification_data(folders_only, None).classnames == list(IMAGENET_VAL_FOLDERS)


def test_image_folder_split_subfolder_and_errors(tmp_path):
    write_image_folder(tmp_path / "root" / "test", {"cat": 1, "dog": 2})
    data = load_classification_data(
        ZeroShotDatasetConfig(kind="imagefolder", root=str(tmp_path / "root"), split="test"), None
    )
    assert data.classnames == ["cat", "dog"] and len(data.dataset) == 3
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "broken" / "cat").mkdir(parents=True)
    (tmp_path / "broken" / "cat" / "x.png").write_bytes(b"not a png")
    with pytest.raises(UnreadableImageError, match="cannot read image .*x.png"):
        ImageFolderDataset(tmp_path / "broken")[0]


def test_an_image_a_decoder_fails_on_in_any_way_is_one_unreadable_image(tmp_path, monkeypatch):
    # A damaged AVIF named .jpg: its plugin raised RuntimeError, which ended the whole evaluation; and an EPS
    # file named .jpg went to its plugin (which hands files to Ghostscript) instead of being refused
    from clip.evaluation.image_files import read_image

    path = tmp_path / "x.jpg"
    Image.new("RGB", (8, 8)).save(path, format="JPEG")

    def decoder_failure(self):
        raise RuntimeError("decoder error")

    with monkeypatch.context() as patched:
        patched.setattr(Image.Image, "load", decoder_failure)
        with pytest.raises(UnreadableImageError, match="x.jpg: decoder error"):
            read_image(path)
    assert read_image(path).size == (8, 8)
    (tmp_path / "y.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(UnreadableImageError, match="y.jpg"):
        read_image(tmp_path / "y.jpg")
    # Phones' AVIF and scanners' JPEG 2000 files saved under a .jpg name decode in process: read as they were
    for kind in ("AVIF", "JPEG2000"):
        try:
            Image.new("RGB", (8, 8), "red").save(tmp_path / f"{kind}.jpg", format=kind)
        except (KeyError, OSError):  # a Pillow built without its encoder
            continue
        assert read_image(tmp_path / f"{kind}.jpg").size == (8, 8)

    def out_of_memory(self):
        raise MemoryError

    with monkeypatch.context() as patched, pytest.raises(MemoryError):  # the machine's failure, not the file's
        patched.setattr(Image.Image, "load", out_of_memory)
        read_image(path)


def test_a_class_count_one_off_names_the_folders_at_either_end(tmp_path):
    # 1000 names for 1001 folders said only the two counts: the stray folder (an archive's leftover) sorts first
    # or last among ImageNet's synset folders, and the error now shows both ends
    folders = {"ILSVRC2012_img_val": 1, **{f"n0{1440764 + index}": 1 for index in range(5)}}
    write_image_folder(tmp_path / "imagenet" / "val", folders)
    (tmp_path / "names.txt").write_text("".join(f"class {index}\n" for index in range(5)))
    config = ZeroShotDatasetConfig(kind="imagefolder", root=str(tmp_path / "imagenet"), split="val",
                                   classnames_file=str(tmp_path / "names.txt"))
    ends = "ILSVRC2012_img_val, n01440764, ..., n01440767, n01440768"
    assert ends_of(["a", "b", "c", "d"]) == "a, b, c, d"  # nothing left out: no "..."
    write_image_folder(tmp_path / "pets", {"cat": 1, "dog": 1})
    with pytest.raises(ValueError, match=r"3 class names for 2 class folders .*\(cat, dog\)$"):  # too many: no better
        ImageFolderDataset(tmp_path / "pets", classnames=["cat", "dog", "bird"])
    with pytest.raises(ValueError, match=rf"names.txt has 5 class names; the dataset has 6 classes \(the class "
                                         rf"folders of {tmp_path}/imagenet/val: {ends}\)$"):
        load_classification_data(config, None)
    # The same from a classnames.txt beside the split folders, and in the folder itself
    (tmp_path / "names.txt").rename(tmp_path / "imagenet" / "classnames.txt")
    config.classnames_file = ""
    with pytest.raises(ValueError, match=rf"5 class names for 6 class folders in {tmp_path}/imagenet/val \({ends}\)$"):
        load_classification_data(config, None)
    (tmp_path / "imagenet" / "classnames.txt").rename(tmp_path / "imagenet" / "val" / "classnames.txt")
    with pytest.raises(ValueError, match=rf"5 class names for 6 class folders in {tmp_path}/imagenet/val \({ends}\)$"):
        load_classification_data(config, None)
    # Folders of the splits together (the linear probe's), one of them only another split's: "class folders in
    # ROOT" named a folder that is not there
    (tmp_path / "pets" / "classnames.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match=rf"2 class names for 3 class folders of the splits together, "
                                         rf"{tmp_path}/pets holding 2 of them; the others are another split's, whose "
                                         r"classes need names too \(cat, dog, owl\)$"):
        ImageFolderDataset(tmp_path / "pets", class_folders=["cat", "dog", "owl"])
    # Folders given that are the root's own, all of them there: named as its folders, not the splits'
    (tmp_path / "pets" / "classnames.txt").write_text("cat\n")
    with pytest.raises(ValueError, match=rf"1 class names for 2 class folders in {tmp_path}/pets \(cat, dog\)$"):
        ImageFolderDataset(tmp_path / "pets", class_folders=["cat", "dog"])


def test_images_outside_class_folders_say_how_to_sort_them(tmp_path):
    # ImageNet's validation images come as one folder of 50,000 files: the error said only "no class folders"
    val = tmp_path / "imagenet" / "val"
    val.mkdir(parents=True)
    for index in range(1, 4):
        Image.new("RGB", (8, 6)).save(val / f"ILSVRC2012_val_{index:08d}.JPEG")
    (val / "._ILSVRC2012_val_00000001.JPEG").write_bytes(b"macOS metadata")  # not counted
    config = ZeroShotDatasetConfig(kind="imagefolder", root=str(tmp_path / "imagenet"), split="val")
    with pytest.raises(ValueError, match=r"has no class folders .*; its 3 image files lie directly in it, .* move each "
                                         r"into a folder of its class first \(ImageNet's validation images into"):
        load_classification_data(config, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"has no class folders \(expected <root>/<class>/<image files>\)$"):
        ImageFolderDataset(tmp_path / "empty")


def imagefolder(root, split: str, **options) -> ZeroShotDatasetConfig:
    return ZeroShotDatasetConfig(kind="imagefolder", root=str(root), split=split, **options)


def test_a_missing_split_folder_is_an_error_not_the_root(tmp_path):
    # Class folders directly under the root: asking for split "train" must not read the root (which a
    # linear probe would then also use as its test split).
    write_image_folder(tmp_path / "flat", {"cat": 1, "dog": 1})
    with pytest.raises(
        FileNotFoundError, match=r"split 'train': no folder .*flat/train; the folders in .* are \['cat', 'dog'\]"
    ):
        load_classification_data(imagefolder(tmp_path / "flat", "train"), None)
    assert load_classification_data(imagefolder(tmp_path / "flat", ""), None).classnames == ["cat", "dog"]
    # train/ and val/ but no test/: asking for test must not make "train" and "val" two classes.
    write_image_folder(tmp_path / "splits" / "train", {"cat": 1})
    write_image_folder(tmp_path / "splits" / "val", {"cat": 1})
    with pytest.raises(FileNotFoundError, match=r"\['train', 'val'\]"):
        load_classification_data(imagefolder(tmp_path / "splits", "test"), None)
    # ... nor when no split is named: folders that are all split names are not classes.
    with pytest.raises(ValueError, match="look like dataset splits"):
        load_classification_data(imagefolder(tmp_path / "splits", ""), None)
    assert len(load_classification_data(imagefolder(tmp_path / "splits", "val"), None).dataset) == 1
    write_image_folder(tmp_path / "capitals" / "Train", {"cat": 1})  # as some archives spell them
    write_image_folder(tmp_path / "capitals" / "Test", {"cat": 1})
    with pytest.raises(ValueError, match=r"look like dataset splits, not classes; set split to the one to evaluate "
                                         r"\(e.g. split = 'Train'\)"):
        load_classification_data(imagefolder(tmp_path / "capitals", ""), None)
    (tmp_path / "empty").mkdir()  # no folders at all: said as such, not as split folders
    with pytest.raises(ValueError, match="has no class folders"):
        load_classification_data(imagefolder(tmp_path / "empty", ""), None)
    # Class folders without an image among them: an error, not an accuracy over no images
    (tmp_path / "imageless" / "cat").mkdir(parents=True)
    (tmp_path / "imageless" / "dog" / "notes.txt").parent.mkdir(parents=True)
    (tmp_path / "imageless" / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"no images with extensions \[.*\] under .*imageless"):
        load_classification_data(imagefolder(tmp_path / "imageless", ""), None)
    # A class that happens to bear a split's name (vehicles: bus, car, train) is a class
    write_image_folder(tmp_path / "vehicles", {"bus": 1, "car": 1, "train": 1})
    assert load_classification_data(imagefolder(tmp_path / "vehicles", ""), None).classnames == ["bus", "car", "train"]


def test_hidden_files_and_macos_metadata_are_not_images(tmp_path):
    write_image_folder(tmp_path, {"cat": 2, "dog": 1})
    (tmp_path / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (tmp_path / "cat" / ".thumbs").mkdir()
    (tmp_path / "cat" / ".thumbs" / "0.png").write_bytes(b"junk")
    (tmp_path / "__MACOSX" / "cat").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "cat" / "._1.png").write_bytes(b"junk")
    (tmp_path / ".cache").mkdir()
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["cat", "dog"]
    assert [path.name for path, _ in dataset.samples] == ["0.png", "1.png", "0.png"]


def test_netpbm_greyscale_images_are_images(tmp_path):
    # torchvision's ImageFolder reads .pgm; a class of .pgm files alone was dropped without a word
    write_image_folder(tmp_path, {"cat": 1})
    (tmp_path / "dog").mkdir()
    Image.new("L", (8, 8), 90).save(tmp_path / "dog" / "0.pgm")
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["cat", "dog"] and [path.name for path, _ in dataset.samples] == ["0.png", "0.pgm"]


def test_image_extensions_in_capitals_are_images(tmp_path):
    # ImageNet's files are .JPEG, a camera's .JPG: a class of them alone was dropped
    write_image_folder(tmp_path, {"cat": 1})
    (tmp_path / "dog").mkdir()
    Image.new("RGB", (8, 6)).save(tmp_path / "dog" / "0.JPEG", format="JPEG")
    dataset = ImageFolderDataset(tmp_path)
    assert [(path.name, label) for path, label in dataset.samples] == [("0.png", 0), ("0.JPEG", 1)]


def test_linked_folders_are_followed_once(tmp_path):
    # A class assembled from links to other folders, as torchvision's ImageFolder reads it; a link back to
    # an ancestor must not loop.
    write_image_folder(tmp_path / "data", {"cat": 2, "dog": 1})
    write_image_folder(tmp_path / "elsewhere", {"more_cats": 3})
    (tmp_path / "data" / "cat" / "linked").symlink_to(tmp_path / "elsewhere" / "more_cats", target_is_directory=True)
    (tmp_path / "data" / "dog" / "loop").symlink_to(tmp_path / "data" / "dog", target_is_directory=True)
    dataset = ImageFolderDataset(tmp_path / "data")
    assert [label for _, label in dataset.samples] == [0] * 5 + [1]


def test_a_classnames_file_beside_the_split_folders_names_the_classes_of_each(tmp_path):
    write_image_folder(tmp_path / "val", {"n01": 1, "n02": 1})
    (tmp_path / "classnames.txt").write_text("goldfish\ngreat white shark\n")
    config = ZeroShotDatasetConfig(name="in", kind="imagefolder", root=str(tmp_path), split="val")
    assert load_classification_data(config, None).classnames == ["goldfish", "great white shark"]
    (tmp_path / "val" / "classnames.txt").write_text("fish\nshark\n")  # the split's own comes first
    assert load_classification_data(config, None).classnames == ["fish", "shark"]


def test_class_names_listed_in_another_order_than_the_folders_are_refused(tmp_path):
    # Labels follow the sorted folders (bird, cat, dog); names written as the classes came to mind gave each
    # folder another class's prompts, and the accuracy came out near 0 without a word.
    write_image_folder(tmp_path / "val", {"bird": 1, "cat": 1, "great_white_shark": 1})
    config = ZeroShotDatasetConfig(name="pets", kind="imagefolder", root=str(tmp_path), split="val")
    places = [tmp_path / "val" / "classnames.txt", tmp_path / "classnames.txt", tmp_path / "names.txt"]
    for names_file in places:
        given = str(names_file) if names_file.name == "names.txt" else ""  # the others are found in their place
        with_file = dataclasses.replace(config, classnames_file=given)
        names_file.write_text("Cat\nbird\nshark\n")
        with pytest.raises(ValueError, match=rf"{names_file.name}: entry 1 is 'Cat', the name of class folder 'cat' "
                           r"\(label 1\), but label 0 is folder 'bird': class names are listed in the sorted order "
                           r"of the class folders \(bird, cat, great_white_shark\)"):
            load_classification_data(with_file, None)
        # The right order, with names of the readers' own choosing, is read as it is
        names_file.write_text("bird\na cat\nGreat white shark\n")
        assert load_classification_data(with_file, None).classnames == ["bird", "a cat", "Great white shark"]
        names_file.unlink()


def test_class_names_that_rename_a_folder_after_another_renamed_folder_are_read_as_given(tmp_path):
    # Folders cat and wild_cat named "house cat" and "cat": entry 2 is the name of folder cat, but that
    # folder's own name is listed nowhere, so the file gives its own names in label order, not another order
    write_image_folder(tmp_path / "val", {"cat": 1, "wild_cat": 1})
    (tmp_path / "val" / "classnames.txt").write_text("house cat\ncat\n")
    config = ZeroShotDatasetConfig(name="cats", kind="imagefolder", root=str(tmp_path), split="val")
    assert load_classification_data(config, None).classnames == ["house cat", "cat"]
    # Listed in another order, the same names are still refused
    (tmp_path / "val" / "classnames.txt").write_text("wild cat\ncat\n")
    with pytest.raises(ValueError, match=r"entry 1 is 'wild cat', the name of class folder 'wild_cat'"):
        load_classification_data(config, None)


def test_splits_can_share_one_labelling(tmp_path):
    write_image_folder(tmp_path, {"ant": 1, "cat": 1})
    dataset = ImageFolderDataset(tmp_path, class_folders=["ant", "bee", "cat"])
    assert dataset.classes == ["ant", "bee", "cat"] and [label for _, label in dataset.samples] == [0, 2]
    with pytest.raises(ValueError, match=r"class folders \['cat'\] that are not among the classes"):
        ImageFolderDataset(tmp_path, class_folders=["ant", "bee"])


def test_max_samples_spreads_over_every_class(tmp_path):
    write_image_folder(tmp_path, {"a": 4, "b": 4, "c": 4})
    data = load_classification_data(imagefolder(tmp_path, "", max_samples=3), None)
    assert [data.dataset[i][1] for i in range(3)] == [0, 1, 2]
    assert data.dataset.indices == [0, 4, 8]


def test_max_samples_of_the_synthetic_set_covers_every_class():
    # Its labels cycle through the 48 classes item by item: every 9.6th of 960 items would hold 5 classes only.
    config = ZeroShotDatasetConfig(kind="synthetic", num_samples=960, image_size=16, max_samples=100)
    data = load_classification_data(config, None)
    labels = [data.dataset[i][1] for i in range(len(data.dataset))]
    assert len(labels) == 100 and set(labels) == set(range(len(data.classnames))) and len(data.classnames) == 48
    assert data.dataset.indices == load_classification_data(config, None).dataset.indices  # the same on every rank


def test_every_synthetic_split_has_its_own_images():
    base = ZeroShotDatasetConfig(kind="synthetic", num_samples=6, image_size=16, heldout_report=False)

    def pixels(split: str) -> list[bytes]:
        dataset = load_classification_data(with_split(base, split), None).dataset
        return [dataset[i][0].tobytes() for i in range(len(dataset))]

    test, default = pixels("test"), pixels("")
    assert default == test  # no split named: the evaluation images a training run's own evaluation used
    others = {split: pixels(split) for split in ("train", "val", "validation", "holdout")}
    for split, images in others.items():
        assert images != test, split
        assert sum(a == b for a, b in zip(images, test, strict=True)) == 0, split
    assert len({tuple(images) for images in others.values()}) == len(others)
    # Stable: test keeps the seed, train its historical seed + 1, other names a fixed function of the name.
    assert synthetic_split_seed(5, "test") == synthetic_split_seed(5, "") == 5
    assert synthetic_split_seed(5, "train") == 6
    assert synthetic_split_seed(5, "val") == synthetic_split_seed(5, "val") not in (5, 6)


def cifar_images(count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 3072), dtype=np.uint8), rng.integers(0, 10, count).tolist()


def write_cifar10(root: Path, bytes_keys: bool = False) -> Path:
    """torchvision's layout: cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for number, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data, labels = cifar_images(3, number)
        batch = {
            key("batch_label"): name,
            key("labels"): labels,
            key("data"): data,
            key("filenames"): [f"{i}.png" for i in range(3)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {key("label_names"): names, key("num_cases_per_batch"): 3, key("num_vis"): 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_reader_matches_torchvision(tmp_path, monkeypatch, bytes_keys):
    torchvision = pytest.importorskip("torchvision")
    write_cifar10(tmp_path, bytes_keys)
    ours = CIFARDataset(tmp_path, "cifar10", train=False)
    data, labels = cifar_images(3, 5)
    assert ours.labels == labels and len(ours) == 3 and ours.classes[1] == "automobile"
    # Pixel (row 0, col 1) of image 0: channel planes are R, G, B, each 32 x 32 row-major.
    assert ours[0][0].getpixel((1, 0)) == (data[0, 1], data[0, 1024 + 1], data[0, 2048 + 1])
    assert len(CIFARDataset(tmp_path / "cifar-10-batches-py", "cifar10", train=True)) == 15
    if bytes_keys:
        return
    # torchvision's reader as an independent reference; our tiny files cannot match its md5 list.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    for train in (False, True):
        reference = torchvision.datasets.CIFAR10(str(tmp_path), train=train, download=False)
        ours = CIFARDataset(tmp_path, "cifar10", train=train)
        assert ours.classes == reference.classes and ours.labels == list(reference.targets)
        assert np.array_equal(ours.images, reference.data)


def test_cifar100_reader_uses_fine_labels_and_readable_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data, _ = cifar_images(4, 0)
    for split in ("train", "test"):
        batch = {"data": data, "fine_labels": [0, 1, 2, 1], "coarse_labels": [0, 0, 1, 1], "filenames": list("abcd")}
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"fine_label_names": ["apple", "aquarium_fish", "maple_tree"], "coarse_label_names": ["x", "y"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    data = load_classification_data(ZeroShotDatasetConfig(kind="cifar100", root=str(tmp_path)), None)
    assert data.classnames == ["apple", "aquarium fish", "maple tree"]
    assert [data.dataset[i][1] for i in range(4)] == [0, 1, 2, 1]


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_cifar_unpickler_refuses_anything_but_the_format(tmp_path):
    marker = tmp_path / "pwned"
    payload = Payload()
    payload.marker = str(marker)
    (tmp_path / "evil").write_bytes(pickle.dumps({"data": payload}))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_cifar_pickle(tmp_path / "evil")
    assert not marker.exists()


def test_missing_cifar_files_name_both_places_looked_in(tmp_path):
    # The error named only root/test_batch, while the config's comment says the files go in
    # root/cifar-10-batches-py/: it pointed at the wrong place
    with pytest.raises(FileNotFoundError, match=rf"cifar10 not found: neither {tmp_path}/cifar-10-batches-py/test_batch "
                                                rf"nor {tmp_path}/test_batch exists \(root {tmp_path} must hold "
                                                r"torchvision's cifar-10-batches-py/ folder, or be that folder\)"):
        CIFARDataset(tmp_path, "cifar10")
    with pytest.raises(FileNotFoundError, match="cifar-100-python/train nor"):
        CIFARDataset(tmp_path, "cifar100", train=True)
    (tmp_path / "cifar-10-batches-py").mkdir()  # the folder is there, without the file: that is the place named
    with pytest.raises(FileNotFoundError, match=rf"cifar10 not found: no {tmp_path}/cifar-10-batches-py/test_batch \("):
        CIFARDataset(tmp_path, "cifar10")


def test_an_unknown_cifar_kind_is_a_value_error_naming_the_kinds(tmp_path):
    # CIFARDataset is public (clip.evaluation): a misspelt kind ("cifar-10") is an input error the commands
    # report in one line, not a KeyError of the layouts' table, and it is found before any file is looked for
    with pytest.raises(ValueError, match=r"kind must be one of \['cifar10', 'cifar100'\], got 'cifar-10'"):
        CIFARDataset(tmp_path / "nowhere", "cifar-10")


def test_cifar_format_errors_are_clear(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8), "labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"shape \[N, 3072\]"):
        CIFARDataset(tmp_path, "cifar10")
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.full((2, 3072), 0.5), "labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"uint8 array .* got a float64 array of shape \[2, 3072\]"):
        CIFARDataset(tmp_path, "cifar10")  # floats in [0, 1] would have become black images
    (folder / "test_batch").write_bytes(pickle.dumps({"labels": [0, 1]}))  # no 'data': not an AttributeError
    with pytest.raises(ValueError, match=r"test_batch: 'data' must be a uint8 array .* got a NoneType"):
        CIFARDataset(tmp_path, "cifar10")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        CIFARDataset(tmp_path / "nowhere", "cifar10", train=True)
    # A label outside the classes: -1 read as the last class without a word, 10 failed later
    for labels in ([-1, 0], [0, 10]):
        (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": labels}))
        with pytest.raises(ValueError, match=r"labels outside 0\.\.9"):
            CIFARDataset(tmp_path, "cifar10")
    # One label short: the images after it would be read with no label, or their neighbours'
    (folder / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}))
    with pytest.raises(ValueError, match="'labels' must hold one label per image"):
        CIFARDataset(tmp_path, "cifar10")
    (folder / "test_batch").write_bytes(pickle.dumps([np.zeros((2, 3072), np.uint8), [0, 1]]))  # not a dict
    with pytest.raises(ValueError, match="test_batch: expected a dict, got list"):
        CIFARDataset(tmp_path, "cifar10")


def test_synthetic_config_reports_heldout_pairs_and_its_own_templates():
    from clip.data import synthetic

    config = ZeroShotDatasetConfig(kind="synthetic", num_samples=10, image_size=32, max_samples=4)
    data = load_classification_data(config, None)
    reference = synthetic.SyntheticClassification(10, 32, 0)
    assert data.classnames == reference.classes
    assert data.subsets == {"heldout": reference.heldout_class_indices}
    assert data.templates == synthetic.templates()
    assert len(data.dataset) == 4
    image, label = data.dataset[3]  # max_samples keeps the first 4 synthetic images (see below)
    assert label == reference[3][1] and image.size == (32, 32)
    other = load_classification_data(
        ZeroShotDatasetConfig(kind="synthetic", heldout_report=False, builtin_templates="simple"), None
    )
    assert other.subsets == {} and other.templates == ["a photo of a {}."]


def test_synthetic_only_settings_on_another_kind_are_named_as_ignored(tmp_path, caplog):
    # num_samples on an image folder looked like a limit and silently evaluated every image.
    write_image_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    folder = ZeroShotDatasetConfig(kind="imagefolder", root=str(tmp_path / "data"), name="pets")
    with caplog.at_level("WARNING"):
        assert len(load_classification_data(folder, None).dataset) == 6
    assert not caplog.records
    limited = dataclasses.replace(folder, num_samples=2, seed=3)
    with caplog.at_level("WARNING"):
        assert len(load_classification_data(limited, None).dataset) == 6  # still every image: only a warning
    assert len(caplog.records) == 1
    assert ("zero-shot dataset 'pets': num_samples, seed are read by kind = \"synthetic\" only and ignored for "
            "imagefolder (max_samples limits how many images are evaluated)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_classification_data(limited, None, warn=False)  # another rank reports it
        load_classification_data(ZeroShotDatasetConfig(kind="synthetic", num_samples=24, seed=3), None)
    assert not caplog.records


@pytest.mark.parametrize("split", ["", "val"])
def test_a_relative_image_folder_that_is_missing_says_where_it_was_looked_for(tmp_path, monkeypatch, split):
    # "image folder not found: data/imagenet", of a root written relative to the config file's folder, left the
    # user to guess which folder it was read from (the command's, as for a data source's path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        load_classification_data(imagefolder(Path("data/imagenet"), split), None)
    assert str(caught.value) == ("image folder not found: data/imagenet (a relative path, read from the folder the "
                                 f"command runs in, {tmp_path})")


def test_a_file_given_where_a_folder_or_a_folder_where_a_file_goes_is_said_to_be_one(tmp_path):
    # "image folder not found" of a file that is there, "class names file not found" of a folder that is there:
    # both sent the user looking for something they could see
    from clip.evaluation.image_folder import ImageFolderDataset
    from clip.evaluation.templates import load_classnames

    (tmp_path / "pets").write_text("a file")
    with pytest.raises(FileNotFoundError, match=r"image folder .*pets is a file, not a folder of class folders$"):
        ImageFolderDataset(tmp_path / "pets")
    (tmp_path / "names").mkdir()
    with pytest.raises(IsADirectoryError, match=r"names is a folder; give the file$"):
        load_classnames(tmp_path / "names")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nowhere")
