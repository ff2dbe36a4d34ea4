"""Data at scale: webdataset shards round-trip a table, every process streams the same number of batches,
fit trains from shards, and the decode-once cache gives the pixels decoding gives."""
import dataclasses
import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import clip_utils as cu
from clip_utils.scale.shards import _samples
from clip_utils.scale.shards import _ShardStream as ShardStream


@pytest.fixture(scope="module")
def shards(synthetic, tiny_cfg, tmp_path_factory):
    _, train, _, _ = synthetic
    return cu.write_shards(train, tmp_path_factory.mktemp("shards"), tiny_cfg, rows_per_shard=40), train


def _all_samples(folder):
    index = cu.read_index(folder)
    return [parts for shard in index["shards"] for parts in _samples(folder / shard["name"])]


def test_shards_round_trip_the_table(shards):
    folder, table = shards
    index = cu.read_index(folder)
    samples = _all_samples(folder)
    assert index["rows"] == len(samples) == len(table) and index["images"] == table["image"].nunique()
    assert [s["rows"] for s in index["shards"]] == [40] * (len(table) // 40) + [len(table) % 40] * bool(len(table) % 40)
    rows = [(json.loads(s["json"])["image"], s["txt"].decode()) for s in samples]
    assert Counter(rows) == Counter(zip(table["image"], table["caption"]))  # every row once, Hindi intact
    ids = {}
    for s in samples:
        meta = json.loads(s["json"])
        assert s["png"] == Path(meta["image"]).read_bytes()  # the file's own bytes
        assert ids.setdefault(meta["image"], meta["image_id"]) == meta["image_id"]  # one id per image...
    assert len(set(ids.values())) == len(ids)  # ...and a different one for each


def test_the_webdataset_library_reads_our_shards(shards):
    webdataset = pytest.importorskip("webdataset")
    folder, table = shards
    names = [str(folder / s["name"]) for s in cu.read_index(folder)["shards"]]
    samples = list(webdataset.WebDataset(names, shardshuffle=False).decode("rgb8"))
    assert len(samples) == len(table)
    first = _all_samples(folder)[0]
    assert samples[0]["txt"] == first["txt"].decode() and samples[0]["json"] == json.loads(first["json"])
    assert np.array_equal(samples[0]["png"], cu.load_image(json.loads(first["json"])["image"]))  # the same pixels


@pytest.mark.parametrize("world, workers, rows_per_shard, rows, batch_size", [
    (1, 0, 40, None, 6), (2, 0, 40, None, 6), (3, 2, 40, None, 6),  # uneven shards: the last is short
    (2, 2, 200, None, 6),  # 2 shards for 2 x 2 readers: every reader keeps every 4th sample
    (4, 0, 3, 9, 4),  # 3 shards of 3 rows for 4 readers: the 4th reader's samples lie in no single shard
])
def test_every_process_streams_the_same_number_of_batches_and_no_row_twice(synthetic, tiny_cfg, tmp_path, world,
                                                                           workers, rows_per_shard, rows, batch_size):
    _, train, _, _ = synthetic
    table = train.head(rows) if rows else train
    cfg = dataclasses.replace(tiny_cfg, batch_size=batch_size)
    folder = cu.write_shards(table, tmp_path, cfg, rows_per_shard=rows_per_shard)
    _, tokenizer = cu.build_model(cfg, captions=train["caption"])
    counts, seen = [], Counter()
    for rank in range(world):
        transform = cu.image_transforms(cfg, train=True)
        stream = ShardStream(folder, tokenizer, cfg, rank, world, 1, transform, workers)
        batches = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers))
        assert len(batches) == len(stream) > 0
        assert all(len(b["input_ids"]) == batch_size // world for b in batches)
        assert all(b["images"].shape[-1] == cfg.image_size for b in batches)
        counts.append(len(batches))
        seen.update((int(i), tuple(t[m.bool()].tolist())) for b in batches
                    for i, t, m in zip(b["image_ids"], b["input_ids"], b["attention_mask"]))
    assert len(set(counts)) == 1  # the same number of batches on every process
    assert max(seen.values()) == 1  # no row twice in an epoch
    readers = world * max(workers, 1)
    assert sum(seen.values()) >= len(table) - readers * (batch_size // world + rows_per_shard)  # and few left out


def test_each_epoch_streams_another_order(shards, tiny_cfg, tiny_model):
    folder, _ = shards
    _, tokenizer = tiny_model
    orders = [[int(i) for b in cu.stream_loader(folder, tokenizer, tiny_cfg, epoch=epoch) for i in b["image_ids"]]
              for epoch in (1, 1, 2)]
    assert orders[0] == orders[1] != orders[2]


def test_fit_trains_from_a_shard_folder(shards, synthetic, tiny_cfg, tmp_path):
    folder, train = shards
    _, _, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, epochs=3, out_dir=str(tmp_path))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    history = cu.fit(model, tokenizer, folder, val, cfg)
    assert len(history) == 3 and history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    with pytest.raises(ValueError, match="hard_negatives"):
        cu.fit(model, tokenizer, folder, val, dataclasses.replace(cfg, hard_negatives=4))


@pytest.mark.parametrize("geometry", ["square", "crop"])
def test_the_decode_once_cache_gives_the_pixels_decoding_gives(geometry, synthetic, tiny_cfg, tmp_path):
    _, train, _, _ = synthetic
    rng = np.random.default_rng(0)
    sizes = [(60, 80), (80, 60), (50, 50), (40, 90), (90, 45)]  # (H, W): landscape, portrait, square, panoramas
    for k, (height, width) in enumerate(sizes):  # "crop" keeps each photo's own aspect ratio in the cache
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
    odd = pd.DataFrame({"image": [str(tmp_path / f"{k % 5}.png") for k in range(15)],
                        "caption": list(train["caption"].head(15))})
    table = pd.concat([train.head(25), odd], ignore_index=True)
    crop = dict(crop_pct=0.9, interpolation="bicubic")
    plain_cfg = dataclasses.replace(tiny_cfg, image_geometry=geometry)
    cached_cfg = dataclasses.replace(plain_cfg, image_cache=str(tmp_path / "cache"))
    _, tokenizer = cu.build_model(tiny_cfg, captions=train["caption"])
    plain = cu.make_loader(table, tokenizer, plain_cfg, train=True, **crop)
    cached = cu.make_loader(table, tokenizer, cached_cfg, train=True, **crop)
    assert cached.dataset.cache and not plain.dataset.cache
    shapes = np.load(Path(cached.dataset.cache).with_suffix(".index.npy"))  # (I, 3): offset, height, width
    assert len(shapes) == table["image"].nunique()
    side = tiny_cfg.image_size if geometry == "square" else int(tiny_cfg.image_size / 0.9)
    assert (shapes[:, 1:].min(1) == side).all()  # the shorter side at what the transform resizes it to
    assert (shapes[:, 1] == shapes[:, 2]).all() == (geometry == "square")  # "crop" keeps the photos' ratios
    for loader in (plain, cached):
        loader.generator.manual_seed(0)
        loader.dataset.transform.set_random_seed(0)
    for a, b in zip(plain, cached):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["image_ids"], b["image_ids"])
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 2  # the pixels and their index, no temporary file left behind
    stamps = [os.stat(f).st_mtime_ns for f in files]
    cu.make_loader(table, tokenizer, cached_cfg, train=True, **crop)  # the same table again: the same files, untouched
    assert sorted((tmp_path / "cache").iterdir()) == files and [os.stat(f).st_mtime_ns for f in files] == stamps
    cu.make_loader(table, tokenizer, dataclasses.replace(cached_cfg, image_size=24), train=True, **crop)
    assert len(list((tmp_path / "cache").iterdir())) == 4  # another size, other files
    other = "crop" if geometry == "square" else "square"
    cu.make_loader(table, tokenizer, dataclasses.replace(cached_cfg, image_geometry=other), train=True, **crop)
    assert len(list((tmp_path / "cache").iterdir())) == 6  # another geometry, other files
    assert not cu.make_loader(table, tokenizer, cached_cfg, train=False).dataset.cache  # evaluation decodes


def test_fit_with_the_cache_repeats_fit_without(synthetic, tiny_cfg, tmp_path):
    _, train, val, _ = synthetic
    histories = []
    for cache in ("", str(tmp_path / "cache")):
        cfg = dataclasses.replace(tiny_cfg, epochs=2, image_cache=cache, out_dir=str(tmp_path / f"run{len(cache)}"))
        model, tokenizer = cu.build_model(cfg, captions=train["caption"])
        histories.append(cu.fit(model, tokenizer, train, val, cfg))
    columns = ["train_loss", "val_loss", "temperature"]
    pd.testing.assert_frame_equal(histories[0][columns], histories[1][columns])


def test_shards_are_rewritten_only_for_another_table_and_max_side_shrinks_photos(synthetic, tiny_cfg, tmp_path):
    _, train, _, _ = synthetic
    table = train.head(20)
    folder = cu.write_shards(table, tmp_path, tiny_cfg, rows_per_shard=8)
    stamp = (folder / "index.json").stat().st_mtime_ns
    cu.write_shards(table, tmp_path, tiny_cfg, rows_per_shard=8)  # the same table: kept
    assert (folder / "index.json").stat().st_mtime_ns == stamp
    cu.write_shards(train.head(12), tmp_path, tiny_cfg, rows_per_shard=8)  # another table: written again
    assert cu.read_index(folder)["rows"] == 12 and len(list(folder.glob("shard-*.tar"))) == 2
    small = cu.write_shards(table, tmp_path / "small", tiny_cfg, max_side=40)
    photos = [s["jpg"] for s in _all_samples(small)]
    assert len(photos) == 20
    assert all(min(cu.load_image(io.BytesIO(p)).shape[:2]) == 40 for p in photos)  # 96 px scenes, shorter side 40


def test_shards_are_rewritten_when_a_photo_is_replaced_under_its_name(synthetic, tiny_cfg, tmp_path):
    _, train, _, _ = synthetic
    photos = [shutil.copy(p, tmp_path) for p in train["image"].unique()[:4]]
    table = pd.DataFrame({"image": photos * 2, "caption": list(train["caption"].head(8))})
    folder = cu.write_shards(table, tmp_path / "shards", tiny_cfg)
    stamp = (folder / "index.json").stat().st_mtime_ns
    cu.write_shards(table, folder, tiny_cfg)
    assert (folder / "index.json").stat().st_mtime_ns == stamp  # nothing changed: kept
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(photos[0])  # a new photo, the same name and rows
    cu.write_shards(table, folder, tiny_cfg)
    assert (folder / "index.json").stat().st_mtime_ns != stamp  # written again with the new pixels
