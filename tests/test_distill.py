"""Distillation from an English CLIP, and LiT: the teacher stays frozen, the student learns and saves,
the CLIP tower keeps its weights, and the full-mode path runs on a tiny CLIP saved under the real name."""
import dataclasses

import pandas as pd
import pytest
import torch
from rehearsal import hub_repo  # tests/ is on sys.path
from tiny_clip import save_tiny_clip

import clip_utils as cu
from clip_utils.distill import _mean_distill_loss

TEACHER_NAME = "openai/clip-vit-base-patch32"


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _student_cfg(tiny_cfg, tmp_path, **overrides):
    knobs = dict(epochs=3, batch_size=16, text_encoder_lr=1e-3, head_lr=3e-3, patience=5, max_minutes=None,
                 out_dir=str(tmp_path / "student"))
    return dataclasses.replace(tiny_cfg, **{**knobs, **overrides})


def test_distillation_loss_falls_and_the_teacher_stays_frozen(synthetic, tiny_cfg, tmp_path):
    _, train, val, _ = synthetic
    teacher, teacher_tokenizer = cu.build_model(tiny_cfg, captions=train["english"])  # random: fixed targets
    before = _state(teacher)
    student, tokenizer, cfg = cu.student_clip(teacher, tiny_cfg, _student_cfg(tiny_cfg, tmp_path),
                                              captions=train["caption"])
    targets = cu.encode_texts(teacher, teacher_tokenizer, list(val["english"]), cfg)
    start = _mean_distill_loss(student, tokenizer, [cu.normalize_caption(c) for c in val["caption"]], targets, cfg,
                          torch.device("cpu"), torch.autocast("cpu", enabled=False))
    history = cu.distill_text_tower(student, tokenizer, teacher, teacher_tokenizer, train, val, cfg)
    assert len(history) == 3
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_loss"].min() < 0.8 * start, (start, history["val_loss"].tolist())
    assert _same(before, _state(teacher)), "the teacher changed during distillation"
    assert (tmp_path / "student" / "best" / "model.safetensors").exists()
    assert (tmp_path / "student" / "history.csv").exists()


def test_distilled_model_uses_the_teacher_image_side_and_reloads_identically(synthetic, tiny_cfg, tmp_path):
    _, train, val, test = synthetic
    teacher, teacher_tokenizer = cu.build_model(tiny_cfg, captions=train["english"])
    student, tokenizer, cfg = cu.student_clip(teacher, tiny_cfg, _student_cfg(tiny_cfg, tmp_path, epochs=1),
                                              captions=train["caption"])
    cu.distill_text_tower(student, tokenizer, teacher, teacher_tokenizer, train, val, cfg)
    images, captions = list(test["image"].unique()), list(test["caption"])
    image_embeds = cu.encode_images(student, images, cfg)
    assert torch.equal(image_embeds, cu.encode_images(teacher, images, tiny_cfg))  # the teacher's image space
    loaded, loaded_tokenizer, loaded_cfg = cu.load_checkpoint(tmp_path / "student" / "best", device="cpu")
    assert torch.equal(cu.encode_images(loaded, images, loaded_cfg), image_embeds)
    assert torch.equal(cu.encode_texts(loaded, loaded_tokenizer, captions, loaded_cfg),
                       cu.encode_texts(student, tokenizer, captions, cfg))
    metrics = cu.retrieval_metrics(loaded, loaded_tokenizer, test, loaded_cfg)  # any package function takes it
    assert 0 <= metrics["t2i_R@1"] <= 1


def test_pairs_without_an_english_column_are_refused_by_name(synthetic, tiny_cfg, tmp_path):
    _, train, val, _ = synthetic
    teacher, teacher_tokenizer = cu.build_model(tiny_cfg, captions=train["english"])
    student, tokenizer, cfg = cu.student_clip(teacher, tiny_cfg, _student_cfg(tiny_cfg, tmp_path),
                                              captions=train["caption"])
    with pytest.raises(ValueError, match="english"):
        cu.distill_text_tower(student, tokenizer, teacher, teacher_tokenizer, train.drop(columns="english"), val, cfg)


def test_lit_keeps_the_clip_tower_weights_and_batch_norm_statistics(synthetic, tiny_cfg, tmp_path):
    _, train, val, _ = synthetic
    cfg = cu.lit_config(tiny_cfg, "resnet50_clip_gap.openai")
    assert (cfg.freeze, cfg.image_size) == ("image", 224)  # CLIP's own input size, read from timm's config
    # offline and fast: the architecture without downloading its weights, at 64 px (a pooled head takes any size)
    cfg = dataclasses.replace(cfg, image_pretrained=False, image_size=64, epochs=1, out_dir=str(tmp_path / "lit"))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    assert model.image_encoder.mean == pytest.approx((0.4815, 0.4578, 0.4082), abs=1e-4)  # CLIP's, not ImageNet's
    tower, text = _state(model.image_encoder), _state(model.text_encoder)
    assert any("running_mean" in k for k in tower)
    small = train[train["image"].isin(train["image"].unique()[:8])]
    cu.fit(model, tokenizer, small, val.head(8), cfg)
    assert _same(tower, _state(model.image_encoder)), "the frozen CLIP tower's weights or batch-norm stats moved"
    assert not _same(text, _state(model.text_encoder)), "the text tower did not train"


def test_full_mode_path_through_a_tiny_clip_saved_under_the_real_name(synthetic, tiny_cfg, tmp_path, hub_cache):
    from transformers import CLIPModel as HFCLIPModel

    _, train, val, test = synthetic
    reference, reference_tokenizer = save_tiny_clip(hub_repo(hub_cache, TEACHER_NAME))
    assert HFCLIPModel.from_pretrained(TEACHER_NAME) is not None  # offline, from the cache: the real call
    teacher, teacher_tokenizer, teacher_cfg = cu.clip_from_transformers(TEACHER_NAME, tiny_cfg)
    assert (teacher_cfg.image_size, teacher_cfg.projection_dim, teacher_cfg.heads) == (32, 16, "linear")
    texts = ["a big red circle on the left", "two small blue stars"]
    tokens = reference_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference.get_text_features(**tokens).pooler_output
    expected = torch.nn.functional.normalize(expected, dim=-1)
    assert torch.allclose(cu.encode_texts(teacher, teacher_tokenizer, texts, teacher_cfg), expected, atol=1e-5)
    images = list(test["image"].unique()[:4])
    pixels = torch.stack([cu.image_transforms(teacher_cfg, train=False, mean=teacher.image_encoder.mean,
                                              std=teacher.image_encoder.std)(image=cu.load_image(p, 32))["image"]
                          for p in images])
    with torch.no_grad():
        expected = reference.get_image_features(pixel_values=pixels).pooler_output
    expected = torch.nn.functional.normalize(expected, dim=-1)
    assert torch.allclose(cu.encode_images(teacher, images, teacher_cfg), expected, atol=1e-5)

    before = _state(teacher)
    # A student that reads 100 tokens, and an English caption longer than the teacher's 77: the teacher truncates.
    long_context = dict(tiny_cfg.text_config, max_position_embeddings=128)
    student, tokenizer, cfg = cu.student_clip(teacher, teacher_cfg, _student_cfg(
        tiny_cfg, tmp_path, epochs=2, max_length=100, text_config=long_context), captions=train["caption"])
    train = train.assign(english=[" ".join([e] * 12) if i == 0 else e for i, e in enumerate(train["english"])])
    assert len(teacher_tokenizer(train["english"].iloc[0])["input_ids"]) > 100
    history = cu.distill_text_tower(student, tokenizer, teacher, teacher_tokenizer, train, val, cfg)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert _same(before, _state(teacher))
    loaded, loaded_tokenizer, loaded_cfg = cu.load_checkpoint(tmp_path / "student" / "best", device="cpu")
    assert loaded_cfg.image_model == TEACHER_NAME
    assert torch.equal(cu.encode_images(loaded, images, loaded_cfg), cu.encode_images(teacher, images, teacher_cfg))
    assert torch.equal(cu.encode_texts(loaded, loaded_tokenizer, list(test["caption"]), loaded_cfg),
                       cu.encode_texts(student, tokenizer, list(test["caption"]), cfg))

    lit = cu.lit_config(dataclasses.replace(tiny_cfg, out_dir=str(tmp_path / "lit"), epochs=1), TEACHER_NAME)
    assert (lit.image_size, lit.freeze) == (32, "image")
    lit_model, lit_tokenizer = cu.build_model(lit, captions=train["caption"])  # the CLIP vision tower, by name
    assert lit_model.image_encoder.mean == teacher.image_encoder.mean
    tower = _state(lit_model.image_encoder)
    cu.fit(lit_model, lit_tokenizer, train.head(16), val.head(8), lit)
    assert _same(tower, _state(lit_model.image_encoder))


def test_distillation_resumes_to_the_uninterrupted_run(synthetic, tiny_cfg, tmp_path, monkeypatch):
    """Distillation runs in fit's loop: killed in its third validation, resume=True ends where a whole run ends."""
    _, train, val, _ = synthetic
    teacher, teacher_tokenizer = cu.build_model(tiny_cfg, captions=train["english"])
    runs = {}
    for name in ("whole", "killed"):
        student, tokenizer, cfg = cu.student_clip(teacher, tiny_cfg, _student_cfg(
            tiny_cfg, tmp_path, out_dir=str(tmp_path / name)), captions=train["caption"])
        runs[name] = (student, tokenizer, cfg)
    whole = cu.distill_text_tower(*runs["whole"][:2], teacher, teacher_tokenizer, train, val, runs["whole"][2])
    real_evaluate, calls = cu.distill._DistillTask.evaluate, []

    def dies_in_third_validation(self, model):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("session killed")
        return real_evaluate(self, model)

    monkeypatch.setattr(cu.distill._DistillTask, "evaluate", dies_in_third_validation)
    student, tokenizer, cfg = runs["killed"]
    with pytest.raises(KeyboardInterrupt):
        cu.distill_text_tower(student, tokenizer, teacher, teacher_tokenizer, train, val, cfg)
    monkeypatch.undo()
    student, tokenizer, cfg = cu.student_clip(teacher, tiny_cfg, _student_cfg(
        tiny_cfg, tmp_path, out_dir=str(tmp_path / "killed")), captions=train["caption"])  # a fresh session
    resumed = cu.distill_text_tower(student, tokenizer, teacher, teacher_tokenizer, train, val, cfg, resume=True)
    columns = ["epoch", "train_loss", "val_loss", "val_cosine", "lr_text_encoder", "lr_heads"]
    pd.testing.assert_frame_equal(resumed[columns], whole[columns], rtol=1e-5)
    assert (tmp_path / "killed" / "last" / "training_state.pt").exists()
    assert all(p.requires_grad for p in student.image_encoder.parameters())  # the image side's flags come back


@pytest.mark.parametrize("name, size", [("resnet50_clip.openai", 64), ("vit_base_patch16_clip_224.openai", 224)])
def test_lit_towers_are_built_as_their_owners_built_them(tiny_cfg, name, size):
    """The default LiT tower (attention-pool head) and a CLIP ViT (class token, `norm`, no fc_norm): every key of
    timm's pretrained layout but the classifier it drops loads into the tower (random weights, no download)."""
    import timm

    cfg = cu.lit_config(tiny_cfg) if name == "resnet50_clip.openai" else cu.lit_config(tiny_cfg, name)
    assert cfg.image_model == name and cfg.image_size == 224 and cfg.image_pool == "model"
    cfg = dataclasses.replace(cfg, image_pretrained=False, image_size=size)  # the CLIP ResNet's pool takes any size
    encoder = cu.ImageEncoder(cfg)
    reference = timm.create_model(name, pretrained=False)  # the layout timm's pretrained weights load into
    classifier = timm.get_pretrained_cfg(name).classifier  # dropped by num_classes=0, as timm drops it
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(classifier + ".")}
    encoder.model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    if "vit" in name:
        assert encoder.model.global_pool == "token" and isinstance(encoder.model.fc_norm, torch.nn.Identity)
    else:
        assert type(encoder.model.head).__name__ == "AttentionPool2d"
    with torch.no_grad():
        assert encoder.eval()(torch.zeros(1, 3, size, size)).shape == (1, encoder.out_dim)
