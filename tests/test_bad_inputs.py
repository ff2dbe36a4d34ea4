"""The bad-input battery: each broken input gets its promised message, counted skip or safe result."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import clip_utils as cu

SKIP = cu.Config.quick(on_bad_input="skip", image_size=32)
RAISE = dataclasses.replace(SKIP, on_bad_input="raise")


@pytest.fixture
def good_jpg(tmp_path):
    path = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
    return path


# -- images ---------------------------------------------------------------------

def test_zero_byte_truncated_and_fake_images_are_counted_skips(tmp_path, good_jpg):
    (tmp_path / "empty.jpg").write_bytes(b"")
    data = good_jpg.read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.png").write_text("this is a text file with an image extension")
    table = pd.DataFrame(dict(image=[str(good_jpg), str(tmp_path / "empty.jpg"), str(tmp_path / "truncated.jpg"),
                                     str(tmp_path / "notes.png")], caption=["एक", "दो", "तीन", "चार"]))
    with pytest.warns(UserWarning, match="skipped 3 of 4 rows: 3 unreadable image"):
        assert cu.clean_table(table, SKIP)["image"].tolist() == [str(good_jpg)]
    with pytest.raises(ValueError, match=r"row 1: unreadable image .*empty\.jpg"):
        cu.clean_table(table, RAISE)
    with pytest.raises(ValueError, match=r"row 2: unreadable image .*truncated\.jpg"):
        cu.clean_table(table.drop(index=[1]), RAISE)


def test_grayscale_and_cmyk_become_rgb(tmp_path):
    Image.new("L", (10, 6), 128).save(tmp_path / "gray.png")
    Image.new("CMYK", (10, 6), (255, 0, 0, 0)).save(tmp_path / "cmyk.jpg")  # pure cyan ink
    gray = cu.load_image(tmp_path / "gray.png")
    assert gray.shape == (6, 10, 3) and (gray == 128).all()
    cyan = cu.load_image(tmp_path / "cmyk.jpg")
    assert cyan.shape == (6, 10, 3)
    assert cyan[..., 0].mean() < 40 and cyan[..., 1:].mean() > 215  # cyan: no red, full green and blue


def test_huge_jpeg_is_shrunk_while_decoding(tmp_path):
    """An 8000 x 6000 photo (144 MB as RGB pixels) is decoded at 1/8 scale: memory stays small."""
    Image.new("RGB", (8000, 6000), (200, 120, 40)).save(tmp_path / "huge.jpg", quality=80)
    probe = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import clip_utils
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = clip_utils.load_image({str(tmp_path / "huge.jpg")!r}, max_side=224)
print(image.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    shape, grew_mb = out.rsplit(" ", 1)
    assert max(eval(shape)) <= 2 * 224
    assert float(grew_mb) < 60, f"decoding grew memory by {grew_mb} MB"


def test_paths_with_spaces_and_devanagari(tmp_path, tiny_model, tiny_cfg):
    _, tokenizer = tiny_model
    folder = tmp_path / "मेरी तस्वीरें"
    folder.mkdir()
    Image.new("RGB", (20, 20), (0, 0, 255)).save(folder / "नीला गोला 1.png")
    table = pd.DataFrame(dict(image=[str(folder / "नीला गोला 1.png")], caption=["एक नीला गोला"]))
    clean = cu.clean_table(table, dataclasses.replace(tiny_cfg, on_bad_input="raise"))
    batch = next(iter(cu.make_loader(clean, tokenizer, tiny_cfg, train=False)))
    assert batch["images"].shape == (1, 3, tiny_cfg.image_size, tiny_cfg.image_size)


# -- captions -------------------------------------------------------------------

def test_empty_whitespace_and_nan_captions_are_counted(good_jpg):
    table = pd.DataFrame(dict(image=[str(good_jpg)] * 4, caption=["एक गोला", "", " \u200b\t ", np.nan]))
    with pytest.warns(UserWarning, match="skipped 3 of 4 rows: 3 empty or missing caption"):
        assert len(cu.clean_table(table, SKIP)) == 1


def test_long_captions_are_truncated_with_a_count(good_jpg, tiny_model, tiny_cfg):
    _, tokenizer = tiny_model
    long = " ".join(["लाल गोला"] * 100)
    table = pd.DataFrame(dict(image=[str(good_jpg)] * 3, caption=[long, long + " और", "एक लाल गोला"]))
    with pytest.warns(UserWarning, match=f"2 of 3 captions are longer than max_length={tiny_cfg.max_length}"):
        loader = cu.make_loader(table, tokenizer, tiny_cfg, train=False)
    assert next(iter(loader))["input_ids"].shape[1] == tiny_cfg.max_length


def test_mixed_script_romanised_and_emoji_captions_stay_intact(tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    captions = ["एक लाल ball घास पर", "ek laal gola", "एक लाल गोला 🔴🙂"]
    assert [cu.normalize_caption(c) for c in captions] == captions  # nothing stripped or rewritten
    pieces = tokenizer.tokenize(captions[2])
    assert pieces[:4] == ["एक", "लाल", "गोल", "##ा"] and pieces[4] == tokenizer.unk_token  # unknown emoji: one [UNK]
    embeds = cu.encode_texts(model, tokenizer, captions, tiny_cfg)
    assert embeds.shape == (3, tiny_cfg.projection_dim) and torch.isfinite(embeds).all()


# -- tables ---------------------------------------------------------------------

def test_duplicate_rows_are_dropped_and_counted(good_jpg):
    table = pd.DataFrame(dict(image=[str(good_jpg)] * 3, caption=["एक गोला", "एक गोला", "दो गोले"]))
    with pytest.warns(UserWarning, match=r"dropped 1 duplicate \(image, caption\) rows, e.g. row 1"):
        assert cu.clean_table(table, SKIP)["caption"].tolist() == ["एक गोला", "दो गोले"]


def test_image_without_caption_is_a_distractor_not_an_error():
    similarity = torch.tensor([[0.9, 0.1, 0.95],   # caption 0 (image 0) is beaten by image 2
                               [0.2, 0.8, 0.1]])   # caption 1 (image 1); image 2 has no caption
    metrics = cu.recall_at_k(similarity, caption_to_image=[0, 1], ks=(1,))
    assert metrics["t2i_R@1"] == 0.5  # the uncaptioned image still competes in text-to-image
    assert metrics["i2t_R@1"] == 1.0  # and is left out of image-to-text, which it cannot pass


# -- training -------------------------------------------------------------------

def test_nan_in_epoch_two_keeps_epoch_one_and_names_the_batch(synthetic, tiny_cfg, tmp_path, monkeypatch):
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, epochs=2, out_dir=str(tmp_path))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    steps_per_epoch = len(cu.clean_table(train, cfg)) // cfg.batch_size
    real_loss, training_calls = cu.train._Contrastive.loss, []

    def loss_turns_nan(self, model, *args, **kwargs):  # the training loss (validation computes its own)
        loss = real_loss(self, model, *args, **kwargs)
        training_calls.append(1)
        if len(training_calls) == steps_per_epoch + 3:  # epoch 2, batch 2
            return loss * float("inf")
        return loss

    monkeypatch.setattr(cu.train._Contrastive, "loss", loss_turns_nan)
    with pytest.raises(FloatingPointError, match=r"loss is (inf|nan) at epoch 2, batch 2; training stopped"):
        cu.fit(model, tokenizer, train, val, cfg)
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1  # epoch 1 is kept ...
    reloaded, _, _ = cu.load_checkpoint(tmp_path / "best")  # ... with loadable, finite weights
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_out_of_memory_suggests_a_smaller_batch(synthetic, tiny_cfg, tmp_path, monkeypatch):
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, out_dir=str(tmp_path))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cu.train._ClipTask, "embed", no_memory)  # the forward pass of a training step
    with pytest.raises(torch.OutOfMemoryError, match=r"batch_size=8: try Config\(batch_size=4\)"):
        cu.fit(model, tokenizer, train, val, cfg)


# -- files from the internet ----------------------------------------------------

def test_no_unpickling_of_untrusted_files():
    source = "".join(room.read_text(encoding="utf-8") for room in Path(cu.__file__).parent.glob("*.py"))
    assert "import pickle" not in source and "pickle.load" not in source
    loads = re.findall(r"torch\.load\(([^)]*)\)", source)
    assert loads and all("weights_only=True" in call for call in loads), loads
