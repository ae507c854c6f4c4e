"""The trainer's evaluation hook: flat metric keys on a tiny model, mode restored, when to run, and two gloo
ranks (each encoding a slice, unreadable images among them) returning the same metrics as one process."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import clip
from clip.architectures import ModelConfig, TextConfig, VisionConfig
from clip.evaluation import EvalConfig, RetrievalDatasetConfig, ZeroShotDatasetConfig, run_evaluations, should_evaluate
from clip.run_log import strict_json

from multiprocess import free_port, spawn_ranks

WORLD_SIZE = 2


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: intra-op threads only add synchronisation (badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(kind="vit", image_size=32, width=32, layers=1, heads=2, patch_size=8),
        text=TextConfig(context_length=40, width=32, layers=1, heads=2),
    )
    return clip.create_model(config)


def write_caption_manifest(root: Path, count: int) -> Path:
    from clip.data.synthetic import SyntheticCaptions

    captions = SyntheticCaptions(count, image_size=32, seed=0, split="val")
    with open(root / "captions.jsonl", "w") as manifest:
        for i in range(count):
            image, caption = captions[i]
            image.save(root / f"{i}.png")
            manifest.write(json.dumps({"image": f"{i}.png", "caption": caption}) + "\n")
            manifest.write(json.dumps({"image": f"{i}.png", "caption": f"a picture, number {i}"}) + "\n")
    return root / "captions.jsonl"


def write_data_with_unreadable_images(root: Path) -> Path:
    """root/folder: an image folder with one unreadable image among 9, and names for its classes
    (folder_names.txt) of which two are the same; root/half_broken.jsonl: 4 images, the last two unreadable,
    so that the second of two ranks has no readable image at all."""
    from PIL import Image

    for k, colour in enumerate(["red", "green", "blue"]):
        (root / "folder" / colour).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (80 * k, 40 * i, 200 - 60 * k)).save(root / "folder" / colour / f"{i}.png")
    (root / "folder" / "green" / "1.png").write_bytes(b"not a png")
    (root / "folder_names.txt").write_text("blue\nred\nred\n")  # for the folders blue, green, red
    with open(root / "half_broken.jsonl", "w") as manifest:
        for i in range(4):
            path = root / f"half_broken_{i}.png"
            if i < 2:
                Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(path)
            else:
                path.write_bytes(b"")
            manifest.write(json.dumps({"image": path.name, "caption": f"a square of red {60 * i}"}) + "\n")
    return root


def eval_config(manifest: Path, with_unreadable: Path | None = None) -> EvalConfig:
    zeroshot = [ZeroShotDatasetConfig(name="shapes", kind="synthetic", num_samples=30, image_size=32)]
    retrieval = [RetrievalDatasetConfig(name="captions", annotations=str(manifest))]
    if with_unreadable:
        names = str(with_unreadable / "folder_names.txt")
        zeroshot.append(
            ZeroShotDatasetConfig(
                name="folder", kind="imagefolder", root=str(with_unreadable / "folder"), classnames_file=names
            )
        )
        retrieval.append(RetrievalDatasetConfig(annotations=str(with_unreadable / "half_broken.jsonl")))
    return EvalConfig(
        batch_size=5, workers=0, text_batch_size=16, retrieval_chunk_size=3, zeroshot=zeroshot, retrieval=retrieval
    )


def test_run_evaluations_returns_flat_metrics_and_restores_train_mode(tmp_path):
    model = tiny_clip().train()
    metrics = run_evaluations(model, eval_config(write_caption_manifest(tmp_path, 7)), device="cpu", step=10)
    assert model.training
    expected = {f"zeroshot/shapes/{m}" for m in ("top1", "top5", "mean_per_class")}
    expected |= {f"zeroshot/shapes/heldout/{m}" for m in ("top1", "top5", "mean_per_class")}
    expected |= {f"retrieval/captions/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)}
    expected |= {
        f"retrieval/captions/{d}_{s}_rank" for d in ("image_to_text", "text_to_image") for s in ("mean", "median")
    }
    assert set(metrics) == expected
    assert all(isinstance(v, float) for v in metrics.values())
    assert all(0.0 <= metrics[k] <= 1.0 for k in expected if "rank" not in k)
    assert metrics["retrieval/captions/image_to_text_R@10"] == 1.0  # 7 images: everything is in the top 10


def test_unreadable_images_are_counted_in_the_metrics(tmp_path):
    manifest = write_caption_manifest(tmp_path, 7)
    data = write_data_with_unreadable_images(tmp_path / "more")
    metrics = run_evaluations(tiny_clip(), eval_config(manifest, data), device="cpu")
    # Counts, written as metrics.jsonl writes the record: 1, as the results files' to_dict gives them, not 1.0
    record = json.loads(strict_json(metrics))
    assert repr(record["zeroshot/folder/num_skipped"]) == "1"
    assert repr(record["retrieval/half_broken/num_skipped"]) == "2"
    assert "zeroshot/shapes/num_skipped" not in metrics and "retrieval/captions/num_skipped" not in metrics


def test_a_model_with_non_finite_features_records_nan_with_a_warning_not_an_error(tmp_path, caplog):
    # A diverged run (finite weights of 1e30, say) gives inf features: evaluated, NaN predictions scored as
    # class 0 and NaN truths as rank 1; refused, the error would stop the run at an evaluation
    model = tiny_clip()
    with torch.no_grad():
        model.visual.proj.fill_(float("nan"))
    with caplog.at_level(logging.WARNING):
        metrics = run_evaluations(model, eval_config(write_caption_manifest(tmp_path, 7)), device="cpu", step=10)
    assert set(metrics) == {"zeroshot/shapes/top1", "retrieval/captions/image_to_text_R@1",
                            "retrieval/captions/text_to_image_R@1"}
    assert all(math.isnan(value) for value in metrics.values())
    assert "step 10: 30 of 30 zero-shot shapes image features are NaN or inf" in caplog.text
    assert "step 10: 7 of 7 retrieval captions image features are NaN or inf" in caplog.text and "recorded as NaN" in caplog.text


def test_evaluation_leaves_the_global_random_generator_alone(tmp_path):
    # An evaluation during training must not shift what the run draws afterwards (exact resume compares a
    # run that evaluated at a step with one that stopped there instead).
    model, config = tiny_clip(), eval_config(write_caption_manifest(tmp_path, 7))
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    run_evaluations(model, config, device="cpu", step=10)
    assert torch.equal(torch.rand(3), expected)


def test_a_one_class_zero_shot_dataset_is_refused_before_training(tmp_path):
    # Evaluated during training, it scored 100% top-1 at every evaluation whatever the model (clip-zeroshot
    # refused it already)
    from PIL import Image

    from clip.evaluation.during_training import check_evaluation_datasets

    (tmp_path / "dogs").mkdir()
    Image.new("RGB", (16, 16), "brown").save(tmp_path / "dogs" / "0.png")
    only_dogs = ZeroShotDatasetConfig(name="pets", kind="imagefolder", root=str(tmp_path))
    refusal = r"dataset 'pets' has 1 class \(dogs\); zero-shot classification needs at least 2"
    with pytest.raises(ValueError, match=refusal):
        check_evaluation_datasets(EvalConfig(workers=0, zeroshot=[only_dogs]))


def test_a_dataset_is_usable_when_any_of_the_images_tried_reads_and_refused_when_none_does():
    # Eight images spread over the dataset are tried, and reading stops at the first that decodes: a dataset
    # whose first images happen to be broken is not refused before training
    from clip.evaluation.during_training import IMAGES_TRIED, _require_a_readable_image
    from clip.evaluation.image_files import UnreadableImageError

    tried = []

    def readable_from(first_readable: int):
        def read(index: int) -> None:
            tried.append(index)
            if index < first_readable:
                raise UnreadableImageError(Path(f"{index}.png"), "not an image")
        return read

    _require_a_readable_image(readable_from(80), 100, "mostly broken")  # only the last one tried reads
    assert tried == [0, 12, 25, 37, 50, 62, 75, 87] and IMAGES_TRIED == 8
    tried.clear()
    _require_a_readable_image(readable_from(0), 100, "fine")
    assert tried == [0]
    with pytest.raises(ValueError, match=r"'broken': none of the 3 images tried can be read, e.g. cannot read image 0.png"):
        _require_a_readable_image(readable_from(3), 3, "broken")
    with pytest.raises(ValueError, match="evaluation dataset 'empty' has no images"):
        _require_a_readable_image(readable_from(0), 0, "empty")
    # A retrieval set needs two (with one, every recall is 100%: refused at the first evaluation, steps into the
    # run): the images not among those tried are read too when fewer decode
    tried.clear()
    _require_a_readable_image(readable_from(98), 100, "two left", needed=2)
    assert tried[:8] == [0, 12, 25, 37, 50, 62, 75, 87] and tried[-2:] == [98, 99] and len(tried) == 100
    with pytest.raises(ValueError, match=r"^evaluation dataset 'one left': only 1 of its 100 images can be read, e.g. "
                                         r"cannot read image 0.png: not an image; it needs at least 2 \(retrieval"):
        _require_a_readable_image(readable_from(99), 100, "one left", needed=2)


def test_a_stop_check_before_a_retrieval_dataset_comes_before_its_data_is_read(tmp_path, monkeypatch):
    # A retrieval dataset's captions file can be large: a stop asked for during the zero-shot evaluation (or
    # before this dataset) abandons the evaluation before it is read
    import clip.evaluation.during_training as during_training

    class Abandon(Exception):
        pass

    def stop_check():
        raise Abandon

    def read_retrieval_data(config):
        pytest.fail("the retrieval data was read after a stop check that abandons the evaluation")

    monkeypatch.setattr(during_training, "load_retrieval_data", read_retrieval_data)
    config = EvalConfig(workers=0, retrieval=[RetrievalDatasetConfig(name="captions", annotations=str(tmp_path / "c.jsonl"))])
    with pytest.raises(Abandon):
        run_evaluations(tiny_clip(), config, device="cpu", stop_check=stop_check)


def test_checking_the_datasets_warns_about_them_only_when_told(monkeypatch):
    # The trainer checks the datasets on every rank, with warn on rank 0 alone: each rank warned alike
    import clip.evaluation.during_training as during_training

    warned = []
    load = during_training.load_classification_data

    def recording(config, transform, warn=True):
        warned.append(warn)
        return load(config, transform, warn=warn)

    monkeypatch.setattr(during_training, "load_classification_data", recording)
    shapes = ZeroShotDatasetConfig(name="shapes", kind="synthetic", num_samples=4, image_size=32)
    during_training.check_evaluation_datasets(EvalConfig(workers=0, zeroshot=[shapes]), warn=False)
    assert warned == [False]


def test_checking_the_datasets_warns_once_about_captions_that_images_share(tmp_path, caplog):
    # A template's caption for many images makes image->text recall 0 at every evaluation: said before training
    from PIL import Image

    from clip.evaluation.during_training import check_evaluation_datasets

    with open(tmp_path / "same.jsonl", "w") as manifest:
        for i in range(3):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
            manifest.write(json.dumps({"image": f"{i}.png", "caption": "a red square"}) + "\n")
    config = EvalConfig(workers=0, retrieval=[RetrievalDatasetConfig(annotations=str(tmp_path / "same.jsonl"))])
    with caplog.at_level("WARNING"):
        check_evaluation_datasets(config, warn=False)  # the other ranks
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        check_evaluation_datasets(config)
    assert "retrieval same: 3 of 3 images have a caption that another image has too" in caplog.text
    assert 'ties = "optimistic" in its [[eval.retrieval]] table ranks them' in caplog.text
    caplog.clear()
    optimistic = dataclasses.replace(config.retrieval[0], ties="optimistic")
    with caplog.at_level("WARNING"):
        check_evaluation_datasets(dataclasses.replace(config, retrieval=[optimistic]))
    assert caplog.text == ""
    # and the evaluations rank by it: the shared caption is every image's truth, each copy a tie
    metrics = {
        ties: run_evaluations(tiny_clip(), dataclasses.replace(config, retrieval=[retrieval]), device="cpu")
        for ties, retrieval in (("pessimistic", config.retrieval[0]), ("optimistic", optimistic))
    }
    assert metrics["pessimistic"]["retrieval/same/image_to_text_R@1"] == 0.0
    assert metrics["optimistic"]["retrieval/same/image_to_text_R@1"] == 1.0


def test_an_image_in_two_karpathy_entries_is_warned_of_only_where_the_datasets_warnings_are_asked_for(
    tmp_path, caplog,
):
    # The check before training (warn=False on ranks but 0) and every evaluation (warn_about_data=False: said
    # before training) read the file with its warning on: each rank warned, at every evaluation
    from PIL import Image

    from clip.evaluation.during_training import check_evaluation_datasets

    for i in range(2):
        Image.new("RGB", (32, 32), (120 * i, 0, 0)).save(tmp_path / f"{i}.png")
    entries = [{"filename": name, "split": "test", "sentences": [{"raw": caption}]}
               for name, caption in (("0.png", "a black square"), ("1.png", "a red square"), ("0.png", "dark"))]
    (tmp_path / "dataset.json").write_text(json.dumps({"images": entries}))
    config = EvalConfig(workers=0, retrieval=[RetrievalDatasetConfig(annotations=str(tmp_path / "dataset.json"))])
    with caplog.at_level("WARNING"):
        check_evaluation_datasets(config, warn=False)
        run_evaluations(tiny_clip(), config, device="cpu", warn_about_data=False)
    assert "more than one entry" not in caplog.text
    with caplog.at_level("WARNING"):
        check_evaluation_datasets(config)
    assert caplog.text.count("1 image(s) listed in more than one entry") == 1
    with caplog.at_level("WARNING"):
        run_evaluations(tiny_clip(), config, device="cpu")
    assert caplog.text.count("1 image(s) listed in more than one entry") == 2


def test_a_retrieval_set_with_one_readable_image_is_refused_before_training(tmp_path):
    # One readable image was enough for the check; every recall of such a set is 100%, refused at the first
    # evaluation, steps into the run
    from clip.evaluation.during_training import check_evaluation_datasets

    write_caption_manifest(tmp_path, 3)
    for broken in ("1.png", "2.png"):
        (tmp_path / broken).write_bytes(b"not a png")
    config = EvalConfig(workers=0, retrieval=[RetrievalDatasetConfig(annotations=str(tmp_path / "captions.jsonl"))])
    with pytest.raises(ValueError, match=r"^evaluation dataset 'captions': only 1 of its 3 images can be read"):
        check_evaluation_datasets(config)


def test_run_evaluations_checks_a_value_set_after_its_config_was_built(tmp_path):
    # As train() does: a notebook's eval_config.batch_size = "64" failed deep in the DataLoader
    from clip.config_io import ConfigError

    config = eval_config(write_caption_manifest(tmp_path, 4))
    config.batch_size = "64"
    with pytest.raises(ConfigError, match=r"^batch_size: expected an integer, got '64'$"):
        run_evaluations(tiny_clip(), config, device="cpu")
    config = eval_config(write_caption_manifest(tmp_path, 4))
    config.retrieval[0].annotations = tmp_path / "captions.jsonl"  # a pathlib.Path, taken as its text
    assert "retrieval/captions/image_to_text_R@1" in run_evaluations(tiny_clip(), config, device="cpu")


def test_should_evaluate_schedule():
    config = EvalConfig(every_n_steps=50, zeroshot=[ZeroShotDatasetConfig()])
    assert [s for s in range(181) if should_evaluate(config, s, 180)] == [50, 100, 150, 180]
    only_at_end = EvalConfig(every_n_steps=0, zeroshot=[ZeroShotDatasetConfig()])
    assert [s for s in range(181) if should_evaluate(only_at_end, s, 180)] == [180]
    assert not should_evaluate(EvalConfig(every_n_steps=1), 180, 180)  # nothing configured


class RecordWarnings(logging.Handler):
    """Keeps the messages of the warnings logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def worker(rank: int, port: int, manifest: str, output: str) -> None:
    """Each rank: the metrics of `eval_config`, the warnings it logged meanwhile, and the error of a zero-shot
    dataset whose images are all unreadable."""
    from clip.distributed import DistributedInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    warnings = RecordWarnings()
    logging.getLogger("clip").addHandler(warnings)
    try:
        info = DistributedInfo(rank=rank, world_size=WORLD_SIZE, local_rank=rank, device=torch.device("cpu"))
        config = eval_config(Path(manifest), Path(output) / "more")
        metrics = run_evaluations(tiny_clip(), config, device="cpu", dist_info=info)
        broken = ZeroShotDatasetConfig(name="broken", kind="imagefolder", root=str(Path(output) / "broken"))
        try:
            run_evaluations(tiny_clip(), EvalConfig(workers=0, zeroshot=[broken]), device="cpu", dist_info=info)
            error = ""
        except ValueError as raised:
            error = str(raised)
        # Stop checks: the same number on every rank, though the ranks' slices differ (9 images: 4 and 5).
        from clip.evaluation import features

        features.BATCHES_BETWEEN_STOP_CHECKS = 2  # this process only: several check points in tiny datasets
        stop_checks = []
        single_image_batches = dataclasses.replace(config, batch_size=1)
        run_evaluations(
            tiny_clip(), single_image_batches, device="cpu", dist_info=info, stop_check=lambda: stop_checks.append(1)
        )
        # One rank alone gets non-finite class embeddings: it raised while building the classifier, and the other
        # waited for it in the counts' all-reduce. Judged after that all-reduce, both record NaN alike.
        lopsided = tiny_clip()
        if rank == 1:
            with torch.no_grad():
                lopsided.token_embedding.weight.fill_(float("nan"))
        shapes_only = EvalConfig(workers=0, zeroshot=config.zeroshot[:1])
        lopsided_metrics = run_evaluations(lopsided, shapes_only, device="cpu", dist_info=info)
        report = {"metrics": metrics, "warnings": warnings.messages, "error": error, "stop_checks": len(stop_checks),
                  "lopsided": {key: str(value) for key, value in lopsided_metrics.items()}}
        Path(output, f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The data folder and each rank's report (see `worker`)."""
    root = tmp_path_factory.mktemp("two_ranks")
    manifest = write_caption_manifest(root, 7)
    write_data_with_unreadable_images(root / "more")
    for name in ("a", "b"):  # one unreadable image per class, so each rank has one and skips it
        (root / "broken" / name).mkdir(parents=True)
        (root / "broken" / name / "0.png").write_bytes(b"")
    spawn_ranks(worker, (free_port(), str(manifest), str(root)), nprocs=WORLD_SIZE)
    return root, [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def test_two_ranks_return_the_single_process_metrics(two_ranks):
    root, reports = two_ranks
    single = run_evaluations(tiny_clip(), eval_config(root / "captions.jsonl", root / "more"), device="cpu")
    assert single["retrieval/half_broken/num_skipped"] == 2  # rank 1's images, all of them
    for report in reports:
        ranked = report["metrics"]
        assert ranked.keys() == single.keys()
        for key, value in single.items():
            assert ranked[key] == pytest.approx(value, abs=1e-9), key


def test_a_classifier_non_finite_on_one_rank_is_judged_on_every_rank_alike(two_ranks):
    _, reports = two_ranks
    assert [report["lopsided"] for report in reports] == [{"zeroshot/shapes/top1": "nan"}] * WORLD_SIZE


def test_only_rank_0_warns_about_the_data(two_ranks):
    _, reports = two_ranks
    first = "\n".join(reports[0]["warnings"])
    assert "zero-shot folder: skipped 1 unreadable image(s)" in first
    # All of them rank 1's: the example still comes with the line (it was left out when rank 0 had none).
    assert "retrieval half_broken: skipped 2 unreadable image(s); e.g. cannot read image " in first
    assert "half_broken_2.png" in first
    assert "several classes share the name(s) ['red']" in first
    assert reports[1]["warnings"] == []


def test_every_rank_makes_the_same_stop_checks(two_ranks):
    # Each stop check is a collective in training: a rank with one more batch must not make one more check.
    first, second = (report["stop_checks"] for report in two_ranks[1])
    assert first == second > 4  # 4 datasets: one check before each, and more inside


def test_a_stop_check_abandons_the_evaluation_and_restores_the_mode(tmp_path):
    class Abandon(Exception):
        pass

    calls = []

    def stop_at_the_second_call():
        calls.append(1)
        if len(calls) == 2:
            raise Abandon

    model = tiny_clip().train()
    config = eval_config(write_caption_manifest(tmp_path, 3))
    with pytest.raises(Abandon):
        run_evaluations(model, dataclasses.replace(config, batch_size=1), device="cpu", stop_check=stop_at_the_second_call)
    assert len(calls) == 2 and model.training  # the first check is before the first dataset, the second inside it


def test_stop_check_points_are_the_batches_every_rank_has():
    from clip.evaluation.features import batches_on_every_rank, shard_bounds, with_stop_checks

    for length in range(0, 40):
        for world_size in (1, 2, 3, 4):
            for batch_size in (1, 3, 8):
                slices = [shard_bounds(length, rank, world_size) for rank in range(world_size)]
                fewest = min(math.ceil((stop - start) / batch_size) for start, stop in slices)
                assert batches_on_every_rank(length, world_size, batch_size) == fewest
    for checked, expected_calls in ((21, 2), (20, 1), (math.inf, 2)):
        calls = []
        assert list(with_stop_checks(range(25), lambda: calls.append(1), checked)) == list(range(25))
        assert len(calls) == expected_calls  # before items 10 and 20 of those checked; none before the first


def test_every_rank_refuses_a_dataset_without_a_readable_image(two_ranks):
    # Both ranks raise after the all-reduce, so neither is left waiting in a collective (the spawn would time out).
    for report in two_ranks[1]:
        assert report["error"] == "zero-shot broken: none of its 2 images is readable"


@pytest.mark.skipif(not hasattr(__import__("signal"), "sigwaitinfo"), reason="workers keep torch's signal handling here")
def test_evaluation_workers_outlive_a_schedulers_sigterm():
    # A pre-emption notice during an evaluation inside training reaches every process of the job: the
    # evaluation's workers must leave it to the trainer (which checkpoints), not die and take the run along.
    import subprocess
    import time

    from clip.evaluation.features import make_loader

    dataset = torch.utils.data.TensorDataset(torch.arange(64).float())
    loader = iter(make_loader(dataset, batch_size=4, workers=2, device="cpu"))
    next(loader)
    for worker in loader._workers:
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
    time.sleep(0.5)  # a worker's death would raise here, from torch's SIGCHLD handler
    assert len(list(loader)) == 15


def _report_signal_mask(connection) -> None:
    connection.send(sorted(int(s) for s in __import__("signal").pthread_sigmask(__import__("signal").SIG_BLOCK, [])))


@pytest.mark.skipif(not hasattr(__import__("signal"), "sigwaitinfo"), reason="workers keep torch's signal handling here")
def test_workers_hold_job_signals_from_their_first_instruction():
    # Between the fork and worker_init_fn, torch's own worker handler would die of a scheduler's SIGTERM;
    # the worker is forked with the job's signals blocked instead, and the parent's mask is left as it was.
    import multiprocessing
    import signal

    from clip.data.loader import ForkWithJobSignalsHeld

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    receiving, sending = multiprocessing.Pipe(duplex=False)
    process = ForkWithJobSignalsHeld().Process(target=_report_signal_mask, args=(sending,))
    process.start()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
    assert {int(signal.SIGTERM), int(signal.SIGINT)} <= set(receiving.recv())
    process.join(timeout=30)
    assert process.exitcode == 0
