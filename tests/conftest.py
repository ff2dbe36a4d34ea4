import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may touch the network
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import clip_utils as cu  # noqa: E402


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic set shared by the tests: (full table, train, val, test)."""
    df = cu.make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_images=120, seed=1)
    train, val, test = cu.split_by_image(df, val_frac=0.15, test_frac=0.15, seed=0)
    return df, train, val, test


@pytest.fixture(scope="session")
def tiny_cfg(tmp_path_factory):
    """Quick mode shrunk further so model tests take milliseconds."""
    return cu.Config.quick(image_size=32, batch_size=8, epochs=1, vocab_size=1000,
                           text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=64),
                           image_model_kwargs=dict(channels=(8, 16, 16, 32), stem_width=8),
                           max_minutes=None,  # a wall-clock budget would make the tests depend on machine load
                           out_dir=str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="session")
def tiny_model(synthetic, tiny_cfg):
    _, train, _, _ = synthetic
    return cu.build_model(tiny_cfg, captions=train["caption"])


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache that huggingface_hub and transformers read (offline) for this test only."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at call time
    return cache
