"""Saving and loading a trained model, and rebuilding the published checkpoint."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .config import Config, _device
from .model import CLIPModel, ImageEncoder, TextEncoder


def _load_weights(model: nn.Module, path, strict: bool = True) -> tuple[list, list]:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint folder has no weights; save it again")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors' own error names no file
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}): the file is cut short or "
                         "damaged; save or download the checkpoint again") from None
    return _load_state(model, state, strict)


def _load_state(model: nn.Module, state: dict, strict: bool) -> tuple[list, list]:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if mismatched or (strict and (missing or unexpected)):
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, shape mismatch {mismatched[:10]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return missing, unexpected


def save_checkpoint(path, model: CLIPModel, tokenizer, cfg: Config, extra: dict | None = None) -> Path:
    """Write one folder: model.safetensors, config.json (run + text-encoder config) and the tokenizer.

    The folder is written beside its destination and renamed into place, so a crash mid-save
    leaves the previous checkpoint intact. `extra` maps file names to objects saved with torch.save
    (plain tensors, numbers and dicts only, so torch.load(weights_only=True) can read them).
    """
    from safetensors.torch import save_model

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    meta = dict(config=dataclasses.asdict(cfg), text_encoder_config=model.text_encoder.model.config.to_dict())
    if model.image_encoder.from_transformers:  # a transformers CLIP tower: rebuilt from its config
        meta["image_encoder_config"] = model.image_encoder.model.config.to_dict()
    (tmp / "config.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


PUBLISHED_REPO = "damerajee/clip-hindi"  # the published checkpoint on the Hugging Face Hub (model.pt)



def save_training_state(path, model, tokenizer, cfg, optimizer, scheduler, scaler, history, best) -> None:
    """Write the "last" checkpoint: weights, tokenizer and config, plus everything fit needs to go on.

    Args:
        path: the checkpoint folder (fit's out_dir/"last").
        model, tokenizer, cfg: as for save_checkpoint.
        optimizer, scheduler, scaler: their state dicts are saved (scaler may be None).
        history, best: the epochs so far and the lowest validation loss.
    """
    save_checkpoint(path, model, tokenizer, cfg,
                    extra={"training_state.pt": dict(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                                                     scaler=scaler.state_dict() if scaler else None,
                                                     history=history, best=best)})


def restore_training_state(path, model, optimizer, scheduler, scaler) -> tuple[list, float]:
    """Load a "last" checkpoint into model, optimizer, scheduler and scaler; returns (history, best val loss).

    Args:
        path: the folder save_training_state wrote.
        model, optimizer, scheduler, scaler: receive their saved states (scaler may be None).
    """
    _load_weights(model, path / "model.safetensors")
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    return state["history"], state["best"]


def _hub_folder(repo_id: str, repo_type: str = "model", allow_patterns=None) -> Path:
    """A Hub repository as a local folder (downloaded once into the Hugging Face cache; offline: from the cache)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns))


def _looks_like_repo_id(name) -> bool:
    name = str(name)
    return name.count("/") == 1 and not Path(name).suffix and not name.startswith((".", "/", "~"))


def _local_or_hub(path, kind: str, fetch) -> Path:
    """A local path that exists, else a Hub repo id fetched with fetch(repo); a local-looking path is not sent
    to the Hub, and a failed fetch names the path as a missing local one too."""
    path = Path(path).expanduser()  # "~/runs/best" is a folder in the home directory
    if path.exists():
        return path
    local = not _looks_like_repo_id(path) or path.parent.exists()  # "runs/best" beside a runs/ folder is local
    if not local:
        try:
            return Path(fetch(str(path)))
        except Exception as error:  # offline, no such repo, no access: say both readings
            raise FileNotFoundError(f"no {kind} {path} here, and no Hub repo {str(path)!r} could be fetched "
                                    f"({type(error).__name__}): check the path") from None
    raise FileNotFoundError(f"no {kind} {path} (resolved: {path.resolve()}); check the path" +
                            ("" if _looks_like_repo_id(path) else " (and it is not a Hub repo id like "
                                                                  "'you/clip-hindi')"))


def load_checkpoint(path, device: str | None = None):
    """Rebuild (model, tokenizer, cfg) from a save_checkpoint folder, or a Hub repo id holding one, without network.

    A Hub id ("you/clip-hindi", as push_to_hub writes it) is fetched once into the Hugging Face cache.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = _local_or_hub(path, "checkpoint folder", lambda repo: _hub_folder(repo))
    if not (path / "config.json").exists() and (path / "model.pt").exists():
        raise ValueError(f"{path} holds the published layout (model.pt): load it with load_published_checkpoint")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder: it has no config.json (save_checkpoint writes "
                                "model.safetensors, config.json and tokenizer/)")
    try:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as error:  # torn or hand-edited
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({error}): save the checkpoint again") from None
    known = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in meta["config"].items() if k in known}
    saved.setdefault("image_geometry", "square")  # saved before the option existed: trained square, so evaluated so
    cfg = Config(**saved)
    if "channels" in cfg.image_model_kwargs:  # JSON turned the tuple into a list
        cfg.image_model_kwargs["channels"] = tuple(cfg.image_model_kwargs["channels"])
    cfg = dataclasses.replace(cfg, image_pretrained=False)  # weights come from the file, not timm
    text_config = AutoConfig.for_model(**meta["text_encoder_config"])
    text_encoder = TextEncoder(cfg, AutoModel.from_config(text_config))
    image_model = None
    if "image_encoder_config" in meta:
        image_model = AutoModel.from_config(AutoConfig.for_model(**meta["image_encoder_config"]))
    model = CLIPModel(cfg, ImageEncoder(cfg, image_model), text_encoder)
    _load_weights(model, path / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return model.to(device or _device(cfg)).eval(), tokenizer, cfg


def _published_config(cfg: Config | None, residual: bool) -> Config:
    """The published architecture: our names, temperature 1, square 224 px resize as it was trained."""
    return dataclasses.replace(cfg or Config.full(), image_pretrained=False, residual_heads=residual,
                               init_logit_scale=0.0, image_geometry="square")


def load_published_checkpoint(path_or_repo=PUBLISHED_REPO, cfg: Config | None = None,
                              text_encoder_model=None, residual: bool = True):
    """Load the published `model.pt` (a local file or a Hub repository) into the architecture it was trained with.

    Every training script in the published repository has the Simple-CLIP head (`x = x + projected`
    before the LayerNorm), so the heads are rebuilt with that residual; residual=False rebuilds them
    without it, as the repository's later code (written after training) does. The loss had a fixed
    temperature of 1 and images were resized square to 224 px; both are reproduced. Missing or
    unexpected keys are reported in a warning, never silently ignored; a key whose shape differs raises.

    Args:
        path_or_repo: a .pt state dict (read with weights_only=True) or a Hub repo id holding model.pt.
        cfg: architecture names (image_model, text_model); defaults to Config.full().
        text_encoder_model: an already built Hugging Face encoder (e.g. from a local config).
        residual: rebuild the projection heads with the residual connection (default) or without.
    """
    from huggingface_hub import hf_hub_download
    from transformers import AutoConfig, AutoModel

    path = _local_or_hub(str(path_or_repo), "checkpoint file", lambda repo: hf_hub_download(repo, "model.pt"))
    cfg = _published_config(cfg, residual)
    if text_encoder_model is None:
        text_encoder_model = AutoModel.from_config(AutoConfig.from_pretrained(cfg.text_model))
    model = CLIPModel(cfg, ImageEncoder(cfg), TextEncoder(cfg, text_encoder_model))
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    missing, unexpected = _load_state(model, state, strict=False)
    missing = [k for k in missing if k != "logit_scale"]  # the published loss had no learnable temperature
    if len(missing) > len(model.state_dict()) // 2:  # e.g. a dict wrapped in {"state_dict": ...}
        raise ValueError(f"{path} does not hold the published layout: {len(missing)} of the model's keys are "
                         f"missing (e.g. {missing[:3]}); its own keys look like {list(state)[:3]}")
    if missing or unexpected:
        warnings.warn(f"published checkpoint {path}: {len(missing)} missing keys {missing[:5]}, "
                      f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    model.logit_scale.requires_grad_(False)
    return model.eval()


def load_trained(cfg: Config, checkpoint: str = "", residual: bool = True):
    """The model a notebook should use: (model, tokenizer, cfg, where it came from), or None in quick mode.

    Order: `checkpoint` (else CLIP_HINDI_CHECKPOINT): a save_checkpoint folder, a Hub repo id, or the
    published repo / a model.pt file; then the run folder cfg.out_dir/best (notebook 02, on Drive too);
    then, in full mode only, the published checkpoint PUBLISHED_REPO. Quick mode returns None when no
    checkpoint exists (training one takes about 2-3 minutes).

    Args:
        cfg: the notebook's Config (mode, out_dir, text_model).
        checkpoint: a folder, a Hub repo id or a .pt file; "" looks for CLIP_HINDI_CHECKPOINT.
        residual: for the published checkpoint, rebuild its heads with the residual (see load_published_checkpoint).
    """
    from transformers import AutoTokenizer

    checkpoint = str(checkpoint or os.environ.get("CLIP_HINDI_CHECKPOINT", "")).strip()
    run = Path(cfg.out_dir) / "best"
    if not checkpoint and (run / "model.safetensors").exists():
        checkpoint = str(run)
    if not checkpoint:
        if cfg.mode != "full":
            return None
        checkpoint = PUBLISHED_REPO
    published = checkpoint.endswith(".pt") or checkpoint == PUBLISHED_REPO or (Path(checkpoint) / "model.pt").exists()
    if published:
        source = Path(checkpoint) / "model.pt" if Path(checkpoint).is_dir() else checkpoint
        if checkpoint == PUBLISHED_REPO:  # its architecture is the full recipe's, at 224 px, whatever cfg says
            cfg = Config.full(out_dir=cfg.out_dir, device=cfg.device)
        model = load_published_checkpoint(source, cfg, residual=residual)
        pub_cfg = _published_config(cfg, residual)
        return (model.to(_device(pub_cfg)), AutoTokenizer.from_pretrained(pub_cfg.text_model), pub_cfg,
                f"the published checkpoint {checkpoint} ({'with' if residual else 'without'} head residual)")
    model, tokenizer, loaded_cfg = load_checkpoint(checkpoint)
    return model, tokenizer, loaded_cfg, f"your checkpoint {checkpoint}"


_RECALL_COLUMNS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")


def _data_terms(cfg: Config, data: str, captions: str) -> tuple[str, list[str]]:
    """(the card's license metadata lines, its "Data and terms" bullets) for a run's training data."""
    if cfg.mode != "full" and not data:
        return "license: mit", ["- training data: the synthetic Hindi scenes and captions that clip_utils draws (no "
                                "third-party data; towers from random init): MIT, as the clip-hindi code"]
    towers = [f"- pretrained towers: `{cfg.image_model}` (timm) and `{cfg.text_model}`, each under the licence on "
              "its model card"] if cfg.mode == "full" else []
    if data:  # the caller's own data: only they know its terms
        return ("license: other\nlicense_name: see-training-data",
                [f"- training data: {data}; its own terms apply to these weights", *towers])
    words = captions or (f"Flickr8k's English captions machine-translated into Hindi by `{cfg.translator}` "
                         "(NLLB-200: CC-BY-NC-4.0, non-commercial)")
    bullets = ["- training photos: Flickr8k, official 6,000-image train split (Flickr photos; research use only)",
               f"- training captions: {words}" + ("; that source's own terms apply" if captions else ""), *towers,
               "- these weights inherit the narrowest of those terms: research, non-commercial use only"]
    name = "flickr8k-research-only" if captions else "flickr8k-research-only-and-cc-by-nc-4.0"
    return f"license: other\nlicense_name: {name}", bullets


def model_card(cfg: Config, metrics: dict | None = None, data: str = "", captions: str = "") -> str:
    """A Hugging Face model card (README.md): language hi, the recipe, the data with its terms, measured recall.

    The licence follows the training data: quick mode's synthetic scenes are MIT, as the code; full mode's
    weights are trained on Flickr8k (research use only) and, unless `captions` names another source, on
    NLLB-200 translations (CC-BY-NC-4.0), so the card says `license: other` and names those terms; data of
    your own (`data`) is `other` too, under its own terms.

    Args:
        cfg: the checkpoint's Config (its recipe).
        metrics: recall as retrieval_metrics returns it (fractions), optionally per evaluation set and
            protocol ({"XM3600 Hindi, " + XM3600_FIRST_CAPTION: {...}, ...}); None says nothing was measured.
        data: the training data in words, when it is not this mode's own (e.g. COCO-35L); its terms apply.
        captions: full mode's caption source in words (table_source of the data folder); "" is the built-in
            translation by cfg.translator.
    """
    license_lines, terms = _data_terms(cfg, data, captions)
    text_tower = cfg.text_model if cfg.text_pretrained else "BERT from scratch"
    recipe = [f"- image tower: `{cfg.image_model}` ({'pretrained' if cfg.mode == 'full' else 'random init'}), "
              f"{cfg.image_size} px",
              f"- text tower: `{text_tower}`, {cfg.pooling} pooling, max {cfg.max_length} tokens",
              f"- heads: {cfg.projection_dim}-d projection, {'with' if cfg.residual_heads else 'without'} residual",
              f"- loss: `{cfg.loss}`, batch {cfg.batch_size}, {cfg.epochs} epochs, learning rates image "
              f"{cfg.image_encoder_lr:g} / text {cfg.text_encoder_lr:g} / heads {cfg.head_lr:g}, seed {cfg.seed}"]
    if metrics and not isinstance(next(iter(metrics.values())), dict):
        metrics = {"evaluation": metrics}
    rows = ["| evaluation set (protocol) | t2i R@1 | t2i R@5 | t2i R@10 | i2t R@1 | i2t R@5 | i2t R@10 |",
            "|---|---|---|---|---|---|---|"]
    rows += [f"| {name} | " + " | ".join(f"{100 * m[k]:.1f}" if k in m else "" for k in _RECALL_COLUMNS) + " |"
             for name, m in (metrics or {}).items()]
    protocol = ("Recall@K in percent, text → image (t2i) and image → text (i2t, a hit when any of the image's "
                "captions is in the top K); a tie with a wrong candidate counts as a miss. On XM3600 (Crossmodal-3600, "
                "CC-BY-4.0, captions written by Hindi speakers) \"first caption per image\" is CLIP_benchmark's "
                "protocol, comparable with open_clip's multilingual table; \"all captions\" keeps every caption, as "
                "Google's and MTEB's numbers do. Compare rows of the same protocol only.")
    results = ("\n".join(rows) + "\n\n" + protocol if metrics
               else "Not measured yet: run notebook 04 and push again with its metrics.")
    data_lines = "\n".join(terms)
    return f"""---
language:
- hi
{license_lines}
library_name: pytorch
tags:
- clip
- hindi
- image-text-retrieval
- zero-shot-image-classification
---

# Hindi CLIP ({cfg.mode} recipe)

A two-tower CLIP model for Hindi, trained with [clip-hindi](https://github.com/clip-hindi/clip-hindi).

## Recipe
{chr(10).join(recipe)}

## Data and terms
{data_lines}

## Measured recall (percent)
{results}

## Use
```python
import clip_utils as cu
model, tokenizer, cfg = cu.load_checkpoint("<this repo id>")
cu.search_images("घास पर कुत्ता", model, tokenizer, image_paths, cfg)
```
"""


def push_to_hub(run_folder, repo_id: str, metrics: dict | None = None, private: bool = False, api=None,
                data: str = "", captions: str = ""):
    """Publish a checkpoint folder to the Hugging Face Hub with a generated model card; returns the commit.

    `run_folder` is a save_checkpoint folder or a run folder holding best/ (its history.csv goes along).
    load_checkpoint(repo_id) reads it back. Needs a Hub token (`huggingface-cli login`, or in Colab
    `from huggingface_hub import notebook_login; notebook_login()`).

    Args:
        run_folder: a checkpoint folder or a run folder with best/.
        repo_id: "you/clip-hindi"; created if it does not exist.
        metrics: measured recall for the card (see model_card).
        private: create the repository as private.
        api: the Hub client (default huggingface_hub.HfApi()); tests pass one that writes to a local folder.
        data: the training data in words, when it is not this mode's own, for the card.
        captions: full mode's caption source in words ("" = the built-in translation), for the card's terms.
    """
    import tempfile

    run_folder = Path(run_folder)
    checkpoint = run_folder / "best" if (run_folder / "best" / "config.json").exists() else run_folder
    if not (checkpoint / "config.json").exists():
        raise FileNotFoundError(f"no checkpoint in {run_folder} (expected config.json there or in best/)")
    _, _, cfg = load_checkpoint(checkpoint, device="cpu")  # refuses a broken folder before anything is uploaded
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with tempfile.TemporaryDirectory() as stage:
        stage = Path(stage) / "repo"
        shutil.copytree(checkpoint, stage, ignore=shutil.ignore_patterns("training_state.pt"))
        if (checkpoint.parent / "history.csv").exists():
            shutil.copy(checkpoint.parent / "history.csv", stage)
        (stage / "README.md").write_text(model_card(cfg, metrics, data, captions), encoding="utf-8")
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(folder_path=str(stage), repo_id=repo_id,
                                 commit_message=f"clip-hindi checkpoint ({cfg.mode} recipe)")
