
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import clip_utils as cu


def test_synthetic_set_is_deterministic(tmp_path):
    a = cu.make_synthetic_dataset(tmp_path / "a", n_images=30, seed=7)
    b = cu.make_synthetic_dataset(tmp_path / "b", n_images=30, seed=7)
    assert a["caption"].tolist() == b["caption"].tolist()
    first_a, first_b = a["image"][0], b["image"][0]
    assert np.array_equal(cu.load_image(first_a), cu.load_image(first_b))


def test_synthetic_captions_are_distinct_and_agree_in_gender(synthetic):
    df = synthetic[0]
    assert df.groupby("image")["caption"].nunique().min() >= 3  # several different captions per image
    assert set(df.columns) >= {"image", "caption", "held_out"}
    captions = " ".join(df["caption"])
    # Feminine nouns take -ī adjectives, masculine ones -ā (singular) and -e (plural).
    assert "नीला पतंग" not in captions and "नीली गोला" not in captions
    assert "बड़ा अंगूठी" not in captions and "छोटे पतंग" not in captions.replace("छोटे पतंगें", "")
    for caption in df["caption"]:
        assert caption == cu.normalize_caption(caption)


def test_held_out_pairs_stay_out_of_training(tmp_path):
    train, val, test = cu.prepare_quick_data(tmp_path, n_images=150, seed=3)
    assert not train["held_out"].any() and not val["held_out"].any()
    assert test["held_out"].all() and len(test) > 0
    for colour, shape in cu.HELD_OUT_PAIRS:
        word = f"{colour} {shape}"
        assert not train["caption"].str.contains(word).any()


def test_quick_tables_are_redrawn_for_other_settings_and_say_where_they_came_from(tmp_path):
    train, _, _ = cu.prepare_quick_data(tmp_path, n_images=60, seed=3)
    assert cu.table_source(tmp_path) == "synthetic scenes drawn by clip_utils (60 images, seed 3)"
    (tmp_path / "images" / Path(train["image"][0]).name).unlink()  # only a rebuild would draw it again
    again, _, _ = cu.prepare_quick_data(tmp_path, n_images=60, seed=3)
    assert list(again["caption"]) == list(train["caption"]) and not Path(train["image"][0]).exists()
    more, _, _ = cu.prepare_quick_data(tmp_path, n_images=90, seed=3)  # was silently the 60-image tables
    assert more["image"].nunique() > train["image"].nunique() and "90 images" in cu.table_source(tmp_path)


def test_split_by_image_keeps_images_in_one_split(synthetic):
    df, train, val, test = synthetic
    sets = [set(part["image"]) for part in (train, val, test)]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sum(map(len, sets)) == df["image"].nunique()
    assert len(train) + len(val) + len(test) == len(df)


def test_batches_pad_to_their_own_longest_caption(synthetic, tiny_model, tiny_cfg):
    _, tokenizer = tiny_model
    df = pd.concat([synthetic[1].head(4), pd.DataFrame(dict(
        image=[synthetic[1]["image"][0]] * 4, caption=["बीच में एक बड़ा लाल गोला। " * 3] * 4))])
    loader = cu.make_loader(df, tokenizer, tiny_cfg, train=False)
    short = next(iter(cu.make_loader(df.head(4), tokenizer, tiny_cfg, train=False)))
    lengths = [b["input_ids"].shape[1] for b in loader]
    assert short["input_ids"].shape[1] < max(lengths)
    assert short["attention_mask"][:, -1].sum() >= 1  # the longest caption of the batch fills it
    assert short["images"].shape == (4, 3, tiny_cfg.image_size, tiny_cfg.image_size)


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="missing \\['caption'\\]"):
        cu.clean_table(pd.DataFrame(dict(image=["a.png"])), cu.Config.quick())


def _bad_table(tmp_path, good_image):
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    return pd.DataFrame(dict(
        image=[good_image, good_image, good_image, str(tmp_path / "missing.png"), str(tmp_path / "broken.jpg")],
        caption=["एक लाल गोला", np.nan, "   ", "एक नीला वर्ग", "एक हरा तारा"]))


def test_bad_rows_raise_with_row_and_file(tmp_path, synthetic):
    table = _bad_table(tmp_path, synthetic[0]["image"][0])
    with pytest.raises(ValueError, match="row 1: empty or missing caption"):
        cu.clean_table(table, cu.Config.quick(on_bad_input="raise"))
    with pytest.raises(ValueError, match="missing.png"):
        cu.clean_table(table.drop(index=[1, 2]), cu.Config.quick(on_bad_input="raise"))


def test_bad_rows_are_skipped_and_counted(tmp_path, synthetic):
    table = _bad_table(tmp_path, synthetic[0]["image"][0])
    with pytest.warns(UserWarning, match="skipped 4 of 5 rows: 2 empty or missing caption, 2 unreadable image"):
        clean = cu.clean_table(table, cu.Config.quick(on_bad_input="skip"))
    assert clean["caption"].tolist() == ["एक लाल गोला"]


def test_image_broken_after_checking_is_skipped_not_fatal(tmp_path, synthetic, tiny_model, tiny_cfg):
    _, tokenizer = tiny_model
    good = synthetic[0]["image"][0]
    gone = tmp_path / "gone.png"
    gone.write_bytes(open(good, "rb").read())
    table = pd.DataFrame(dict(image=[good, str(gone)], caption=["एक लाल गोला", "एक नीला वर्ग"]))
    gone.unlink()  # the file vanishes after the table was built
    loader = cu.make_loader(table, tokenizer, tiny_cfg, train=False)
    with pytest.warns(UserWarning, match="gone.png"):
        batch = next(iter(loader))
    assert batch["images"].shape[0] == 1


def test_alpha_png_is_composited_on_white(tmp_path):
    from PIL import Image

    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert cu.load_image(tmp_path / "clear.png").min() == 255


def test_relative_paths_use_image_dir(synthetic):
    df = synthetic[0].head(3).copy()
    folder = str(np.unique([p.rsplit("/", 1)[0] for p in df["image"]])[0])
    df["image"] = [p.rsplit("/", 1)[1] for p in df["image"]]
    clean = cu.clean_table(df, cu.Config.quick(image_dir=folder, on_bad_input="raise"))
    assert len(clean) == 3


def test_loader_workers_augment_reproducibly(synthetic, tiny_model, tiny_cfg):
    """On a GPU, workers load the data: each gets its own augmentation stream, the same every run."""
    _, tokenizer = tiny_model
    dataset = cu.make_loader(synthetic[1].head(8), tokenizer, tiny_cfg, train=True).dataset

    def first_epoch(seed):
        def images(items):
            return torch.stack([torch.as_tensor(item[0]) for item in items])

        loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, worker_init_fn=cu.data._seed_worker,
                                             generator=torch.Generator().manual_seed(seed), collate_fn=images)
        return list(loader)

    a, b, c = first_epoch(0), first_epoch(0), first_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_training_batches_carry_uint8_pixels_that_the_encoder_normalises_exactly(synthetic, tiny_model, tiny_cfg):
    """The loader ships raw pixels; the encoder's table gives bit for bit what per-image Normalize gives."""
    model, tokenizer = tiny_model
    encoder = model.image_encoder.eval()
    batch = next(iter(cu.make_loader(synthetic[1].head(8), tokenizer, tiny_cfg, train=True)))
    assert batch["images"].dtype == torch.uint8 and batch["images"].shape[1] == 3
    assert batch["images"].is_contiguous(memory_format=torch.channels_last)
    norm = dict(mean=encoder.mean, std=encoder.std)
    floats, raw = (cu.image_transforms(tiny_cfg, True, normalize=normalize, **norm) for normalize in (True, False))
    image = cu.load_image(synthetic[1]["image"].iloc[0], max_side=tiny_cfg.image_size)
    floats.set_random_seed(3)
    raw.set_random_seed(3)  # the same augmentation draws: Normalize draws nothing
    expected = floats(image=image)["image"][None]  # (1, 3, H, W) float
    pixels = torch.from_numpy(raw(image=image)["image"]).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    channel = torch.arange(3).view(1, 3, 1, 1)
    assert torch.equal(encoder.pixel_table[channel, pixels.long()], expected)
    with torch.no_grad():
        assert torch.equal(encoder(pixels.contiguous(memory_format=torch.channels_last)),
                           encoder(expected.contiguous(memory_format=torch.channels_last)))


@pytest.mark.parametrize("geometry", ["square", "crop"])
def test_evaluation_embeddings_match_normalising_on_the_cpu(geometry, synthetic, tiny_model, tiny_cfg):
    """encode_images sends uint8 pixels for the tower to normalise: the embeddings normalising first would give."""
    model, _ = tiny_model
    cfg = dataclasses.replace(tiny_cfg, image_geometry=geometry)
    encoder = model.image_encoder
    images = list(synthetic[3]["image"].unique()[:6])
    floats = cu.image_transforms(cfg, train=False, mean=encoder.mean, std=encoder.std, **encoder.crop)
    pixels = torch.stack([floats(image=cu.load_image(p, cfg.image_size))["image"] for p in images])  # (6, 3, H, W)
    with torch.no_grad():
        before = torch.nn.functional.normalize(model.eval().encode_image(pixels), dim=-1)  # the old way: CPU Normalize
    assert torch.allclose(cu.encode_images(model, images, cfg), before, atol=1e-5)
