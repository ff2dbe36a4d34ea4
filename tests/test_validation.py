"""Bad input at the door: each mistaken Config field, table, caption file or call argument is a ValueError
that names the field, table, file or row, never a silent default or a crash from deep inside torch or pandas."""
import dataclasses
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import clip_utils as cu


@pytest.fixture
def images(tmp_path):
    """Three small readable images."""
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.new("RGB", (24, 24), (80 * i, 40, 200)).save(paths[-1])
    return paths


def _raises(call, pattern, error=ValueError):
    """Run call; assert it raises exactly `error` (not a subclass from deep inside) whose message matches."""
    with pytest.raises(error) as caught:
        call()
    assert caught.type is error, f"{caught.type.__name__}: {caught.value}"
    assert re.search(pattern, str(caught.value)), str(caught.value)
    return str(caught.value)


# -- Config -----------------------------------------------------------------------

@pytest.mark.parametrize("field, value, allowed", [
    ("mode", "fast", "'quick' or 'full'"),
    ("loss", "infonce", "'clip' or 'soft_target'"),
    ("pooling", "max", "'cls' or 'mean'"),
    ("freeze", "both", "'none' or 'image' or 'text'"),
    ("precision", "fp16", "'auto' or 'bf16' or 'fp32'"),
    ("image_pool", "average", "'avg'"),
    ("on_bad_input", "ignore", "'skip' or 'raise'"),
    ("device", "gpu", "'auto', 'cpu' or 'cuda'"),
    ("device", "cuda:1", "CUDA_VISIBLE_DEVICES"),
    ("heads", "conv", "'mlp' or 'linear'"),
    ("image_geometry", "stretch", "'square' or 'crop'"),
])
def test_an_unknown_choice_names_the_field_value_and_choices(field, value, allowed):
    pattern = re.escape(f"{field}={value!r}: use ") + ".*" + re.escape(allowed)
    _raises(lambda: cu.Config.quick(**{field: value}), pattern)


@pytest.mark.parametrize("field, value, allowed", [
    ("batch_size", 1, ">= 2"),
    ("epochs", 0, ">= 1"),
    ("head_lr", 0.0, "> 0"),
    ("image_encoder_lr", -1e-4, "> 0"),
    ("text_encoder_lr", float("nan"), "> 0"),
    ("factor", 1.0, "0 < factor < 1"),
    ("factor", 0, "0 < factor < 1"),
    ("projection_dim", 0, ">= 1"),
    ("dropout", 1.0, "0 <= dropout < 1"),
    ("patience", -1, ">= 0"),
    ("max_minutes", 0, "None"),
    ("seed", -1, "0 <= seed"),
    ("hard_negatives", 1, "0 \\(random batches\\) or a group size >= 2"),
    ("image_size", 0, ">= 1"),
    ("max_length", 2, ">= 3"),
    ("weight_decay", -0.1, ">= 0"),
    ("num_workers", -1, ">= 0"),
    ("gradient_accumulation_steps", 0, ">= 1"),
    ("translator", " ", "a Hugging Face model name"),
    ("epochs", 2.5, "an integer"),
    ("image_pretrained", "False", "True or False"),  # a string from an environment variable is always truthy
    ("text_config", None, "a dict"),
])
def test_a_number_out_of_range_names_the_field_value_and_range(field, value, allowed):
    _raises(lambda: cu.Config.quick(**{field: value}), re.escape(f"{field}={value!r}: use ") + ".*" + allowed)


def test_dataclasses_replace_validates_too():
    _raises(lambda: dataclasses.replace(cu.Config.quick(), loss="soft-target"), r"loss='soft-target'")


def test_every_bad_field_is_named_at_once():
    message = _raises(lambda: cu.Config.full(loss="x", batch_size=0, factor=2), r"invalid Config")
    assert all(name in message for name in ("loss='x'", "batch_size=0", "factor=2"))


def test_max_length_beyond_the_position_embeddings_is_refused():
    _raises(lambda: cu.Config.quick(max_length=128), r"max_length=128: .*max_position_embeddings'\]=64")
    assert cu.Config.quick(max_length=128, text_pretrained=True).max_length == 128  # a pretrained BERT has 512


def test_init_logit_scale_outside_its_clamp_is_refused():
    _raises(lambda: cu.Config.quick(init_logit_scale=10.0), r"init_logit_scale=10.0: .*max_logit_scale")


def test_the_recipes_and_the_configs_in_use_still_validate(monkeypatch):
    """The recipes, and overrides the notebooks, benchmarks and checkpoints make, build without an error."""
    for mode in ("quick", "full"):
        monkeypatch.setenv("CLIP_HINDI_MODE", mode)
        assert cu.Config.from_env().mode == mode
    base = cu.Config.quick()
    cu.Config.full(device="cpu", image_pretrained=False, precision="fp32")
    cu.Config.quick(device="cuda", precision="bf16")
    cu.Config.quick(hard_negatives=4, seed=2)
    cu.Config.quick(loss="soft_target", max_minutes=1.5, epochs=100)
    dataclasses.replace(base, on_bad_input="raise", freeze="image", image_pool="avg", pooling="cls")
    dataclasses.replace(cu.Config.full(), image_pretrained=False, residual_heads=False, init_logit_scale=0.0)


# -- tables -----------------------------------------------------------------------

def _all_bad(images, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    return pd.DataFrame(dict(image=[str(tmp_path / "missing.png"), str(tmp_path / "broken.jpg"), images[0]],
                             caption=["एक लाल गोला", "एक नीला वर्ग", "  "]))


def test_a_table_with_no_usable_row_counts_the_causes(images, tmp_path):
    message = _raises(lambda: cu.clean_table(_all_bad(images, tmp_path), cu.Config.quick(), name="train"),
                      r"no usable row left in the train table: all 3 rows were dropped")
    assert "2 unreadable image" in message and "1 empty or missing caption" in message
    assert "first is row 0: unreadable image" in message and "missing.png" in message


def test_an_empty_table_is_named(images):
    empty = pd.DataFrame(dict(image=[], caption=[]))
    _raises(lambda: cu.clean_table(empty, cu.Config.quick(), name="my photos"), r"the my photos table has no rows")
    _raises(lambda: cu.clean_table([images[0]], cu.Config.quick(), name="val"),
            r"the val table must be a pandas DataFrame")


def test_fit_names_the_validation_table_whose_rows_are_all_bad(images, tmp_path, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    train = pd.DataFrame(dict(image=images, caption=["एक लाल गोला", "एक नीला गोला", "एक हरा गोला"]))
    cfg = dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "run"))
    _raises(lambda: cu.fit(model, tokenizer, train, _all_bad(images, tmp_path), cfg), r"in the val table")
    _raises(lambda: cu.fit(model, tokenizer, _all_bad(images, tmp_path), train, cfg), r"in the train table")


def test_fit_refuses_a_table_of_one_image(images, tmp_path, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    one = pd.DataFrame(dict(image=[images[0]] * 3, caption=["एक लाल गोला", "लाल गोला", "गोला"]))
    many = pd.DataFrame(dict(image=images, caption=["एक लाल गोला", "एक नीला गोला", "एक हरा गोला"]))
    cfg = dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "run"))
    _raises(lambda: cu.fit(model, tokenizer, one, many, cfg), r"the train table has 3 usable rows of only 1 image")


def test_a_training_table_smaller_than_one_batch_says_so(images, tmp_path, synthetic, tiny_cfg):
    model, tokenizer = cu.build_model(tiny_cfg, captions=synthetic[1]["caption"])
    table = pd.DataFrame(dict(image=images, caption=["एक लाल गोला", "एक नीला गोला", "एक हरा गोला"]))
    cfg = dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "run"))
    with pytest.warns(UserWarning, match=r"the train table has 3 usable rows, fewer than one batch \(batch_size=8\)"):
        history = cu.fit(model, tokenizer, table, table, cfg)
    assert len(history) == 1


def test_retrieval_metrics_name_the_table(images, tmp_path, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    _raises(lambda: cu.retrieval_metrics(model, tokenizer, _all_bad(images, tmp_path), tiny_cfg, name="test"),
            r"no usable row left in the test table")
    empty = pd.DataFrame(dict(image=[], caption=[]))
    _raises(lambda: cu.retrieval_metrics(model, tokenizer, empty, tiny_cfg), r"the evaluation table has no rows")


def test_make_loader_refuses_an_empty_table(tiny_model, tiny_cfg):
    _, tokenizer = tiny_model
    _raises(lambda: cu.make_loader(pd.DataFrame(dict(image=[], caption=[])), tokenizer, tiny_cfg, train=True),
            r"make_loader got a table with no rows")


# -- split_by_image -----------------------------------------------------------------

TEN = pd.DataFrame(dict(image=[f"{i}.jpg" for i in range(10)], caption=["एक गोला"] * 10))


def test_fractions_that_leave_no_training_images_are_refused():
    _raises(lambda: cu.split_by_image(TEN, val_frac=0.7, test_frac=0.7), r"val_frac \+ test_frac = 1.4")


def test_a_fraction_too_small_for_the_table_names_the_empty_split():
    _raises(lambda: cu.split_by_image(TEN, val_frac=0.01, test_frac=0.2), r"leaves the val split empty: 10 images")
    _raises(lambda: cu.split_by_image(TEN, val_frac=0.2, test_frac=0.04), r"leaves the test split empty")
    train, val, test = cu.split_by_image(TEN, val_frac=0.2, test_frac=0.0)  # a fraction of 0 asks for no split
    assert (len(train), len(val), len(test)) == (8, 2, 0)


def test_a_fraction_outside_0_1_or_a_missing_column_is_named():
    _raises(lambda: cu.split_by_image(TEN, val_frac=-0.1), r"val_frac=-0.1 must be a fraction")
    _raises(lambda: cu.split_by_image(TEN.rename(columns={"image": "file"})), r"needs an 'image' column.*'file'")


# -- caption files --------------------------------------------------------------------

def test_an_unknown_layout_names_the_file_and_quotes_its_first_line(tmp_path):
    (tmp_path / "semi.csv").write_text("image;caption\na.jpg;एक कुत्ता\n", encoding="utf-8")
    _raises(lambda: cu.read_captions(tmp_path / "semi.csv"), r"semi\.csv: unknown caption layout; its first line is "
                                                              r"'image;caption'")


def test_a_headerless_csv_is_not_guessed(tmp_path):
    """Read as 'image_id caption' it would give the image 'a.jpg,एक' with the caption 'कुत्ता'."""
    (tmp_path / "noheader.csv").write_text("a.jpg,एक कुत्ता\nb.jpg,दो बिल्लियाँ\n", encoding="utf-8")
    _raises(lambda: cu.read_captions(tmp_path / "noheader.csv"), r"noheader\.csv: unknown caption layout.*'a\.jpg,एक")


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n", b"\xef\xbb\xbf"])
def test_an_empty_file_names_the_file(tmp_path, content):
    (tmp_path / "nothing.txt").write_bytes(content)
    _raises(lambda: cu.read_captions(tmp_path / "nothing.txt"), r"nothing\.txt is empty")


@pytest.mark.parametrize("header", ["image,caption\n", "image_name| comment_number| comment\n\n"])
def test_a_header_only_file_names_the_file(tmp_path, header):
    (tmp_path / "header.csv").write_text(header, encoding="utf-8")
    _raises(lambda: cu.read_captions(tmp_path / "header.csv"), r"header\.csv has a header .* but no caption rows")


@pytest.mark.parametrize("encoding", ["cp1252", "utf-16-le"])
def test_another_encoding_names_the_file(tmp_path, encoding):
    text = "image,caption\ncafé.jpg,a café\n" if encoding == "cp1252" else "image,caption\na.jpg,एक कुत्ता\n"
    (tmp_path / "other.csv").write_bytes(text.encode(encoding))  # utf-16-le: no byte-order mark
    _raises(lambda: cu.read_captions(tmp_path / "other.csv"), r"other\.csv .*re-save it as UTF-8")


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_byte_order_mark_is_decoded(tmp_path, encoding):
    (tmp_path / "bom.csv").write_bytes("image,caption\na.jpg,एक कुत्ता, घास पर\n".encode(encoding))
    df = cu.read_captions(tmp_path / "bom.csv")
    assert df.to_dict("records") == [dict(image="a.jpg", caption="एक कुत्ता, घास पर")]


def test_kaggle_flickr8k_captions_txt(tmp_path):
    (tmp_path / "captions.txt").write_text(
        "image,caption\n1000268201_693b08cb0e.jpg,A child in a pink dress is climbing up a set of stairs .\n"
        "1000268201_693b08cb0e.jpg,\"A girl, going into a wooden building .\"\n"
        "1001773457_577c3a7d70.jpg,A black dog and a spotted dog are fighting\n", encoding="utf-8")
    df = cu.read_captions(tmp_path / "captions.txt")
    assert df["image"].tolist() == ["1000268201_693b08cb0e.jpg"] * 2 + ["1001773457_577c3a7d70.jpg"]
    assert df["caption"].iloc[1] == "A girl, going into a wooden building ."


def test_kaggle_flickr30k_results_csv_with_pipes(tmp_path):
    (tmp_path / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands .\n"
        "1000092795.jpg| 1| एक कुत्ता घास पर दौड़ रहा है |\n", encoding="utf-8")  # "|" typed for the danda
    df = cu.read_captions(tmp_path / "results.csv")
    assert df.to_dict("records") == [
        dict(image="1000092795.jpg", caption="Two young guys with shaggy hair look at their hands ."),
        dict(image="1000092795.jpg", caption="एक कुत्ता घास पर दौड़ रहा है।")]


def test_a_row_missing_a_separator_names_the_line(tmp_path):
    (tmp_path / "results.csv").write_text(
        "image_name| comment_number| comment\n1000092795.jpg| 0| Two young guys .\n"
        "2199200615.jpg| 4 A dog runs across the grass .\n", encoding="utf-8")
    _raises(lambda: cu.read_captions(tmp_path / "results.csv"),
            r"results\.csv: cannot split line\(s\) \[3\] into image and caption; line 3 is '2199200615\.jpg\| 4 A dog")


def test_a_row_without_an_image_name_names_the_line(tmp_path):
    (tmp_path / "c.csv").write_text("image,caption\na.jpg,एक कुत्ता\n,दो बिल्लियाँ\n", encoding="utf-8")
    _raises(lambda: cu.read_captions(tmp_path / "c.csv"), r"c\.csv: cannot split line\(s\) \[3\]")


# -- API edges --------------------------------------------------------------------------

def test_zero_shot_without_classes(tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    embeds = torch.nn.functional.normalize(torch.randn(2, tiny_cfg.projection_dim), dim=-1)
    _raises(lambda: cu.zero_shot_classify(model, tokenizer, None, [], tiny_cfg, image_embeds=embeds), r"no classes")
    _raises(lambda: cu.zero_shot_classify(model, tokenizer, None, {}, tiny_cfg, image_embeds=embeds), r"no classes")


def test_zero_shot_names_repeated_classes_promptless_classes_and_bad_templates(tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    embeds = torch.nn.functional.normalize(torch.randn(2, tiny_cfg.projection_dim), dim=-1)
    classify = lambda classes, **kw: cu.zero_shot_classify(model, tokenizer, None, classes, tiny_cfg,
                                                           image_embeds=embeds, **kw)
    _raises(lambda: classify(["गोला", "वर्ग", "गोला"]), r"class names \['गोला'\] appear more than once")
    _raises(lambda: classify({"गोला": ["एक गोला"], "वर्ग": []}), r"classes \['वर्ग'\] need a non-empty list")
    _raises(lambda: classify(["गोला", "वर्ग"], templates=["एक चित्र"]), r"every template needs one '\{\}'.*एक चित्र")
    _raises(lambda: classify("गोला"), r"not one string")


def test_search_over_an_empty_gallery_or_with_k_below_1(images, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    _raises(lambda: cu.search_images("एक गोला", model, tokenizer, [], tiny_cfg), r"empty gallery")
    _raises(lambda: cu.search_images("एक गोला", model, tokenizer, images, tiny_cfg, k=0), r"k=0: .* >= 1")
    embeds = cu.encode_images(model, images[:2], tiny_cfg)
    _raises(lambda: cu.search_images("एक गोला", model, tokenizer, images, tiny_cfg, image_embeds=embeds),
            r"image_embeds has 2 rows but the gallery has 3 images")
    _raises(lambda: cu.top_k_scores(embeds, embeds[0], k=-1), r"k=-1")


def test_encoders_refuse_nothing_to_encode(tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    _raises(lambda: cu.encode_images(model, [], tiny_cfg), r"encode_images got no images")
    _raises(lambda: cu.encode_texts(model, tokenizer, [], tiny_cfg), r"encode_texts got no texts")
    _raises(lambda: cu.encode_texts(model, tokenizer, "एक गोला", tiny_cfg), r"not one string")


def test_recall_at_k_on_an_empty_table_or_with_bad_arguments():
    _raises(lambda: cu.recall_at_k(torch.empty(0, 0), []), r"non-empty .* similarity matrix, got shape \(0, 0\)")
    _raises(lambda: cu.recall_at_k(torch.eye(3), [0, 1, 2], ks=(0, 1)), r"every k in ks .* got \[0\]")
    _raises(lambda: cu.recall_at_k(torch.eye(3), [0, 1]), r"caption_to_image has shape \(2,\) .* 3 caption rows")
    _raises(lambda: cu.recall_at_k(torch.eye(3), np.array([0, 1, 3])), r"caption 2 points at image 3, outside")
