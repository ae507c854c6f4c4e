"""Helpers shared by the tests/test_data_*.py files (tiny images, shards, manifests, a byte tokenizer), and
tests of the small building blocks they rely on."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip.data import DataConfig, SourceConfig, build_train_data
from clip.data.packed import PackedStrings, PackedStringsBuilder

IMAGE_SIZE = 16
SOT, EOT = 257, 258


class ByteTokenizer:
    """A stand-in tokenizer with the trainer's calling convention: [SOT, byte + 1 ..., EOT], zero-padded.
    Its rows decode back to the caption, so tests can tell which sample each row is."""

    def __call__(self, texts: list[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [SOT] + [b + 1 for b in text.encode("utf-8")] + [EOT]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(f"{text!r} is too long for context_length={context_length}")
                ids = ids[:context_length]
                ids[-1] = EOT
            result[row, : len(ids)] = torch.tensor(ids)
        return result


def decode_row(row: torch.Tensor) -> str:
    ids = [int(i) for i in row if 0 < int(i) < SOT]
    return bytes(i - 1 for i in ids).decode("utf-8")


def image_bytes(index: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 20), mode: str = "RGB") -> bytes:
    """A small image whose colour depends on `index`."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def caption_of(index: int) -> str:
    return f"sample {index:05d}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, num_samples: int, per_shard: int, prefix: str = "s", index: bool = True) -> str:
    """Shards prefix-000000.tar, ... of samples 0..num_samples-1 (JPEG and PNG alternating) and a
    sizes.json; returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    shard_count = -(-num_samples // per_shard)
    sizes = {}
    for shard in range(shard_count):
        name = f"{prefix}-{shard:06d}.tar"
        members = range(shard * per_shard, min((shard + 1) * per_shard, num_samples))
        with tarfile.open(folder / name, "w") as tar:
            for i in members:
                extension, fmt = ("jpg", "JPEG") if i % 2 == 0 else ("png", "PNG")
                _add_member(tar, f"{i:09d}.{extension}", image_bytes(i, fmt))
                _add_member(tar, f"{i:09d}.txt", caption_of(i).encode())
                _add_member(tar, f"{i:09d}.json", json.dumps({"i": i}).encode())
        sizes[name] = len(members)
    if index:
        (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{prefix}-{{000000..{shard_count - 1:06d}}}.tar")


def write_manifest(folder: Path, indices: range, name: str = "train.csv") -> Path:
    """Image files in folder/images and a manifest with paths relative to folder."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in indices:
        (folder / "images" / f"{i}.jpg").write_bytes(image_bytes(i))
        rows.append((f"images/{i}.jpg", caption_of(i)))
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in rows))
    else:
        separator = "\t" if name.endswith(".tsv") else ","
        path.write_text(f"image{separator}caption\n" + "".join(f"{p}{separator}{c}\n" for p, c in rows))
    return path


def build(
    sources: list[SourceConfig], batch_size: int = 4, rank: int = 0, world_size: int = 1, seed: int = 0, **fields
):
    """TrainData over `sources` with 16-pixel images and the byte tokenizer; `fields` set DataConfig fields."""
    config = DataConfig(sources=sources, **{"workers": 0, "shuffle_buffer": 8, **fields})
    return build_train_data(
        config, image_size=IMAGE_SIZE, context_length=24, tokenizer=ByteTokenizer(), batch_size=batch_size,
        rank=rank, world_size=world_size, seed=seed,
    )


def take(data, num_batches: int) -> list[tuple[torch.Tensor, list[str]]]:
    """`num_batches` batches from a fresh iter(data) as (images, captions)."""
    batches = iter(data)
    result = []
    for _ in range(num_batches):
        images, texts = next(batches)
        result.append((images.clone(), [decode_row(row) for row in texts]))
    return result


def captions(batches: list[tuple[torch.Tensor, list[str]]]) -> list[str]:
    return [caption for _, texts in batches for caption in texts]


# ---- tests of the helpers and small pieces ---------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_truncation() -> None:
    tokens = ByteTokenizer()(["héllo", "x" * 50], context_length=10, truncate=True)
    assert decode_row(tokens[0]) == "héllo"
    assert tokens[1, -1] == EOT and len(decode_row(tokens[1])) == 8


def test_packed_strings() -> None:
    packed = PackedStrings.from_bytes([b"a", b"", "é".encode(), b"xyz"])
    assert len(packed) == 4 and [packed[i] for i in range(4)] == [b"a", b"", "é".encode(), b"xyz"]
    assert packed[-1] == b"xyz"
    with pytest.raises(IndexError):
        packed[4]
    with pytest.raises(IndexError):  # not wrapped round to packed[-1]
        packed[-5]
    assert packed.nbytes == 6 + 5 * 8  # the buffer and the int64 offsets: what a worker shares with its parent


def test_packed_strings_builder_counts_what_it_was_given() -> None:
    builder = PackedStringsBuilder()
    builder.append(b"ab")
    builder.append(b"")
    assert len(builder) == 2 and len(builder.build()) == 2


@pytest.mark.parametrize("offsets", [[], [1, 3], [0, 2], [[0, 3]]], ids=["empty", "not_from_0", "short", "2d"])
def test_packed_strings_refuse_offsets_that_do_not_cover_their_buffer(offsets) -> None:
    # Offsets ending short of the buffer, or starting past 0, read every string from the wrong bytes
    with pytest.raises(ValueError, match="offsets must start at 0 and end at the buffer's length"):
        PackedStrings(np.frombuffer(b"abc", dtype=np.uint8), np.array(offsets, dtype=np.int64))


def test_write_shards_helper(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, 7, 3)
    assert pattern.endswith("s-{000000..000002}.tar")
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert sizes == {"s-000000.tar": 3, "s-000001.tar": 3, "s-000002.tar": 1}


def test_synthetic_source_batches() -> None:
    data = build([SourceConfig(kind="synthetic", num_samples=20, synthetic_image_size=32)], batch_size=5)
    assert data.samples_per_epoch == 20 and data.batches_per_epoch == 4
    batches = take(data, 4)
    assert all(images.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) for images, _ in batches)
    assert len(Counter(captions(batches))) > 5  # varied captions
    assert data.stats()["sources"]["0:synthetic"]["samples"] == 20
    data.close()
