import re

import numpy as np
import pytest
import torch

import clip_utils as cu


def _batch(synthetic, tokenizer, cfg, n=4):
    return next(iter(cu.make_loader(synthetic[1].head(n), tokenizer, cfg, train=False)))


def test_shapes(synthetic, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    batch = _batch(synthetic, tokenizer, tiny_cfg)
    image_embeds, text_embeds = model(batch)
    assert image_embeds.shape == text_embeds.shape == (4, tiny_cfg.projection_dim)
    assert cu.encode_texts(model, tokenizer, ["एक लाल गोला"] * 3, tiny_cfg).shape == (3, tiny_cfg.projection_dim)
    embeds = cu.encode_images(model, list(synthetic[1]["image"][:5]), tiny_cfg)
    assert torch.allclose(embeds.norm(dim=1), torch.ones(5), atol=1e-5)


def test_flatten_pool_keeps_the_grid(tiny_cfg):
    import dataclasses

    avg = cu.ImageEncoder(tiny_cfg)
    flat = cu.ImageEncoder(dataclasses.replace(tiny_cfg, image_pool="flatten"))
    assert flat.out_dim == avg.out_dim * (tiny_cfg.image_size // 32) ** 2


def test_parameter_names_follow_the_published_layout(tiny_model):
    model, _ = tiny_model
    keys = list(model.state_dict())
    for prefix in ("image_encoder.model.", "text_encoder.model.", "image_projection.projection.",
                   "image_projection.fc.", "image_projection.layer_norm.", "text_projection.projection."):
        assert any(k.startswith(prefix) for k in keys), prefix
    allowed = re.compile(r"^(image_encoder\.model|text_encoder\.model|(image|text)_projection\."
                         r"(projection|fc|layer_norm))\.|^logit_scale$")
    assert all(allowed.match(k) for k in keys)


def test_three_learning_rates_and_decay_on_head_matrices_only(tiny_model, tiny_cfg):
    model, _ = tiny_model
    groups = cu.make_optimizer(model, tiny_cfg).param_groups
    assert [g["name"] for g in groups] == ["image_encoder", "text_encoder", "heads", "heads"]
    assert [g["lr"] for g in groups] == [tiny_cfg.image_encoder_lr, tiny_cfg.text_encoder_lr] + [tiny_cfg.head_lr] * 2
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())  # all that train
    decayed, kept = groups[2], groups[3]  # open_clip's rule: no decay on 1-D parameters and the temperature
    assert decayed["weight_decay"] == tiny_cfg.weight_decay > 0 and all(p.ndim > 1 for p in decayed["params"])
    assert kept["weight_decay"] == 0 and all(p.ndim <= 1 for p in kept["params"])
    assert any(p is model.logit_scale for p in kept["params"])
    assert all(g["weight_decay"] == 0 for g in groups[:2])


def test_checkpoint_round_trip_gives_identical_embeddings(tmp_path, synthetic, tiny_model, tiny_cfg):
    model, tokenizer = tiny_model
    images, captions = list(synthetic[1]["image"][:6]), list(synthetic[1]["caption"][:6])
    before_i = cu.encode_images(model, images, tiny_cfg)
    before_t = cu.encode_texts(model, tokenizer, captions, tiny_cfg)
    cu.save_checkpoint(tmp_path / "ckpt", model, tokenizer, tiny_cfg)
    cu.save_checkpoint(tmp_path / "ckpt", model, tokenizer, tiny_cfg)  # overwriting is safe
    loaded, loaded_tok, cfg = cu.load_checkpoint(tmp_path / "ckpt")
    assert cfg == tiny_cfg
    assert torch.equal(cu.encode_images(loaded, images, cfg), before_i)
    assert torch.equal(cu.encode_texts(loaded, loaded_tok, captions, cfg), before_t)
    assert not (tmp_path / "ckpt.tmp").exists()


def test_mismatched_checkpoint_lists_the_keys(tmp_path, synthetic, tiny_model, tiny_cfg):
    import dataclasses

    model, tokenizer = tiny_model
    cu.save_checkpoint(tmp_path / "ckpt", model, tokenizer, tiny_cfg)
    other, _ = cu.build_model(dataclasses.replace(tiny_cfg, projection_dim=16), captions=synthetic[1]["caption"])
    with pytest.raises(ValueError, match="shape mismatch \\['image_projection"):
        cu.checkpoints._load_weights(other, tmp_path / "ckpt" / "model.safetensors")


def test_published_layout_state_dict_loads(tmp_path, tiny_model, tiny_cfg):
    import dataclasses

    model, _ = tiny_model
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "logit_scale"}  # published: no temperature
    torch.save(state, tmp_path / "model.pt")
    cfg = dataclasses.replace(tiny_cfg, residual_heads=False)
    published = cu.load_published_checkpoint(tmp_path / "model.pt", cfg,
                                             text_encoder_model=type(model.text_encoder.model)(
                                                 model.text_encoder.model.config))
    assert torch.equal(published.image_projection.fc.weight, model.image_projection.fc.weight)
    assert published.image_projection.residual is True  # the Simple-CLIP head it was trained with
    assert published.logit_scale.item() == 0.0  # temperature 1, as the published loss used


def test_full_mode_path_loads_a_local_pretrained_bert(tmp_path, synthetic, tiny_cfg):
    """The pretrained-text code path (AutoModel/AutoTokenizer by name) run offline on a saved tiny BERT."""
    import dataclasses

    from transformers import BertConfig, BertModel

    tokenizer = cu.train_wordpiece_tokenizer(synthetic[1]["caption"], vocab_size=300)
    BertModel(BertConfig(vocab_size=len(tokenizer), **tiny_cfg.text_config)).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    cfg = dataclasses.replace(tiny_cfg, text_pretrained=True, text_model=str(tmp_path / "bert"), pooling="mean")
    with pytest.warns(UserWarning, match="matras"):  # its tiny vocabulary lacks क्ष: [UNK], and we say so
        model, tok = cu.build_model(cfg)
    assert cu.encode_texts(model, tok, ["एक लाल गोला"], cfg).shape == (1, cfg.projection_dim)


def test_config_presets_and_env(monkeypatch):
    full = cu.Config.full()
    assert (full.image_model, full.text_model, full.batch_size, full.head_lr) == (
        "resnet50", "l3cube-pune/hindi-bert-v2", 32, 1e-3)
    monkeypatch.setenv("CLIP_HINDI_MODE", "quick")
    assert cu.Config.from_env().mode == "quick"
    monkeypatch.setenv("CLIP_HINDI_MODE", "full")
    assert cu.Config.from_env(batch_size=8).batch_size == 8
    monkeypatch.setenv("CLIP_HINDI_MODE", "fast")
    with pytest.raises(ValueError):
        cu.Config.from_env()


def test_full_mode_path_loads_timm_weights_from_a_local_file(tmp_path, tiny_cfg):
    """image_pretrained=True goes through timm's own loader; the file stands in for the Hub download."""
    import dataclasses

    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=0, **tiny_cfg.image_model_kwargs)
    save_file(source.state_dict(), str(tmp_path / "weights.safetensors"))
    kwargs = dict(tiny_cfg.image_model_kwargs, pretrained_cfg_overlay=dict(file=str(tmp_path / "weights.safetensors")))
    cfg = dataclasses.replace(tiny_cfg, image_pretrained=True, image_model_kwargs=kwargs)
    with pytest.warns(UserWarning, match="pretrained at 224 px"):  # tiny_cfg uses 32 px
        encoder = cu.ImageEncoder(cfg)
    for key, value in source.state_dict().items():
        assert torch.equal(encoder.model.state_dict()[key], value), key
    assert encoder.mean == (0.485, 0.456, 0.406)  # resnet18's own normalisation, from timm's config


def test_published_checkpoint_reports_missing_and_unexpected_keys(tmp_path, tiny_model, tiny_cfg):
    import dataclasses

    model, _ = tiny_model
    state = {"module." + k: v.clone() for k, v in model.state_dict().items()}  # saved from DataParallel
    del state["module.text_projection.fc.bias"]
    state["module.text_encoder.model.embeddings.position_ids"] = torch.arange(64)[None]
    torch.save(state, tmp_path / "model.pt")
    cfg = dataclasses.replace(tiny_cfg, residual_heads=False)
    bert = type(model.text_encoder.model)(model.text_encoder.model.config)
    with pytest.warns(UserWarning, match=r"1 missing keys \['text_projection.fc.bias'\], 1 unexpected"):
        cu.load_published_checkpoint(tmp_path / "model.pt", cfg, text_encoder_model=bert)
    with pytest.raises(FileNotFoundError):
        cu.load_published_checkpoint(tmp_path / "no_such_model.pt", cfg, text_encoder_model=bert)
    torch.save({"state_dict": state}, tmp_path / "wrapped.pt")  # nothing matches: an error, not a random model
    with pytest.raises(ValueError, match="does not hold the published layout"):
        cu.load_published_checkpoint(tmp_path / "wrapped.pt", cfg, text_encoder_model=bert)
    state["module.image_projection.fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"shape mismatch \['image_projection.fc.weight'\]"):
        cu.load_published_checkpoint(tmp_path / "model.pt", cfg, text_encoder_model=bert)


def test_gallery_cache_is_reused_and_invalidated(tmp_path, synthetic, tiny_model, tiny_cfg):
    import shutil

    model, tokenizer = tiny_model
    images = [shutil.copy(p, tmp_path) for p in synthetic[1]["image"].unique()[:5]]
    cache = tmp_path / "cache"
    first = cu.embed_gallery(model, images, tiny_cfg, cache_dir=cache)
    assert len(list(cache.glob("gallery-*.npy"))) == 1
    again = cu.embed_gallery(model, images, tiny_cfg, cache_dir=cache, in_memory=False)  # reused, from disk
    assert isinstance(again, np.memmap) and np.array_equal(again, first.numpy())
    assert len(list(cache.glob("gallery-*.npy"))) == 1
    cu.embed_gallery(model, images[:4], tiny_cfg, cache_dir=cache)  # another file list
    assert len(list(cache.glob("gallery-*.npy"))) == 2
    with torch.no_grad():
        model.image_projection.layer_norm.bias.add_(0.5)  # "retrained"
    try:
        changed = cu.embed_gallery(model, images, tiny_cfg, cache_dir=cache)
    finally:
        with torch.no_grad():
            model.image_projection.layer_norm.bias.sub_(0.5)
    assert len(list(cache.glob("gallery-*.npy"))) == 3 and not torch.equal(changed, first)
    hits = cu.search_images("एक लाल गोला", model, tokenizer, images, tiny_cfg, k=3, image_embeds=first)
    assert len(hits) == 3 and set(hits["image"]) <= set(images)


def test_zero_shot_takes_a_float16_gallery(synthetic, tiny_cfg, tiny_model):
    _, _, _, test = synthetic
    model, tokenizer = tiny_model
    images = list(test["image"].unique()[:4])
    classes = ["लाल गोला", "नीली पतंग", "हरा तारा"]
    gallery = cu.embed_gallery(model, images, tiny_cfg)  # float16 by default
    assert gallery.dtype == torch.float16
    probs = cu.zero_shot_classify(model, tokenizer, None, classes, tiny_cfg, image_embeds=gallery)
    exact = cu.zero_shot_classify(model, tokenizer, images, classes, tiny_cfg)
    assert probs.shape == (4, 3) and torch.allclose(probs, exact, atol=1e-2)
