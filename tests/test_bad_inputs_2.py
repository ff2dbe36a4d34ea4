"""Bad input at the door, second wave: caption tables, queries and galleries, image arrays, sizes that do not
match, broken models, shards, Config values, checkpoints, files and archives. Each mistake gets a correct result,
or an error that names the column, value, file or size and says what to do; never a silent wrong result."""
import copy
import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from test_validation import _raises  # the first wave's helper: exactly this error, this message

import clip_utils as cu


@pytest.fixture
def images(tmp_path):
    """Three small readable images of different colours."""
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.new("RGB", (24, 24), (90 * i, 40, 200 - 60 * i)).save(paths[-1])
    return paths


@pytest.fixture
def truncated_jpg(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "w.jpg")
    data = (tmp_path / "w.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


SKIP = cu.Config.quick(on_bad_input="skip", image_size=32)


# -- caption tables ---------------------------------------------------------------

def test_a_column_renamed_onto_an_existing_caption_column_is_named(images):
    table = pd.DataFrame(dict(image=images, caption=["एक", "दो", "तीन"], hindi=["क", "ख", "ग"]))
    renamed = table.rename(columns={"hindi": "caption"})  # two columns named caption now
    _raises(lambda: cu.clean_table(renamed, SKIP, name="train"), r"the train table has 2 columns named 'caption'")


def test_split_by_image_names_a_repeated_image_column(images):
    table = pd.DataFrame([[images[0], images[1], "एक"]], columns=["image", "image", "caption"])
    _raises(lambda: cu.split_by_image(table), r"2 columns named 'image'")


def test_pd_na_from_convert_dtypes_is_a_missing_caption_not_the_text_na(images):
    table = pd.DataFrame(dict(image=images, caption=["एक लाल गोला", None, "एक हरा गोला"])).convert_dtypes()
    assert table["caption"].iloc[1] is pd.NA
    with pytest.warns(UserWarning, match="skipped 1 of 3 rows: 1 empty or missing caption"):
        clean = cu.clean_table(table, SKIP)
    assert "<NA>" not in set(clean["caption"]) and len(clean) == 2
    assert cu.normalize_caption(pd.NA) == "" and cu.normalize_caption(np.float32("nan")) == ""


def test_utf8_bytes_captions_are_decoded_not_written_as_a_bytes_literal(images):
    table = pd.DataFrame(dict(image=images[:2], caption=["एक लाल गोला".encode(), "एक नीला गोला"]))
    assert cu.clean_table(table, SKIP)["caption"].tolist() == ["एक लाल गोला", "एक नीला गोला"]


@pytest.mark.parametrize("cell", [b"\xff\xfe bad", 5, ["एक", "गोला"]])
def test_a_non_text_caption_is_named_and_counted(images, cell):
    captions = pd.Series(["एक लाल गोला", None], dtype=object)
    captions[1] = cell  # a spreadsheet column of mixed cells
    table = pd.DataFrame(dict(image=images[:2], caption=captions))
    with pytest.warns(UserWarning, match="skipped 1 of 2 rows: 1 non-text caption"):
        assert cu.clean_table(table, SKIP)["caption"].tolist() == ["एक लाल गोला"]
    _raises(lambda: cu.clean_table(table, dataclasses.replace(SKIP, on_bad_input="raise")),
            r"first is row 1: non-text caption \(" + type(cell).__name__)


def test_a_missing_image_path_is_named_as_such(images):
    table = pd.DataFrame(dict(image=[images[0], None], caption=["एक लाल गोला", "एक नीला गोला"]))
    _raises(lambda: cu.clean_table(table, dataclasses.replace(SKIP, on_bad_input="raise")),
            r"row 1: missing image path \((None|nan)\)")


# -- queries and galleries ----------------------------------------------------------

@pytest.mark.parametrize("query", ["   ", "\u200b\u200c \t", "\ufeff"])
def test_a_query_of_whitespace_or_invisible_characters_is_refused(images, tiny_model, tiny_cfg, query):
    model, tokenizer = tiny_model
    _raises(lambda: cu.search_images(query, model, tokenizer, images, tiny_cfg), r"query .* is empty once whitespace")


def test_encode_texts_names_an_empty_text(tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    _raises(lambda: cu.encode_texts(model, tokenizer, ["एक गोला", " \u200b", None], tiny_cfg),
            r"text 1 \(' \\u200b'\) is empty .*\(2 such\)")


@pytest.mark.parametrize("query", [["एक लाल गोला", "एक नीला गोला"], None, ("एक गोला",)])
def test_search_takes_one_query_string(images, tiny_model, tiny_cfg, query):
    model, tokenizer = tiny_model
    _raises(lambda: cu.search_images(query, model, tokenizer, images, tiny_cfg), r"takes one query string")


def test_a_series_gallery_with_its_own_index_gives_the_images_in_order(images, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    series = pd.Series(images, index=[7, 3, 5])  # e.g. test["image"].drop_duplicates()
    found = cu.search_images("एक गोला", model, tokenizer, series, tiny_cfg, k=3)
    expected = cu.search_images("एक गोला", model, tokenizer, list(images), tiny_cfg, k=3)
    assert found["image"].tolist() == expected["image"].tolist()
    assert torch.equal(cu.encode_images(model, series, tiny_cfg), cu.encode_images(model, images, tiny_cfg))


def test_an_empty_class_name_is_named(tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    embeds = torch.nn.functional.normalize(torch.randn(2, tiny_cfg.projection_dim), dim=-1)
    _raises(lambda: cu.zero_shot_classify(model, tokenizer, None, ["गोला", " \u200b"], tiny_cfg, image_embeds=embeds),
            r"class name ' \\u200b' is empty")


def test_one_image_is_not_a_gallery(images, tiny_model, tiny_cfg):
    model, _ = tiny_model
    _raises(lambda: cu.encode_images(model, images[0], tiny_cfg), r"not one image \(str\): wrap it in a list")
    _raises(lambda: cu.encode_images(model, np.zeros((24, 24, 3), np.uint8), tiny_cfg), r"not one image")


# -- images -------------------------------------------------------------------------

def test_a_truncated_jpeg_in_a_gallery_is_named(images, truncated_jpg, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    _raises(lambda: cu.encode_images(model, [*images, truncated_jpg], tiny_cfg), r"image 3 .*cut\.jpg cannot be read")
    strict = dataclasses.replace(tiny_cfg, on_bad_input="raise")
    _raises(lambda: cu.search_images("एक गोला", model, tokenizer, [truncated_jpg, *images], strict), r"cut\.jpg")


def test_search_skips_a_truncated_jpeg_with_a_counted_warning(images, truncated_jpg, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 gallery images .*cut\.jpg"):
        found = cu.search_images("एक गोला", model, tokenizer, [images[0], truncated_jpg, *images[1:]], tiny_cfg, k=4)
    assert sorted(found["image"]) == sorted(images)


def test_a_16_bit_png_mid_grey_loads_as_mid_grey(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    pixels = cu.load_image(tmp_path / "grey16.png")
    assert pixels.shape == (8, 8, 3) and pixels.dtype == np.uint8 and (pixels == 128).all()


def _same_embedding(model, cfg, a, b):
    return torch.allclose(cu.encode_images(model, [a], cfg), cu.encode_images(model, [b], cfg), atol=1e-5)


def test_a_float_array_in_0_1_embeds_like_its_uint8_pixels(images, tiny_model, tiny_cfg):
    model, _ = tiny_model
    pixels = cu.load_image(images[1])
    assert _same_embedding(model, tiny_cfg, pixels.astype(np.float32) / 255, pixels)
    assert not _same_embedding(model, tiny_cfg, pixels, np.zeros_like(pixels))  # and not like a black image


def test_matplotlib_imread_arrays_embed_like_the_file(images, tiny_model, tiny_cfg):
    import matplotlib.pyplot as plt

    model, _ = tiny_model
    read = plt.imread(images[2])  # float32 in [0, 1], RGB or RGBA
    assert read.dtype == np.float32
    assert _same_embedding(model, tiny_cfg, read, images[2])


def test_rgba_arrays_and_pil_images_lie_on_white(images, tiny_model, tiny_cfg):
    model, _ = tiny_model
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:12, :, 3] = 255  # top half opaque red, bottom half transparent
    expected = np.full((24, 24, 3), 255, np.uint8)
    expected[:12] = (255, 0, 0)
    assert _same_embedding(model, tiny_cfg, rgba, expected)
    assert _same_embedding(model, tiny_cfg, Image.fromarray(rgba, "RGBA"), expected)


def test_16_bit_arrays_and_pil_images_are_scaled_not_clipped(tiny_model, tiny_cfg):
    model, _ = tiny_model
    grey8 = np.full((24, 24, 3), 128, np.uint8)
    assert _same_embedding(model, tiny_cfg, np.full((24, 24, 3), 32768, np.uint16), grey8)
    assert _same_embedding(model, tiny_cfg, Image.fromarray(np.full((24, 24), 32768, np.uint16)), grey8)


@pytest.mark.parametrize("array, pattern", [
    (np.full((24, 24, 3), 200.0, np.float32), r"values from 200 to 200: pass uint8 .* floats in \[0, 1\]"),
    (np.full((24, 24, 3), np.nan, np.float32), r"values from nan"),
    (np.zeros((3, 24, 24), np.uint8), r"shape \(3, 24, 24\).*transpose to \(H, W, 3\)"),
    (np.zeros((2, 24, 24, 3), np.uint8), r"shape \(2, 24, 24, 3\).*a batch"),
    (np.zeros((24, 24, 2), np.uint8), r"shape \(24, 24, 2\)"),
])
def test_arrays_that_are_no_image_are_refused_with_their_shape_or_range(tiny_model, tiny_cfg, array, pattern):
    model, _ = tiny_model
    _raises(lambda: cu.encode_images(model, [array], tiny_cfg), r"image 0 .*" + pattern)


# -- sizes that do not match ----------------------------------------------------------

def test_a_config_with_another_image_size_than_the_model_names_both(images, tiny_model, tiny_cfg):
    model, _ = tiny_model
    _raises(lambda: cu.encode_images(model, images, dataclasses.replace(tiny_cfg, image_size=64)),
            r"image_size=64 but the model's image tower was built for 32 px")


def test_gallery_embeddings_of_another_dimension_name_both(images, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    other = torch.nn.functional.normalize(torch.randn(3, tiny_cfg.projection_dim // 2), dim=-1)
    _raises(lambda: cu.search_images("एक गोला", model, tokenizer, images, tiny_cfg, image_embeds=other),
            rf"shape \(3, {tiny_cfg.projection_dim // 2}\) but the query has dimension {tiny_cfg.projection_dim}")
    _raises(lambda: cu.zero_shot_classify(model, tokenizer, None, ["गोला", "वर्ग"], tiny_cfg, image_embeds=other),
            rf"dimension {tiny_cfg.projection_dim}")


def test_a_half_width_index_does_not_split_one_query_into_two(images, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    half = torch.nn.functional.normalize(torch.randn(3, tiny_cfg.projection_dim // 2), dim=-1)
    index = cu.build_index(half, "exact")
    _raises(lambda: cu.search_images("एक गोला", model, tokenizer, images, tiny_cfg, index=index),
            rf"dimension {tiny_cfg.projection_dim // 2} but the query has shape \({tiny_cfg.projection_dim},\)")
    _raises(lambda: cu.search_index(index, torch.randn(tiny_cfg.projection_dim), k=1), r"dimension")


def test_a_timm_vit_at_another_input_size_names_both_sizes():
    cfg = cu.Config.quick(image_model="vit_tiny_patch16_224", image_model_kwargs=dict(depth=1), image_size=64,
                          image_pool="avg")
    _raises(lambda: cu.ImageEncoder(cfg), r"takes 224 px images but cfg\.image_size=64.*img_size=64")
    fitted = dataclasses.replace(cfg, image_model_kwargs=dict(depth=1, img_size=64))
    assert cu.ImageEncoder(fitted).out_dim == 192  # built for 64 px, as the message says


def test_an_unknown_timm_argument_is_named(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, image_model_kwargs=dict(chanels=(8, 16, 16, 32), stem_width=8))
    _raises(lambda: cu.ImageEncoder(cfg), r"image_model_kwargs=.*'chanels'.*resnet18")


# -- broken models ----------------------------------------------------------------------

@pytest.fixture
def nan_model(tiny_model):
    model, tokenizer = tiny_model
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.image_projection.projection.weight[0, 0] = float("nan")
        broken.text_projection.projection.weight[0, 0] = float("nan")
    return broken, tokenizer


def test_encoders_refuse_non_finite_embeddings(images, nan_model, tiny_cfg):
    model, tokenizer = nan_model
    _raises(lambda: cu.encode_images(model, images, tiny_cfg), r"encode_images: .*non-finite .*image 0")
    _raises(lambda: cu.encode_texts(model, tokenizer, ["एक गोला"], tiny_cfg), r"encode_texts: .*non-finite .*text 0")


def test_a_nan_model_reports_no_recall(synthetic, nan_model, tiny_cfg):
    model, tokenizer = nan_model
    _raises(lambda: cu.retrieval_metrics(model, tokenizer, synthetic[3].head(12), tiny_cfg), r"non-finite")


# -- shards ---------------------------------------------------------------------------

@pytest.fixture
def shard_folder(synthetic, tiny_cfg, tmp_path):
    return cu.write_shards(synthetic[1].head(20), tmp_path / "shards", tiny_cfg, rows_per_shard=8)


def test_a_shard_cut_short_is_named(shard_folder, tiny_model, tiny_cfg):
    shard = shard_folder / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    _raises(lambda: cu.stream_loader(shard_folder, tiny_model[1], tiny_cfg), r"shard-000001\.tar .*cut short")


def test_a_shard_holding_fewer_samples_than_the_index_promises_is_named(shard_folder, tiny_model, tiny_cfg):
    index = json.loads((shard_folder / "index.json").read_text())
    for shard in index["shards"]:
        shard.pop("bytes", None)  # an index.json written before sizes were recorded
    (shard_folder / "index.json").write_text(json.dumps(index))
    shard = shard_folder / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:9]  # 3 of its 8 samples
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    loader = cu.stream_loader(shard_folder, tiny_model[1], tiny_cfg)
    _raises(lambda: list(loader), r"shard-000000\.tar holds 3 samples but index\.json promises 8")


def test_a_missing_shard_is_named_before_streaming(shard_folder, tiny_model, tiny_cfg):
    (shard_folder / "shard-000002.tar").unlink()
    _raises(lambda: cu.stream_loader(shard_folder, tiny_model[1], tiny_cfg), r"shard-000002\.tar is missing",
            FileNotFoundError)


def test_a_torn_index_is_named(shard_folder):
    (shard_folder / "index.json").write_text('{"rows": 20, "shards": [{"name": "shard-0')
    _raises(lambda: cu.read_index(shard_folder), r"index\.json is not valid JSON")


def test_another_rows_per_shard_rewrites_the_folder(synthetic, tiny_cfg, shard_folder):
    assert [s["rows"] for s in cu.read_index(shard_folder)["shards"]] == [8, 8, 4]
    cu.write_shards(synthetic[1].head(20), shard_folder, tiny_cfg, rows_per_shard=5)
    assert [s["rows"] for s in cu.read_index(shard_folder)["shards"]] == [5, 5, 5, 5]
    assert len(list(shard_folder.glob("shard-*.tar"))) == 4


def test_a_numpy_rows_per_shard_works(synthetic, tiny_cfg, tmp_path):
    folder = cu.write_shards(synthetic[1].head(10), tmp_path, tiny_cfg, rows_per_shard=np.int64(4))
    assert [s["rows"] for s in cu.read_index(folder)["shards"]] == [4, 4, 2]


@pytest.mark.parametrize("rank, world, pattern", [
    (0, 0, r"world=0 must be the number of processes"),
    (2, 2, r"rank=2 must be .* 0 <= rank < world=2"),
    (-1, 2, r"rank=-1"),
    (0, 3, r"batch_size=8 is the global batch, shared by world=3 .*batch_size=6"),
])
def test_stream_loader_refuses_impossible_processes(shard_folder, tiny_model, tiny_cfg, rank, world, pattern):
    _raises(lambda: cu.stream_loader(shard_folder, tiny_model[1], tiny_cfg, rank=rank, world=world), pattern)


# -- Config values ----------------------------------------------------------------------

def test_numpy_numbers_and_paths_survive_a_checkpoint(tiny_model, tiny_cfg, tmp_path):
    model, tokenizer = tiny_model
    cfg = dataclasses.replace(tiny_cfg, epochs=np.int64(2), batch_size=np.int32(8), head_lr=np.float32(1e-3),
                              seed=np.uint32(7), out_dir=tmp_path / "run", image_dir=Path("photos"),
                              image_model_kwargs=dict(channels=np.array([8, 16, 16, 32]), stem_width=np.int64(8)))
    assert type(cfg.epochs) is int and type(cfg.head_lr) is float and cfg.out_dir == str(tmp_path / "run")
    cu.save_checkpoint(tmp_path / "ckpt", model, tokenizer, cfg)
    _, _, loaded = cu.load_checkpoint(tmp_path / "ckpt")
    assert (loaded.epochs, loaded.seed, loaded.image_dir) == (2, 7, "photos")


def test_a_numpy_bool_is_a_bool():
    assert cu.Config.quick(image_pretrained=np.bool_(False)).image_pretrained is False


@pytest.mark.parametrize("overrides, pattern", [
    (dict(text_config=dict(hiden_size=32)), r"text_config has unknown BertConfig keys \['hiden_size'\]"),
    (dict(text_config=dict(vocab_size=500)), r"text_config\['vocab_size'\]: set by clip_utils; use vocab_size"),
    (dict(image_model_kwargs=dict(global_pool="avg")), r"image_model_kwargs\['global_pool'\]: .* use image_pool"),
    (dict(image_model_kwargs=dict(act_layer=torch.nn.ReLU)), r"image_model_kwargs=.*config\.json"),
])
def test_dict_fields_refuse_keys_and_values_that_break_later(overrides, pattern):
    _raises(lambda: cu.Config.quick(**overrides), pattern)


# -- checkpoints ------------------------------------------------------------------------

def test_a_truncated_safetensors_file_is_named(tiny_model, tiny_cfg, tmp_path):
    model, tokenizer = tiny_model
    folder = cu.save_checkpoint(tmp_path / "ckpt", model, tokenizer, tiny_cfg)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    _raises(lambda: cu.load_checkpoint(folder), r"model\.safetensors cannot be read .*cut short")


def test_a_torn_checkpoint_config_is_named(tiny_model, tiny_cfg, tmp_path):
    model, tokenizer = tiny_model
    folder = cu.save_checkpoint(tmp_path / "ckpt", model, tokenizer, tiny_cfg)
    (folder / "config.json").write_text('{"config": {"mode": "qu', encoding="utf-8")
    _raises(lambda: cu.load_checkpoint(folder), r"config\.json is not valid JSON")


def test_a_missing_local_folder_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(cu.checkpoints, "_hub_folder", lambda *a, **k: pytest.fail("asked the Hub"))
    _raises(lambda: cu.load_checkpoint("runs/best"), r"no checkpoint folder runs/best", FileNotFoundError)


def test_an_id_neither_here_nor_on_the_hub_names_the_path(hub_cache):
    _raises(lambda: cu.load_checkpoint("nobody-here/no-such-model"),
            r"no checkpoint folder nobody-here/no-such-model here, and no Hub repo", FileNotFoundError)


# -- files and resumable work --------------------------------------------------------------

def test_a_translation_file_torn_inside_a_character_reads_its_whole_rows(tmp_path):
    path = tmp_path / "hindi.csv"
    rows = "image,number,english,caption,truncated\na.jpg,0,A dog,एक कुत्ता,0\n"
    path.write_bytes((rows + "b.jpg,0,A cat,एक बि").encode("utf-8")[:-1])  # cut inside the last character
    assert cu.read_translations(path)["caption"].tolist() == ["एक कुत्ता"]


def test_an_english_table_with_a_missing_caption_is_refused_by_row():
    table = pd.DataFrame(dict(image=["a.jpg", "b.jpg", "c.jpg"], english=["A dog", np.nan, "A cat"]),
                         index=[10, 11, 12])
    _raises(lambda: cu.read_english_captions(table), r"1 rows without a caption .* first row 11 \(image 'b\.jpg'\)")


def test_a_token_line_without_its_caption_is_named(tmp_path):
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tA dog runs\nb.jpg#0\t \n", encoding="utf-8")
    _raises(lambda: cu.read_english_captions(tmp_path / "Flickr8k.token.txt"), r"line 2: 'b\.jpg#0' has no English")


def test_a_torn_xm3600_line_names_its_file_and_line(tmp_path):
    good = json.dumps({"image/key": "abc", "hi": {"caption": ["एक कुत्ता"]}}, ensure_ascii=False)
    (tmp_path / "captions.jsonl").write_text(good + "\n" + good[:25] + "\n", encoding="utf-8")
    _raises(lambda: cu.load_xm3600(tmp_path / "captions.jsonl", tmp_path), r"captions\.jsonl line 2 is not")


def test_cocos_own_captions_json_is_not_taken_for_the_karpathy_file(tmp_path):
    coco = dict(images=[dict(file_name="COCO_val2014_000000000042.jpg", id=42, height=480, width=640)],
                annotations=[dict(image_id=42, id=1, caption="A dog.")])
    (tmp_path / "captions_val2014.json").write_text(json.dumps(coco))
    (tmp_path / "coco_mt_dev.jsonl").write_text(json.dumps(dict(
        image_id="42_0", trg_lang="hi", caption_tokenized="a dog", translation_tokenized="एक कुत्ता")) + "\n")
    _raises(lambda: cu.load_coco35l(tmp_path / "coco_mt_dev.jsonl", tmp_path / "captions_val2014.json", tmp_path),
            r"captions_val2014\.json is not the Karpathy split file.*COCO's own annotations.*dataset_coco\.json")


def test_a_labelled_folder_that_does_not_exist_is_an_error(tmp_path):
    _raises(lambda: cu.labelled_folder(tmp_path / "photoz"), r"no folder .*photoz", FileNotFoundError)
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.jpg")  # photos, but no class subfolders
    _raises(lambda: cu.labelled_folder(tmp_path), r"holds no photos .* in class subfolders")


def test_downloading_onto_an_existing_folder_is_refused(tmp_path):
    (tmp_path / "source.zip").write_bytes(b"PK")
    (tmp_path / "data").mkdir()
    _raises(lambda: cu.download((tmp_path / "source.zip").as_uri(), tmp_path / "data"), r"data is a folder",
            IsADirectoryError)


def test_an_html_page_saved_as_an_archive_is_named_as_such(tmp_path):
    page = tmp_path / "Flickr8k_Dataset.zip"
    page.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please log in</body></html>")
    _raises(lambda: cu.extract_archive(page, tmp_path / "out"), r"Flickr8k_Dataset\.zip is an HTML")


def test_an_archive_cut_short_is_named(tmp_path):
    archive = tmp_path / "images.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        data = os.urandom(50_000)
        info = tarfile.TarInfo("images/a.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    archive.write_bytes(archive.read_bytes()[:20_000])
    _raises(lambda: cu.extract_archive(archive, tmp_path / "out"), r"images\.tgz cannot be unpacked .*cut short")


# -- archives ------------------------------------------------------------------------------

def _tar_with(path, *members):
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("members", [
    [_link("escape", "../outside")],
    [_link("inside", "photos"), _file("photos")],
    [_file("a.txt"), _link("hard", "a.txt", tarfile.LNKTYPE)],
    [_link("d", "."), _link("d/up", ".."), _file("d/up/written.txt")],  # a chain of links inside the folder
])
def test_tar_members_that_are_links_are_refused_and_nothing_is_written(tmp_path, members):
    archive = _tar_with(tmp_path / "a.tar", *members)
    _raises(lambda: cu.extract_archive(archive, tmp_path / "out" / "target"), r"member .* is a link")
    assert not (tmp_path / "out" / "written.txt").exists() and not (tmp_path / "outside").exists()
    assert not any((tmp_path / "out" / "target").iterdir())


def test_fit_refuses_a_config_whose_image_size_is_not_the_towers(synthetic, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    _, train, val, _ = synthetic
    wrong = dataclasses.replace(tiny_cfg, image_size=48)
    _raises(lambda: cu.fit(model, tokenizer, train, val, wrong), r"image_size=48 .*built for 32 px")
