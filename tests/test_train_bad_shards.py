"""Issue 4's end-to-end check: a training run over WebDataset shards in which 5% of the samples are bad, one
of every kind a shard can hold. The run completes, the skip and repair counts in metrics.jsonl are exact,
every good sample is trained on once in the first epoch, and a run stopped mid-epoch (two data workers, a
shuffle buffer) resumes to the same batches in the same order and the same weights as an uninterrupted one."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_decoding import REPAIRED, SKIPPED
from test_data_helpers import caption_of, image_bytes
from test_train_loop import tiny_config

import clip.train
from clip import checkpoint as ckpt
from clip.tokenizer import get_tokenizer
from clip.train import train

SHARDS, PER_SHARD = 10, 20
BATCH, CONTEXT = 16, 16
LONG_CAPTION = caption_of(7) + " and on" * 30  # cut by the tokenizer: counted as caption_truncated

# Members of one sample: (extension, bytes) pairs. Samples a shard can hold that must be skipped, by kind:
# the decoding failures shared with the manifest tests, plus samples that lack a member.
BAD_SAMPLES = [(kind, [("jpg", data), ("txt", caption)]) for data, caption, kind in SKIPPED.values() if data is not None]
BAD_SAMPLES += [
    ("missing_image", [("txt", b"a caption without its image")]),
    ("missing_caption", [("jpg", image_bytes(500))]),
]


def write_shards(folder: Path) -> tuple[str, list[str], Counter, Counter]:
    """200 samples in 10 shards with a sizes.json: 10 bad ones (5%) at fixed random places -- the last a
    sample cut off by a truncated tar -- and 190 good ones, of which 5 need repair and 1 has an over-long
    caption. Returns the shard pattern, the good captions, and the expected skip and repair counts."""
    total = SHARDS * PER_SHARD
    good = [(caption_of(i), [("jpg", image_bytes(i)), ("txt", caption_of(i).encode())]) for i in range(184)]
    good += [(caption_of(200 + n), [("png" if "png" in name else "jpg", make()), ("txt", caption_of(200 + n).encode())])
             for n, (name, (make, _)) in enumerate(REPAIRED.items())]
    good.append((LONG_CAPTION, [("jpg", image_bytes(7)), ("txt", LONG_CAPTION.encode())]))
    assert len(good) + len(BAD_SAMPLES) == total - 1  # the last place is the truncated tar's sample

    bad_places = sorted(np.random.default_rng(4).choice(total - 1, size=len(BAD_SAMPLES), replace=False).tolist())
    samples: list[list[tuple[str, bytes]]] = [members for _, members in good]
    for place, (_, members) in zip(bad_places, BAD_SAMPLES):
        samples.insert(place, members)
    samples.append([("jpg", image_bytes(999)), ("txt", b"lost in the truncated tar")])

    sizes = {}
    for shard in range(SHARDS):
        name = f"part-{shard:05d}.tar"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for index in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
                for extension, payload in samples[index]:
                    info = tarfile.TarInfo(f"{index:06d}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        data = buffer.getvalue()
        if shard == SHARDS - 1:  # cut inside the last sample's image: a shard copy that was interrupted
            header = data.rindex(f"{SHARDS * PER_SHARD - 1:06d}.jpg".encode())  # the name opens its tar header
            data = data[: header + 512 + 100]
        (folder / name).write_bytes(data)
        sizes[name] = PER_SHARD  # what the index says, also for the truncated shard
    (folder / "sizes.json").write_text(json.dumps(sizes))

    skipped = Counter(kind for kind, _ in BAD_SAMPLES) + Counter({"shard_read_error": 1})
    repaired = Counter(kind for _, kind in REPAIRED.values()) + Counter({"caption_truncated": 1})
    return str(folder / f"part-{{00000..{SHARDS - 1:05d}}}.tar"), [caption for caption, _ in good], skipped, repaired


def shard_run(run_dir: Path, pattern: str, steps: int) -> list[str]:
    """Overrides for a tiny model trained on the shards with two data workers (the demo's synthetic source
    replaced as a whole: its num_samples would otherwise stand in for the size index)."""
    return [
        f'data.sources=[{{kind = "shards", path = "{pattern}", name = "web"}}]',
        "data.workers=2", "data.shuffle_buffer=8", "data.max_image_pixels=2000",
        f"train.batch_size={BATCH}", f"model.text.context_length={CONTEXT}",
        f"schedule.steps={steps}", "checkpoint.every_n_steps=5", "eval.every_n_steps=0",
    ]


@pytest.fixture
def trained_batches(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[torch.Tensor]]:
    """The token ids of every batch the training loop steps on, per run directory."""
    seen: dict[str, list[torch.Tensor]] = {}
    step = clip.train.contrastive_step

    def recording_step(module, images, texts, *args, **kwargs):
        # the trainer cuts each batch after its last end-of-text token: pad back to the whole context
        seen.setdefault(current["run"], []).append(torch.nn.functional.pad(texts.cpu(), (0, CONTEXT - texts.shape[-1])))
        return step(module, images, texts, *args, **kwargs)

    current = {"run": ""}
    monkeypatch.setattr(clip.train, "contrastive_step", recording_step)
    seen["__current__"] = current  # type: ignore[assignment]
    return seen


def run(config_args: list[str], run_dir: Path, batches: dict, **kwargs) -> dict:
    batches["__current__"]["run"] = run_dir.name
    return train(tiny_config(run_dir, *config_args), **kwargs)


def test_training_over_shards_with_bad_samples_counts_them_and_resumes_exactly(tmp_path, trained_batches):
    pattern, good_captions, expected_skips, expected_repairs = write_shards(tmp_path)
    steps = 14  # 224 samples: the whole first epoch (190 usable) and the start of the second

    run(shard_run(tmp_path, pattern, steps), tmp_path / "straight", trained_batches)
    run(shard_run(tmp_path, pattern, steps), tmp_path / "resumed", trained_batches, stop_at_step=7)
    assert ckpt.list_checkpoints(tmp_path / "resumed")[0][0] == 7  # resumes from here, mid data epoch
    run(shard_run(tmp_path, pattern, steps), tmp_path / "resumed", trained_batches)

    # The resumed run trained on the same batches in the same order, and ended with the same weights.
    straight, resumed = trained_batches["straight"], trained_batches["resumed"]
    assert len(straight) == len(resumed) == steps
    for number, (a, b) in enumerate(zip(straight, resumed)):
        assert torch.equal(a, b), f"batch {number} differs after resuming"
    weights = {run_dir: ckpt.load_latest_checkpoint(tmp_path / run_dir)["model"] for run_dir in ("straight", "resumed")}
    for name, tensor in weights["straight"].items():
        assert torch.equal(tensor, weights["resumed"][name]), name

    # The first data epoch used every good sample exactly once and no bad one. Batches alternate between
    # the two workers, each working through its own half of the epoch, so some split of the 190 samples
    # between the workers' streams must be exactly the good captions' token rows.
    expected_rows = Counter(map(tuple, get_tokenizer()(good_captions, context_length=CONTEXT, truncate=True).tolist()))
    per_worker = [[tuple(row) for batch in straight[w::2] for row in batch.tolist()] for w in (0, 1)]
    usable = len(good_captions)
    assert any(
        Counter(per_worker[0][:first]) + Counter(per_worker[1][: usable - first]) == expected_rows
        for first in range(usable + 1)
    )

    # That epoch's counts, reported once both workers had finished it, are exact; both runs report them.
    for run_dir in ("straight", "resumed"):
        records = [json.loads(line) for line in (tmp_path / run_dir / "metrics.jsonl").open()]
        finished = [r["data"]["finished_epoch"] for r in records if r.get("data", {}).get("finished_epoch")]
        assert finished and finished[0]["epoch"] == 0, run_dir
        counts = finished[0]["sources"]["web"]
        assert counts["samples"] == usable
        assert Counter(counts["skipped"]) == expected_skips, run_dir
        assert Counter(counts["repaired"]) == expected_repairs, run_dir
        assert [r for r in records if "data" in r][-1]["data"]["sources"]["web"]["samples"] == steps * BATCH
