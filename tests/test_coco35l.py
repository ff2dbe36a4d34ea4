"""COCO-35L: caption lines in the real format mapped onto photos, dropped rows counted, .bz2 and .jsonl alike,
English deduplicated, errors that name what to fix, and prepare_coco35l end to end through the mirror and cache."""
import bz2
import dataclasses
import io
import json
import shutil
import unicodedata
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import clip_utils as cu
from clip_utils.scale import coco35l

# (cocoid, folder): four photos; 318219's file is never written (missing on disk)
PHOTOS = {391895: "val2014", 522418: "val2014", 184613: "train2014", 318219: "train2014"}
NOT_IN_KARPATHY = 999999
HINDI = {  # matras, conjuncts (क्च, स्त्र, ट्र), nukta letters, anusvara and chandrabindu
    "391895_0": ("a man with a red helmet on a small moped on a dirt road",
                 "एक आदमी कच्ची सड़क पर छोटी मोपेड पर लाल हेलमेट पहने हुए है।"),
    "391895_1": ("man riding a motor bike on a dirt road on the countryside",
                 "ग्रामीण इलाक़े में कच्ची सड़क पर मोटरसाइकिल चलाता आदमी"),
    "522418_0": ("a woman wearing a net on her head cutting a cake",
                 "सिर पर जाली पहने एक स्त्री केक काट रही है, मुँह पर मुस्कान"),
    "184613_2": ("a child holding a flowered umbrella and petting a yak",
                 "फूलों वाला छाता पकड़े एक बच्चा ट्रक के पास याक को सहला रहा है"),
    "318219_0": ("a computer monitor on a desk", "मेज़ पर एक कंप्यूटर मॉनिटर"),
    f"{NOT_IN_KARPATHY}_0": ("a cat on a sofa", "सोफ़े पर एक बिल्ली"),
}
GERMAN = {"391895_0": "Ein Mann mit rotem Helm auf einem kleinen Moped auf einem Feldweg",
          "522418_0": "Eine Frau mit einem Netz auf dem Kopf schneidet einen Kuchen"}


def _file_name(cocoid, folder=None):
    folder = folder or PHOTOS[cocoid]
    return f"COCO_{folder}_{cocoid:012d}.jpg"


def _jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "JPEG")
    return buffer.getvalue()


def _lines(hindi=HINDI, german=GERMAN) -> str:
    """Caption lines as coco_mt_*.jsonl holds them: one per (caption, target language), languages interleaved."""
    records = []
    for key, (english, translation) in hindi.items():
        records.append(dict(image_id=key, src_lang="en", trg_lang="hi", caption_tokenized=english,
                            translation_tokenized=translation))
        if key in german:
            records.append(dict(image_id=key, src_lang="en", trg_lang="de", caption_tokenized=english,
                                translation_tokenized=german[key]))
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _karpathy(photos=PHOTOS) -> str:
    images = [dict(filepath=folder, filename=_file_name(cocoid, folder), cocoid=cocoid, split="train", sentences=[])
              for cocoid, folder in photos.items()]
    return json.dumps({"images": images, "dataset": "coco"})


@pytest.fixture
def coco(tmp_path):
    """(captions.jsonl, dataset_coco.json, image root) with every photo on disk except 318219's."""
    for i, (cocoid, folder) in enumerate(PHOTOS.items()):
        if cocoid != 318219:
            (tmp_path / folder).mkdir(exist_ok=True)
            (tmp_path / folder / _file_name(cocoid)).write_bytes(_jpeg((40 * i, 80, 120)))
    (tmp_path / "captions.jsonl").write_text(_lines(), encoding="utf-8")
    (tmp_path / "dataset_coco.json").write_text(_karpathy(), encoding="utf-8")
    return tmp_path / "captions.jsonl", tmp_path / "dataset_coco.json", tmp_path


def test_lines_map_onto_photos_and_dropped_rows_are_counted(coco):
    with pytest.warns(UserWarning, match=r"dropped 1 captions of COCO ids not in .*\[999999\].* and 1 captions "
                                         r"of photos missing .*COCO_train2014_000000318219\.jpg"):
        table = coco35l.load_coco35l(*coco)
    assert list(table.columns) == ["image", "caption", "english", "coco_id"]
    kept = ["391895_0", "391895_1", "522418_0", "184613_2"]
    assert table["caption"].tolist() == [unicodedata.normalize("NFC", HINDI[k][1]) for k in kept]
    assert table["caption"].tolist() == [HINDI[k][1] for k in kept]  # the fixture is NFC: nothing else changes
    assert table["english"].tolist() == [HINDI[k][0] for k in kept]
    assert table["coco_id"].tolist() == [391895, 391895, 522418, 184613]
    root = coco[2]
    assert table["image"].tolist() == [str(root / PHOTOS[i] / _file_name(i)) for i in table["coco_id"]]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in table["image"])


def test_other_languages_and_one_spelling_of_nukta_letters(coco, tmp_path):
    german = coco35l.load_coco35l(*coco, language="de")
    assert german["caption"].tolist() == list(GERMAN.values()) and set(german["coco_id"]) == {391895, 522418}
    raw = "पहा\u095c पर  साइकिल"  # precomposed ड़ (U+095C): NFC writes it ड + nukta; doubled space
    lines = _lines(hindi={"391895_0": ("a bicycle on a hill", raw)}, german={})
    (tmp_path / "one.jsonl").write_text(lines, encoding="utf-8")
    (caption,) = coco35l.load_coco35l(tmp_path / "one.jsonl", *coco[1:])["caption"]
    assert caption == "पहा\u0921\u093c पर साइकिल" == unicodedata.normalize("NFC", "पहा\u095c पर साइकिल")


def test_bz2_reads_the_same_as_jsonl(coco, tmp_path):
    with bz2.open(tmp_path / "captions.jsonl.bz2", "wt", encoding="utf-8") as f:
        f.write(_lines())
    with pytest.warns(UserWarning, match="dropped"):
        plain = coco35l.load_coco35l(*coco)
    with pytest.warns(UserWarning, match="dropped"):
        packed = coco35l.load_coco35l(tmp_path / "captions.jsonl.bz2", *coco[1:])
    pd.testing.assert_frame_equal(packed, plain)
    assert len(packed) == 4


def test_english_once_per_caption(coco):
    with pytest.warns(UserWarning, match="dropped 1 captions"):
        english = coco35l.load_coco35l(*coco, language="en")
    # 391895_0 and 522418_0 come in a Hindi and a German line: once each
    assert english["caption"].tolist() == [HINDI[k][0] for k in ("391895_0", "391895_1", "522418_0", "184613_2")]
    assert (english["caption"] == english["english"]).all()


def test_errors_say_what_to_fix(coco, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"has no 'xx' captions; its languages are de, hi$"):
        coco35l.load_coco35l(*coco, language="xx")
    with pytest.raises(ValueError, match=r"has no 'fr' captions; its languages are de, hi$"):
        coco35l.load_coco35l(*coco, language="fr")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="none"):
        coco35l.load_coco35l(tmp_path / "empty.jsonl", *coco[1:])
    (tmp_path / "bad.jsonl").write_text(_lines() + '{"image_id": "1_0", "trg_lang": "hi"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl line 9 is not a COCO-35L caption line"):
        coco35l.load_coco35l(tmp_path / "bad.jsonl", *coco[1:])
    with pytest.raises(ValueError, match=r"all 6 'hi' captions .* dropped: 1 .* 5 of photos missing.*image_root"):
        coco35l.load_coco35l(coco[0], coco[1], tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unknown language 'xx'; COCO-35L has ar, bn, .*, zh$"):
        coco35l.prepare_coco35l(tmp_path / "data", language="xx")  # before any download
    monkeypatch.setenv("CLIP_HINDI_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(FileNotFoundError, match=r"mirror has no coco_mt_train.jsonl.bz2"):
        coco35l.download_coco35l(tmp_path / "data")
    assert not (tmp_path / "data").exists()


def _mirror(folder: Path) -> Path:
    """The five COCO-35L files in their real layouts: two image zips, the Karpathy zip, two .jsonl.bz2."""
    photos = {**PHOTOS, 203564: "val2014", 179765: "val2014", 190236: "train2014"}
    folder.mkdir()
    for zip_name in ("train2014", "val2014"):
        with zipfile.ZipFile(folder / f"{zip_name}.zip", "w") as zf:
            for i, (cocoid, name) in enumerate(photos.items()):
                if name == zip_name:
                    zf.writestr(f"{name}/{_file_name(cocoid, name)}", _jpeg((30 * i, 60, 90)))
    with zipfile.ZipFile(folder / "caption_datasets.zip", "w") as zf:
        zf.writestr("dataset_coco.json", _karpathy(photos))
        zf.writestr("dataset_flickr8k.json", json.dumps({"images": [], "dataset": "flickr8k"}))
    train = {k: HINDI[k] for k in ("184613_2", "391895_0")}  # 391895 is a dev image too: dropped from train
    train["190236_0"] = ("a kitchen with a stove", "चूल्हे वाली एक रसोई")
    dev = {"391895_1": HINDI["391895_1"], "522418_0": HINDI["522418_0"],
           "203564_0": ("a bicycle near a clock", "घड़ी के पास एक साइकिल"),
           "179765_0": ("a motorcycle parked", "खड़ी हुई एक मोटरसाइकिल"),
           "179765_1": ("a black honda motorcycle", "एक काली होंडा मोटरसाइकिल")}
    for split, hindi in (("train", train), ("dev", dev)):
        with bz2.open(folder / f"coco_mt_{split}.jsonl.bz2", "wt", encoding="utf-8") as f:
            f.write(_lines(hindi=hindi))
    return folder


def test_prepare_end_to_end_through_the_mirror_then_the_cache(tmp_path, monkeypatch, tiny_cfg, tiny_model):
    monkeypatch.setenv("CLIP_HINDI_MIRROR", str(_mirror(tmp_path / "mirror")))
    data = tmp_path / "data"
    with pytest.warns(UserWarning, match="dropped 1 train captions of 1 images that are also in coco_mt_dev"):
        train, val, test = coco35l.prepare_coco35l(data)
    assert (data / "train2014" / "COCO_train2014_000000184613.jpg").exists()
    assert (data / "downloads" / "coco_mt_dev.jsonl.bz2").exists()
    assert sorted(train["coco_id"]) == [184613, 190236]
    assert sorted(pd.concat([val, test])["coco_id"]) == [179765, 179765, 203564, 391895, 522418]
    assert len(set(val["image"])) == len(set(test["image"])) == 2  # 4 dev images, half each
    splits = (train, val, test)
    for i, a in enumerate(splits):
        assert all(Path(p).is_relative_to(data.resolve()) and Path(p).exists() for p in a["image"])
        assert all(any("\u0900" <= ch <= "\u097f" for ch in c) for c in a["caption"])
        for b in splits[i + 1:]:
            assert not set(a["image"]) & set(b["image"])
    assert {p.name for p in (data / "coco35l_hi").iterdir()} == {"train.csv", "val.csv", "test.csv", "source.json"}
    assert cu.table_source(data / "coco35l_hi").startswith("COCO-35L's hi captions")

    # the table goes on to shards and a streamed batch (the --data coco35l --shards path of the command line)
    cfg = dataclasses.replace(tiny_cfg, batch_size=2)
    folder = cu.write_shards(pd.concat([val, test]), tmp_path / "shards", cfg, rows_per_shard=3)
    batch = next(iter(cu.stream_loader(folder, tiny_model[1], cfg)))
    assert batch["images"].shape == (2, 3, cfg.image_size, cfg.image_size)

    shutil.rmtree(tmp_path / "mirror")  # finished downloads need no mirror (nor internet)
    assert coco35l.download_coco35l(data) == {"train": data / "downloads" / "coco_mt_train.jsonl.bz2",
                                              "dev": data / "downloads" / "coco_mt_dev.jsonl.bz2",
                                              "karpathy": data / "dataset_coco.json", "images": data}

    # only the CSVs can serve a second call: the mirror, caption files and Karpathy file are gone
    shutil.rmtree(data / "downloads")
    (data / "dataset_coco.json").unlink()
    again = coco35l.prepare_coco35l(data)
    for first, second in zip(splits, again):
        pd.testing.assert_frame_equal(second, first)
    with pytest.raises(FileNotFoundError):  # another split of dev is another source: it must rebuild (and cannot)
        coco35l.prepare_coco35l(data, val_frac=0.25)
