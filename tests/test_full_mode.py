"""Full-mode pieces on the rehearsal fixture: the published checkpoint both ways, Hub round trip, labelled sets,
photo preprocessing, cached tables from any folder, the notebooks' setup cell."""
import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rehearsal  # tests/ is on sys.path (pytest rootdir-less test modules)
import torch
from PIL import Image, ImageDraw

import clip_utils as cu

ROOT = Path(__file__).resolve().parents[1]


def test_published_heads_with_residual_by_default_and_without_on_request(tmp_path, tiny_model, tiny_cfg):
    model, _ = tiny_model
    torch.save({k: v for k, v in model.state_dict().items() if k != "logit_scale"}, tmp_path / "model.pt")
    bert = lambda: type(model.text_encoder.model)(model.text_encoder.model.config)
    with_res = cu.load_published_checkpoint(tmp_path / "model.pt", tiny_cfg, text_encoder_model=bert())
    without = cu.load_published_checkpoint(tmp_path / "model.pt", tiny_cfg, text_encoder_model=bert(), residual=False)
    assert with_res.image_projection.residual and not without.image_projection.residual
    head = with_res.image_projection
    x = torch.randn(3, head.projection.in_features)
    projected = head.projection(x)
    expected = head.layer_norm(head.fc(torch.nn.functional.gelu(projected)) + projected)  # Simple-CLIP: x + projected
    assert torch.allclose(head(x), expected, atol=1e-6)
    assert not torch.allclose(without.image_projection(x), expected, atol=1e-3)


def test_load_trained_prefers_checkpoint_then_run_then_published(tmp_path, hub_cache, tiny_model, tiny_cfg,
                                                                 monkeypatch):
    model, tokenizer = tiny_model
    monkeypatch.delenv("CLIP_HINDI_CHECKPOINT", raising=False)
    assert cu.load_trained(dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "none"))) is None  # quick: train
    cu.save_checkpoint(tmp_path / "run" / "best", model, tokenizer, tiny_cfg)
    *_, source = cu.load_trained(dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "run")))
    assert source == f"your checkpoint {tmp_path / 'run' / 'best'}"
    cu.save_checkpoint(tmp_path / "mine", model, tokenizer, tiny_cfg)
    monkeypatch.setenv("CLIP_HINDI_CHECKPOINT", str(tmp_path / "mine"))  # the notebooks' CHECKPOINT field
    *_, source = cu.load_trained(dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "run")))
    assert source == f"your checkpoint {tmp_path / 'mine'}"


def test_push_to_hub_round_trip_with_model_card(tmp_path, hub_cache, synthetic, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    run = tmp_path / "run"
    cu.save_checkpoint(run / "best", model, tokenizer, tiny_cfg)
    pd.DataFrame([dict(epoch=1, val_loss=1.0)]).to_csv(run / "history.csv", index=False)
    name = f"XM3600 Hindi, {cu.XM3600_FIRST_CAPTION}"
    metrics = {name: {"t2i_R@1": 0.123, "t2i_R@5": 0.3, "t2i_R@10": 0.4, "i2t_R@1": 0.1, "i2t_R@5": 0.2}}
    commit = cu.push_to_hub(run, "me/clip-hindi-test", metrics=metrics, api=rehearsal.local_hub(hub_cache))
    snapshot = hub_cache / "models--me--clip-hindi-test" / "snapshots" / commit.oid
    card = (snapshot / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlanguage:\n- hi\nlicense: mit\n")  # quick mode: synthetic data only
    assert f"| {name} | 12.3 | 30.0 | 40.0 | 10.0 | 20.0 |  |" in card and "CLIP_benchmark's protocol" in card
    assert f"`{tiny_cfg.image_model}`" in card and f"{tiny_cfg.epochs} epochs" in card
    assert (snapshot / "history.csv").exists() and not (snapshot / "training_state.pt").exists()
    loaded, loaded_tok, cfg = cu.load_checkpoint("me/clip-hindi-test")  # through huggingface_hub, offline
    images = list(synthetic[1]["image"][:3])
    assert cfg == tiny_cfg
    assert torch.equal(cu.encode_images(loaded, images, cfg), cu.encode_images(model, images, tiny_cfg))
    assert "Not measured yet" in cu.model_card(tiny_cfg)
    full = cu.model_card(cu.Config.full())  # Flickr8k photos, NLLB-200 captions: research, non-commercial
    assert "\nlicense: other\nlicense_name: flickr8k-research-only-and-cc-by-nc-4.0\n" in full
    assert "license: mit" not in full and "Flickr8k" in full and "research use only" in full
    assert f"`{cu.DEFAULT_TRANSLATOR}`" in full and "CC-BY-NC-4.0" in full
    mine = cu.model_card(cu.Config.full(), captions="the caption file /data/mine.csv")
    assert "license_name: flickr8k-research-only\n" in mine and "/data/mine.csv; that source's own terms" in mine
    assert "CC-BY-NC" not in mine
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        cu.push_to_hub(tmp_path / "empty", "me/x", api=rehearsal.local_hub(hub_cache))


def test_load_checkpoint_says_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        cu.load_checkpoint(tmp_path / "missing")
    (tmp_path / "pub").mkdir()
    (tmp_path / "pub" / "model.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="load_published_checkpoint"):
        cu.load_checkpoint(tmp_path / "pub")


def test_a_checkpoint_saved_before_image_geometry_loads_square(tmp_path, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    crop_cfg = dataclasses.replace(tiny_cfg, image_geometry="crop")
    folder = cu.save_checkpoint(tmp_path / "old", model, tokenizer, crop_cfg)
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    del meta["config"]["image_geometry"]
    meta["config"]["eval_resize"] = "crop"  # the old field: every model then was trained on square photos
    (folder / "config.json").write_text(json.dumps(meta), encoding="utf-8")
    assert cu.load_checkpoint(folder, device="cpu")[2].image_geometry == "square"


def test_cats_vs_dogs_from_the_hub_cache_and_the_probe_split(tmp_path, hub_cache):
    rehearsal._cats_vs_dogs(rehearsal.hub_repo(hub_cache, cu.CATS_VS_DOGS, "dataset"), hub_cache)
    folder = cu.download_cats_vs_dogs(tmp_path / "probe", per_class=10)
    table = cu.labelled_folder(folder)
    assert table["label"].value_counts().to_dict() == {"कुत्ता": 10, "बिल्ली": 7}  # the broken photo is skipped
    pool, test = cu.split_labelled(table)
    assert set(pool["label"]) == set(test["label"]) == set(cu.CATS_VS_DOGS_HINDI)
    assert not set(pool["image"]) & set(test["image"]) and len(pool) + len(test) == 17
    one_fish = pd.concat([table, pd.DataFrame({"image": ["x.jpg"], "label": ["मछली"]})], ignore_index=True)
    with pytest.warns(UserWarning, match=r"fewer than 2 images: मछली \(1\)"):
        pool, test = cu.split_labelled(one_fish)
    assert "मछली" not in set(pool["label"]) | set(test["label"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        cu.split_labelled(table[table["label"] == "बिल्ली"])


def test_crop_keeps_the_aspect_ratio_square_stretches_and_the_published_is_square(tmp_path, tiny_cfg):
    wide = np.zeros((100, 200, 3), np.uint8)
    wide[:, 50:150] = 255  # a white centre square on black sides
    crop_cfg = dataclasses.replace(tiny_cfg, image_geometry="crop")
    cropped = cu.image_transforms(crop_cfg, train=False, mean=(0, 0, 0), std=(1, 1, 1), crop_pct=0.95,
                                  interpolation="bicubic")(image=wide)["image"]
    squared = cu.image_transforms(tiny_cfg, train=False, mean=(0, 0, 0), std=(1, 1, 1))(image=wide)["image"]
    assert cropped.shape == squared.shape == (3, 32, 32)
    assert cropped.mean() > 0.9  # shorter side to 33 px, centre 32 px: almost all of the white square
    assert 0.4 < squared.mean() < 0.6  # squashed: the black sides stay in
    published = cu.checkpoints._published_config(None, residual=True)
    assert published.image_geometry == "square"  # it was trained square, so it is evaluated square
    assert cu.Config.full().image_geometry == "square" and cu.Config.quick().image_geometry == "square"
    with pytest.raises(ValueError, match="no field 'eval_resize' any more: use image_geometry"):
        cu.Config.full(eval_resize="crop")
    import timm
    from timm.data import resolve_data_config

    assert resolve_data_config({}, model=timm.create_model("resnet50"))["crop_pct"] == 0.95  # what ImageEncoder reads


def _object_shape(images: torch.Tensor) -> list[tuple[float, float]]:
    """(width / height, area) of the bright object's bounding box in each uint8 image (B, 3, H, W)."""
    shapes = []
    for image in images.float().mean(1) > 127:  # (H, W) mask
        rows, cols = image.any(1).nonzero(), image.any(0).nonzero()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        shapes.append((width / height, width * height))
    return shapes


@pytest.mark.parametrize("geometry, aspect", [("square", 0.75), ("crop", 1.0)])
def test_training_and_evaluation_see_a_photo_the_same_way(geometry, aspect, tmp_path, synthetic, tiny_cfg):
    """A round object on a 4:3 photo: the training loader's views and encode_images' view agree in shape and size."""
    cfg = dataclasses.replace(tiny_cfg, image_geometry=geometry, image_size=96, batch_size=8)
    model, tokenizer = cu.build_model(cfg, captions=synthetic[1]["caption"])  # a tower built for 96 px
    photo = Image.new("RGB", (320, 240))
    ImageDraw.Draw(photo).ellipse((160 - 48, 120 - 48, 160 + 48, 120 + 48), fill=(255, 255, 255))
    photo.save(tmp_path / "wide.png")
    table = pd.DataFrame({"image": [str(tmp_path / "wide.png")] * 32, "caption": ["एक सफ़ेद गोला"] * 32})
    loader = cu.make_loader(table, tokenizer, cfg, train=True, **model.image_encoder.crop)
    train_shapes = [s for batch in loader for s in _object_shape(batch["images"])]  # 32 augmented views
    seen = []  # what encode_images hands the image tower (then stop: only its input matters here)

    def look(module, args):
        seen.append(args[0])
        raise StopIteration

    hook = model.image_encoder.register_forward_pre_hook(look)
    try:
        with pytest.raises(StopIteration):
            cu.encode_images(model, [str(tmp_path / "wide.png")], cfg)
    finally:
        hook.remove()
    (eval_aspect, eval_area), = _object_shape(seen[0])
    assert seen[0].dtype == torch.uint8 and seen[0].shape == (1, 3, 96, 96)  # the tower normalises, as in training
    assert eval_aspect == pytest.approx(aspect, rel=0.06)  # "square" squashes a 4:3 photo; "crop" keeps a circle round
    median_aspect = float(np.median([a for a, _ in train_shapes]))
    median_area = float(np.median([a for _, a in train_shapes]))
    assert median_aspect == pytest.approx(eval_aspect, rel=0.06)  # the same shape in training...
    assert median_area == pytest.approx(eval_area, rel=0.15)  # ...and the same size


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # stored landscape...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with "rotate 90° clockwise to view"
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert cu.load_image(tmp_path / "phone.jpg").shape == (40, 20, 3)


def test_cached_tables_work_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / "images" / "a.png")
    table = pd.DataFrame({"image": ["data/images/a.png"], "caption": ["एक लाल गोला"]})  # relative to the cwd
    source = dict(captions="a table", what="a one-row table")
    first = cu.tables._cached_splits("data", lambda: (table, table, table), source)
    assert first[0]["image"][0] == str(tmp_path / "data" / "images" / "a.png")
    assert pd.read_csv(tmp_path / "data" / "train.csv")["image"][0] == str(Path("images") / "a.png")
    monkeypatch.chdir(tmp_path / "data")  # a notebook's folder
    again = cu.tables._cached_splits(tmp_path / "data", lambda: pytest.fail("rebuilt"), source)
    assert Path(again[0]["image"][0]).exists()


def test_env_shortens_the_recipe_but_explicit_values_win(monkeypatch):
    monkeypatch.setenv("CLIP_HINDI_MODE", "full")
    monkeypatch.setenv("CLIP_HINDI_EPOCHS", "1")
    monkeypatch.setenv("CLIP_HINDI_BATCH_SIZE", "8")
    assert (cu.Config.from_env().epochs, cu.Config.from_env().batch_size) == (1, 8)
    assert cu.Config.from_env(epochs=3).epochs == 3
    monkeypatch.setenv("CLIP_HINDI_EPOCHS", "one")
    with pytest.raises(ValueError, match="CLIP_HINDI_EPOCHS"):
        cu.Config.from_env()
    monkeypatch.delenv("CLIP_HINDI_EPOCHS")
    monkeypatch.delenv("CLIP_HINDI_BATCH_SIZE")
    assert cu.Config.from_env().epochs == cu.Config.full().epochs


def test_mirror_folder_serves_the_archives(tmp_path, monkeypatch):
    import zipfile

    with zipfile.ZipFile(tmp_path / "captions.zip", "w") as zf:
        zf.writestr("captions.jsonl", "")
    monkeypatch.setenv("CLIP_HINDI_MIRROR", str(tmp_path))
    cu.scale.downloads._fetch(cu.XM3600_URLS["captions"], tmp_path / "xm")
    assert (tmp_path / "xm" / "captions.jsonl").exists() and (tmp_path / "xm" / "downloads" / "captions.zip").exists()
    with pytest.raises(FileNotFoundError, match="has no images.tgz"):
        cu.scale.downloads._fetch(cu.XM3600_URLS["images"], tmp_path / "xm")


# -- the notebooks' setup cell ----------------------------------------------------

def _cells(index):
    return ["".join(json.loads(p.read_text(encoding="utf-8"))["cells"][index]["source"])
            for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))]


def _run_setup(monkeypatch, versions, imported_matplotlib):
    """Execute the setup cell as Colab would (google.colab importable), with `versions` installed."""
    import importlib.metadata

    from IPython.core.inputtransformer2 import TransformerManager

    magics = []
    namespace = {}
    shell = types.SimpleNamespace(run_line_magic=lambda name, line: magics.append((name, line.format(**namespace))),
                                  system=lambda command: magics.append(("!", command)))
    namespace["get_ipython"] = lambda: shell
    colab = types.ModuleType("google.colab")
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    if imported_matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib", sys.modules.get("matplotlib") or types.ModuleType("matplotlib"))
    else:
        monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    exec(TransformerManager().transform_cell(_cells(1)[0]), namespace)
    return [line for name, line in magics if name == "pip"]


NEW = {"matplotlib": "3.11.2", "fontpkg-noto-sans-devanagari": "2.7", "albumentations": "2.0.8", "timm": "1.0.31",
       "pyarrow": "26.0.1", "faiss-cpu": "1.15.1", "transformers": "5.23.0", "accelerate": "1.15.0"}


def test_setup_cell_is_the_same_everywhere_and_installs_only_what_is_missing(monkeypatch):
    assert len(set(_cells(1))) == 1 and len(set(_cells(2))) == 1  # setup and settings cells
    assert _run_setup(monkeypatch, NEW, imported_matplotlib=True) == []  # a second run installs nothing
    colab = dict(NEW, matplotlib="3.10.0")
    del colab["fontpkg-noto-sans-devanagari"]
    assert _run_setup(monkeypatch, colab, imported_matplotlib=False) == [
        "install -q 'matplotlib>=3.11' 'fontpkg-noto-sans-devanagari>=2.7'"]
    older = dict(NEW, transformers="4.57.1")  # distillation and the CLIP towers need transformers 5
    assert _run_setup(monkeypatch, older, imported_matplotlib=False) == ["install -q 'transformers>=5.0'"]
    with pytest.raises(RuntimeError, match="Restart session"):
        _run_setup(monkeypatch, colab, imported_matplotlib=True)


def test_notebooks_ask_for_a_gpu_and_offer_colab_fields():
    for path in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        meta = json.loads(path.read_text(encoding="utf-8"))["metadata"]
        assert meta["accelerator"] == "GPU" and meta["colab"]["gpuType"], path.name
    settings = _cells(2)[0]
    for field in ("MODE", "CAPTIONS", "CHECKPOINT", "SAVE_TO_DRIVE"):
        assert f"\n{field} = " in settings and "#@param" in settings.split(f"\n{field} = ")[1].split("\n")[0], field
