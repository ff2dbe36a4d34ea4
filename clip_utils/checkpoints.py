"""Saving and loading a trained model, and rebuilding the published checkpoint."""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .config import Config, _device
from .model import CLIPModel, ImageEncoder, TextEncoder


def _load_weights(model: nn.Module, path, strict: bool = True) -> tuple[list, list]:
    from safetensors.torch import load_file

    return _load_state(model, load_file(str(path)), strict)


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


def load_checkpoint(path, device: str | None = None):
    """Rebuild (model, tokenizer, cfg) from a save_checkpoint folder, offline (no downloads)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(path)
    meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in meta["config"].items() if k in known})
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


def load_published_checkpoint(path_or_repo="damerajee/clip-hindi", cfg: Config | None = None,
                              text_encoder_model=None):
    """Load the published `model.pt` (a local file or a Hub repository) into the architecture it was trained with.

    Its projection heads have no residual connection and its loss had a fixed temperature of 1;
    both are reproduced here. Missing or unexpected keys are reported in a warning, never
    silently ignored; a key whose shape differs raises.

    Args:
        path_or_repo: a .pt state dict (read with weights_only=True) or a Hub repo id holding model.pt.
        cfg: architecture names (image_model, text_model); defaults to Config.full().
        text_encoder_model: an already built Hugging Face encoder (e.g. from a local config).
    """
    from transformers import AutoConfig, AutoModel

    path = Path(str(path_or_repo))
    if not path.exists():
        if path.suffix or str(path_or_repo).count("/") != 1:  # looks like a file, not "owner/name"
            raise FileNotFoundError(f"no checkpoint file {path}")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(path_or_repo), "model.pt"))
    cfg = dataclasses.replace(cfg or Config.full(), image_pretrained=False, residual_heads=False,
                              init_logit_scale=0.0)
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
