import dataclasses

import pandas as pd
import pytest
import torch

import clip_utils as cu


def test_same_seed_same_history(synthetic, tiny_cfg, tmp_path):
    _, train, val, _ = synthetic
    runs = []
    for name in ("a", "b"):
        cfg = dataclasses.replace(tiny_cfg, epochs=2, out_dir=str(tmp_path / name))
        model, tokenizer = cu.build_model(cfg, captions=train["caption"])
        runs.append(cu.fit(model, tokenizer, train, val, cfg))
    a, b = runs
    pd.testing.assert_frame_equal(a[["train_loss", "val_loss"]], b[["train_loss", "val_loss"]], check_exact=True)
    saved = pd.read_csv(tmp_path / "a" / "history.csv")
    assert list(saved.columns[:6]) == ["epoch", "train_loss", "val_loss", "lr_image_encoder",
                                       "lr_text_encoder", "lr_heads"]
    assert len(saved) == 2 and (tmp_path / "a" / "best" / "model.safetensors").exists()
    assert saved["val_t2i_r1"].between(0, 1).all()  # validation R@1, from the validation pass itself


def test_non_finite_loss_stops_with_a_clear_message(synthetic, tiny_cfg, tmp_path):
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, out_dir=str(tmp_path))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    with torch.no_grad():
        model.text_projection.fc.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 1, batch 0"):
        cu.fit(model, tokenizer, train, val, cfg)


@pytest.mark.slow
def test_quick_mode_learns_far_above_chance(tmp_path):
    """End to end on the synthetic set: retrieval on unseen colour-shape combinations beats chance by far."""
    train, val, test = cu.prepare_quick_data(tmp_path / "data", n_images=500, seed=5)
    cfg = cu.Config.quick(epochs=5, max_minutes=None, out_dir=str(tmp_path / "run"))  # no wall-clock cut under load
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    history = cu.fit(model, tokenizer, train, val, cfg)
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    metrics = cu.retrieval_metrics(model, tokenizer, test, cfg)
    chance_at_5 = 5 / test["image"].nunique()
    assert metrics["t2i_R@5"] > 4 * chance_at_5, metrics


@pytest.mark.parametrize("hard_negatives, accumulate", [(0, 1), (4, 1), (0, 3)])
def test_resume_after_a_kill_repeats_the_uninterrupted_run(synthetic, tiny_cfg, tmp_path, monkeypatch, hard_negatives,
                                                           accumulate):
    """Colab dies in epoch 3 of 3: fit(resume=True) continues from "last" to the same history.

    With gradient accumulation the epoch's batches are not a multiple of 3 here: a group that
    carried gradients over into the next epoch would make the resumed run (which starts clean) differ.
    """
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, epochs=3, hard_negatives=hard_negatives, out_dir=str(tmp_path / "whole"),
                              gradient_accumulation_steps=accumulate)
    if accumulate > 1:
        assert len(cu.clean_table(train, cfg)) // cfg.batch_size % accumulate, "the test needs a ragged group"
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    whole = cu.fit(model, tokenizer, train, val, cfg)

    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "killed"))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    real_validate, calls = cu.train._validate, []

    def dies_in_third_validation(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("session killed")
        return real_validate(*args)

    monkeypatch.setattr(cu.train, "_validate", dies_in_third_validation)
    with pytest.raises(KeyboardInterrupt):
        cu.fit(model, tokenizer, train, val, cfg)
    monkeypatch.setattr(cu.train, "_validate", real_validate)
    assert len(pd.read_csv(tmp_path / "killed" / "history.csv")) == 2

    model, tokenizer = cu.build_model(cfg, captions=train["caption"])  # a fresh session
    resumed = cu.fit(model, tokenizer, train, val, cfg, resume=True)
    columns = ["epoch", "train_loss", "val_loss", "lr_image_encoder", "lr_text_encoder", "lr_heads", "temperature"]
    pd.testing.assert_frame_equal(resumed[columns], whole[columns], rtol=1e-5)


def test_frozen_image_tower_keeps_weights_and_batch_norm(synthetic, tiny_cfg, tmp_path):
    """LiT: the locked image tower neither learns nor updates its batch-norm statistics."""
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, freeze="image", out_dir=str(tmp_path))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    text_before = model.text_encoder.model.embeddings.word_embeddings.weight.clone()
    model.train()
    assert not model.image_encoder.training and model.text_encoder.training
    cu.fit(model, tokenizer, train.head(40), val.head(10), cfg)
    after = model.image_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running_mean/var included
    assert not torch.equal(text_before, model.text_encoder.model.embeddings.word_embeddings.weight)
    with pytest.raises(ValueError, match="freeze"):
        cu.build_model(dataclasses.replace(cfg, freeze="both"), captions=train["caption"])


def test_similar_batches_group_look_alikes_and_use_each_row_once():
    """Four clusters of four near-identical images: every group of 4 is one cluster, every row used once."""
    torch.manual_seed(0)
    centres = torch.randn(4, 16)
    image_embeds = centres.repeat_interleave(4, 0) + 0.01 * torch.randn(16, 16)  # images 4c..4c+3 alike
    image_ids = list(range(16)) * 2  # two caption rows per image
    batches = cu.similar_batches(image_embeds, image_ids, batch_size=8, group=4, seed=3)
    rows = [row for batch in batches for row in batch]
    assert len(batches) == 4 and all(len(batch) == 8 for batch in batches)
    assert sorted(rows) == list(range(32))
    groups = [rows[i:i + 4] for i in range(0, 32, 4)]
    assert all(len({image_ids[row] // 4 for row in g}) == 1 for g in groups), groups
    assert all(len({image_ids[row] for row in g}) == 4 for g in groups)  # four different images
    assert cu.similar_batches(image_embeds, image_ids, 8, 4, seed=3) == batches
    assert cu.similar_batches(image_embeds, image_ids, 8, 4, seed=4) != batches
    small = cu.similar_batches(image_embeds[:3], [0, 1, 2], batch_size=8, group=4, seed=0)
    assert [sorted(b) for b in small] == [[0, 1, 2]]  # fewer rows than a batch: one batch


def test_fit_trains_on_mined_batches_from_the_second_epoch(synthetic, tiny_cfg, tmp_path, monkeypatch):
    """Epoch 2 steps through exactly the batches similar_batches returns, mined from embeddings in row order."""
    _, train, val, _ = synthetic
    train = train.sample(frac=1, random_state=0).reset_index(drop=True)  # first-seen order is not path order
    image_ids = pd.factorize(train["image"])[0]
    calls, stepped, real_embed = [], [], cu.train._ClipTask.embed

    def fake_similar_batches(image_embeds, ids, batch_size, group, seed):
        rows = [0, 5, len(train) - 1]
        direct = cu.encode_images(model, list(train["image"][rows]), cfg)  # the same weights, encoded here
        calls.append(dict(aligned=torch.allclose(image_embeds[ids[rows]], direct, atol=1e-5),
                          ids=list(ids), batch_size=batch_size, group=group))
        return [[5, 0, 3, 7], [1, 2]]

    def recording_embed(self, model, batch):  # the training forward pass, once per batch (k = 1)
        stepped.append(batch["image_ids"].tolist())
        return real_embed(self, model, batch)

    monkeypatch.setattr(cu.train, "similar_batches", fake_similar_batches)
    monkeypatch.setattr(cu.train._ClipTask, "embed", recording_embed)
    for group in (0, 4):
        cfg = dataclasses.replace(tiny_cfg, epochs=2, hard_negatives=group, out_dir=str(tmp_path / str(group)))
        model, tokenizer = cu.build_model(cfg, captions=train["caption"])
        stepped.clear()
        cu.fit(model, tokenizer, train, val, cfg)
    assert len(calls) == 1  # never without hard_negatives, never in the first epoch
    assert calls[0]["aligned"] and calls[0]["ids"] == list(image_ids)
    assert (calls[0]["batch_size"], calls[0]["group"]) == (cfg.batch_size, 4)
    # a batch carries each row's factorized image id
    assert stepped[-2:] == [[image_ids[r] for r in [5, 0, 3, 7]], [image_ids[r] for r in [1, 2]]]


def test_accumulation_updates_every_k_batches_and_leaves_no_gradient_behind(synthetic, tiny_cfg, tmp_path):
    """k=3: one AdamW update per 3 batches; the epoch's ragged rest is dropped, not carried into the next epoch."""
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, epochs=2, gradient_accumulation_steps=3, out_dir=str(tmp_path))
    batches = len(cu.clean_table(train, cfg)) // cfg.batch_size
    assert batches % 3, "the test needs a ragged group"
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    cu.fit(model, tokenizer, train, val, cfg)
    assert all(p.grad is None for p in model.parameters())
    state = torch.load(tmp_path / "last" / "training_state.pt", weights_only=True)["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {2 * (batches // 3)}


# -- accumulation that enlarges the negatives ----------------------------------------------------

def _tiny_model_and_batch(rows=12):
    """A tiny CLIP in fp32 with dropout off and batch norm in eval mode, and one batch with repeated images."""
    from transformers import BertConfig, BertModel

    cfg = cu.Config.quick(image_size=32, batch_size=rows, dropout=0.0, device="cpu", precision="fp32",
                          image_model_kwargs=dict(channels=(8, 16, 16, 32), stem_width=8, zero_init_last=False))
    cu.config._seed_everything(0)
    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=16))
    model = cu.CLIPModel(cfg, cu.ImageEncoder(cfg), cu.TextEncoder(cfg, bert)).eval()  # BN statistics fixed
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 6, 7, 2, 8, 9][:rows])  # images 0 and 2 captioned in two micro-batches
    images = torch.randn(10, 3, 32, 32, generator=g)[ids]
    mask = torch.ones(rows, 6, dtype=torch.long)
    mask[::3, 4:] = 0
    batch = dict(images=images, input_ids=torch.randint(1, 50, (rows, 6), generator=g), attention_mask=mask,
                 image_ids=ids)
    return model, cfg, batch


def _loss_and_grads(model, losses):
    """Backpropagate every loss; (the losses' values, the summed gradients)."""
    model.zero_grad(set_to_none=True)
    values = []
    for loss in losses:
        loss.backward()
        values.append(loss.item())
    return values, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_same(one, accumulated):
    (whole,), grads = one
    values, accumulated_grads = accumulated
    assert values == pytest.approx([whole] * len(values), abs=1e-5), "loss"
    assert grads.keys() == accumulated_grads.keys() and "logit_scale" in grads
    for name in grads:
        torch.testing.assert_close(accumulated_grads[name], grads[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"grad {name}: {m}")


def test_accumulation_scores_every_row_against_all_micro_batches():
    """k = 3 micro-batches of 4 rows: the same loss and gradients as one batch of the 12 rows (open_clip's method);
    plain accumulation (each micro-batch against its own negatives) fails the same check."""
    model, cfg, batch = _tiny_model_and_batch()
    accelerator = cu.train._accelerator(cfg)
    task = cu.train._Contrastive(cfg, accelerator)
    one = _loss_and_grads(model, cu.loop.accumulated_losses(task, model, [batch], cfg, accelerator))
    micro = [{k: v[i:i + 4] for k, v in batch.items()} for i in (0, 4, 8)]
    _assert_same(one, _loss_and_grads(model, cu.loop.accumulated_losses(task, model, micro, cfg, accelerator)))

    def plain(m):  # the negative control: each micro-batch scored against its own 4 rows, averaged
        return task.loss(model, task.embed(model, m), [m]) / len(micro)
    with pytest.raises(AssertionError, match="loss|grad"):
        _assert_same(one, _loss_and_grads(model, [sum(plain(m) for m in micro)]))


# -- a time-budget stop in the middle of an epoch ------------------------------------------------

def test_a_budget_stop_mid_epoch_records_nothing_of_it_and_resume_repeats_it(synthetic, tiny_cfg, tmp_path,
                                                                          monkeypatch):
    """The budget runs out at batch 10 of epoch 2 of 3: history.csv keeps epoch 1 only; resume gives the whole run."""
    _, train, val, _ = synthetic
    cfg = dataclasses.replace(tiny_cfg, epochs=3, out_dir=str(tmp_path / "whole"))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    whole = cu.fit(model, tokenizer, train, val, cfg)

    steps = len(cu.clean_table(train, cfg)) // cfg.batch_size
    checks = []

    def spent_at_batch_10_of_epoch_2(*args):  # the loop asks after every update and after every epoch
        checks.append(1)
        return len(checks) == steps + 1 + 10

    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "stopped"), max_minutes=60.0)
    monkeypatch.setattr(cu.loop, "_budget_spent", spent_at_batch_10_of_epoch_2)
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    stopped = cu.fit(model, tokenizer, train, val, cfg)
    assert len(checks) == steps + 1 + 10 and list(stopped["epoch"]) == [1]
    assert list(pd.read_csv(tmp_path / "stopped" / "history.csv")["epoch"]) == [1]
    monkeypatch.undo()

    model, tokenizer = cu.build_model(cfg, captions=train["caption"])  # a fresh session
    resumed = cu.fit(model, tokenizer, train, val, cfg, resume=True)
    columns = ["epoch", "train_loss", "val_loss", "val_t2i_r1", "lr_image_encoder", "lr_text_encoder", "lr_heads",
               "temperature"]
    pd.testing.assert_frame_equal(resumed[columns], whole[columns], rtol=1e-5)


# -- validation measures the training task --------------------------------------------------------

def test_best_validation_loss_matches_the_loss_in_randomly_shuffled_batches(tmp_path):
    """After a short quick-mode fit, history's best val loss is within 15 % of the best model's loss on the
    validation table cut into randomly shuffled batches (as training batches are cut)."""
    train, val, _ = cu.prepare_quick_data(tmp_path / "data", n_images=200)
    cfg = cu.Config.quick(epochs=2, max_minutes=None, out_dir=str(tmp_path / "run"))
    model, tokenizer = cu.build_model(cfg, captions=train["caption"])
    history = cu.fit(model, tokenizer, train, val, cfg)  # best/ (lowest val loss) is loaded back
    accelerator = cu.train._accelerator(cfg)
    shuffled = []
    for seed in (1, 2, 3):
        loader = cu.make_loader(val.sample(frac=1, random_state=seed), tokenizer, cfg, train=False,
                                **model.image_encoder.crop)
        shuffled.append(cu.train._validate(model, loader, cfg, accelerator)["val_loss"])
    best, random_batches = history["val_loss"].min(), sum(shuffled) / len(shuffled)
    assert abs(best - random_batches) <= 0.15 * random_batches, (best, shuffled)


def test_select_best_is_checked_by_name():
    with pytest.raises(ValueError, match="select_best='val_r1'"):
        cu.Config.quick(select_best="val_r1")


def test_one_process_fits_in_fp32_then_bf16_then_fp32_again(synthetic, tiny_cfg, tmp_path):
    """A notebook may change cfg.precision between fits: each run takes its own (Accelerate's is per process)."""
    _, train, val, _ = synthetic
    losses = []
    for precision in ("fp32", "bf16", "fp32"):
        cfg = dataclasses.replace(tiny_cfg, precision=precision, out_dir=str(tmp_path / precision))
        model, tokenizer = cu.build_model(cfg, captions=train["caption"])
        losses.append(cu.fit(model, tokenizer, train.head(40), val.head(10), cfg)["train_loss"].iloc[0])
    assert losses[0] == losses[2] != losses[1]  # bf16 rounds differently; fp32 repeats itself exactly


def test_validation_batches_mix_images_as_training_batches_do(synthetic, tiny_model, tiny_cfg):
    """Validation batches hold about as many distinct images as training batches (table order: ~3 per 8 rows)."""
    _, train, val, _ = synthetic
    model, tokenizer = tiny_model
    task = cu.train._ClipTask(model, tokenizer, train, val, tiny_cfg, cu.train._accelerator(tiny_cfg))
    distinct = [len(set(batch["image_ids"].tolist())) / len(batch["image_ids"]) for batch in task.val_loader]
    in_order = [val["image"].iloc[i:i + 8].nunique() / len(val["image"].iloc[i:i + 8]) for i in range(0, len(val), 8)]
    assert sum(in_order) / len(in_order) < 0.6  # the control: table order keeps an image's captions together
    assert sum(distinct) / len(distinct) > 0.8, distinct
