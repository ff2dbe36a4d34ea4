"""The built-in English->Hindi caption translation, end to end on a tiny NLLB-family model saved locally (no network),
and the caption sources of full mode (a Hub dataset file through a local cache, or the built-in translation)."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tiny_nllb import PAIRS, save_tiny_nllb

import clip_utils as cu

FIXTURES = Path(__file__).parent / "fixtures"
IMAGES = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg",
          "1003163366_44323f5815.jpg", "1007129816_e794419615.jpg"]  # two English captions each
FAST = dict(batch_size=3, num_beams=1, max_new_tokens=40, device="cpu")


@pytest.fixture(scope="session")
def translator(tmp_path_factory):
    """(folder of the tiny model, {English: Hindi} as the model translates each sentence on its own)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    folder = save_tiny_nllb(tmp_path_factory.mktemp("tiny-nllb"), steps=150)
    tokenizer = AutoTokenizer.from_pretrained(folder, src_lang="eng_Latn")
    model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
    alone = {}
    with torch.inference_mode():
        for english, _ in PAIRS:  # one sentence per call: no padding, no batch neighbours
            out = model.generate(**tokenizer(english, return_tensors="pt"), max_new_tokens=40,
                                 forced_bos_token_id=tokenizer.convert_tokens_to_ids("hin_Deva"))
            alone[english] = cu.normalize_caption(tokenizer.decode(out[0], skip_special_tokens=True))
    assert len(set(alone.values())) == len(PAIRS), "the tiny model should give each sentence its own output"
    return folder, alone


@pytest.fixture
def token_file(tmp_path):
    """An English Flickr8k.token.txt: 'image.jpg#n<TAB>caption', two captions for each of five images."""
    lines = [f"{IMAGES[i // 2]}#{i % 2}\t{english}" for i, (english, _) in enumerate(PAIRS)]
    path = tmp_path / "Flickr8k.token.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _count_generate_calls(monkeypatch, fail_on_call=None):
    """Wrap the model's generate: record each batch's input lengths; raise KeyboardInterrupt on call `fail_on_call`."""
    from transformers import GenerationMixin, M2M100ForConditionalGeneration

    calls, generate = [], GenerationMixin.generate  # the unwrapped original, even when wrapped before

    def wrapped(self, *args, **kwargs):
        if fail_on_call is not None and len(calls) + 1 == fail_on_call:
            raise KeyboardInterrupt("simulated crash")
        calls.append(kwargs["attention_mask"].sum(dim=1).tolist())
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(M2M100ForConditionalGeneration, "generate", wrapped)
    return calls


def test_translation_file_keeps_pairs_in_source_order(translator, token_file, tmp_path, monkeypatch):
    folder, alone = translator
    calls = _count_generate_calls(monkeypatch)
    out = tmp_path / "hindi.csv"
    table = cu.translate_captions(token_file, out, model_name=str(folder), **FAST)

    assert out.read_text(encoding="utf-8").splitlines()[0] == "image,number,english,caption,truncated"
    assert list(table.columns) == cu.scale.translate.TRANSLATION_COLUMNS
    expected = cu.read_english_captions(token_file)
    assert table[["image", "number", "english"]].equals(expected)  # source order, despite length-sorted batches
    assert list(table["caption"]) == [alone[e] for e in table["english"]]  # each Hindi line beside its own English
    assert (table["truncated"] == 0).all()
    lengths = [n for batch in calls for n in batch]
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) > 1  # longest first
    assert len(lengths) == len(PAIRS)
    # read_captions takes the file as a Hindi caption table, and a finished file is reused without the model
    assert list(cu.read_captions(out)["caption"]) == list(table["caption"])
    monkeypatch.setattr(cu.scale.translate, "_load_translator", lambda *a: pytest.fail("loaded the model again"))
    assert cu.translate_captions(token_file, out, model_name=str(folder), **FAST).equals(table)


def test_interrupted_translation_resumes_without_repeats_or_gaps(translator, token_file, tmp_path, monkeypatch):
    folder, alone = translator
    out = tmp_path / "hindi.csv"
    first = _count_generate_calls(monkeypatch, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        cu.translate_captions(token_file, out, model_name=str(folder), **FAST)
    partial = cu.read_translations(out)
    assert len(partial) == 6 == sum(len(b) for b in first)  # two batches of three were written before the crash
    english = cu.read_english_captions(token_file)
    longest = english["english"].str.split().str.len().sort_values(ascending=False).index[:3]
    assert set(partial["english"][:3]) == set(english.loc[longest, "english"])  # written longest first
    with open(out, "a", encoding="utf-8") as f:
        f.write(f"{IMAGES[4]},1,A woman in a red")  # killed in the middle of writing a row

    second = _count_generate_calls(monkeypatch)
    table = cu.translate_captions(token_file, out, model_name=str(folder), **FAST)
    assert sum(len(b) for b in second) == len(PAIRS) - 6  # only the missing captions are translated
    assert table[["image", "number", "english"]].equals(english)  # none lost, none twice, source order
    assert list(table["caption"]) == [alone[e] for e in table["english"]]
    assert cu.read_translations(out).equals(table)


def test_a_run_killed_inside_a_hindi_character_resumes_without_repeats_or_gaps(translator, token_file, tmp_path,
                                                                               monkeypatch):
    folder, alone = translator
    out = tmp_path / "hindi.csv"
    _count_generate_calls(monkeypatch, fail_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        cu.translate_captions(token_file, out, model_name=str(folder), **FAST)
    assert len(cu.read_translations(out)) == 3
    row = f"{IMAGES[4]},1,A woman in a red coat,एक लाल".encode("utf-8")
    with open(out, "ab") as f:
        f.write(row[:-1])  # killed in the middle of writing the last byte-sequence of "ल"

    calls = _count_generate_calls(monkeypatch)
    table = cu.translate_captions(token_file, out, model_name=str(folder), **FAST)
    assert sum(len(b) for b in calls) == len(PAIRS) - 3  # nothing translated twice
    assert table[["image", "number", "english"]].equals(cu.read_english_captions(token_file))  # nothing lost
    assert list(table["caption"]) == [alone[e] for e in table["english"]]


def test_outputs_cut_at_max_new_tokens_are_marked_and_counted(translator, token_file, tmp_path):
    folder, _ = translator
    table = cu.translate_captions(token_file, tmp_path / "short.csv", model_name=str(folder),
                                  **{**FAST, "max_new_tokens": 4})
    quality = cu.translation_quality(table)
    assert table["truncated"].sum() >= 1
    assert quality.loc["truncated (hit max_new_tokens)", "captions"] == table["truncated"].sum()
    with pytest.raises(ValueError, match="delete it"):  # other settings would mix two translations in one file
        cu.translate_captions(token_file, tmp_path / "short.csv", model_name=str(folder), **FAST)


def test_translation_quality_counts_empty_latin_and_truncated():
    table = pd.DataFrame({"caption": ["", "A dog runs .", "कुत्ता dog", "एक कुत्ता दौड़ता है।", None],
                          "truncated": [0, 0, 1, 0, 0]})
    quality = cu.translation_quality(table)
    assert quality["captions"].tolist() == [2, 1, 1]  # None counts as empty; mixed script with more Devanagari is not
    assert quality.loc["empty", "share"] == pytest.approx(0.4)


def test_wrong_language_code_says_what_to_pass(translator, token_file, tmp_path):
    folder, _ = translator
    with pytest.raises(ValueError, match="hin_Deva"):
        cu.translate_captions(token_file, tmp_path / "x.csv", model_name=str(folder), tgt_lang="hindi", **FAST)


def test_hub_caption_file_comes_from_the_hub_cache(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--someone--flickr8k-hindi"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    shutil.copy(FIXTURES / "hindi_captions.csv", repo / "snapshots" / commit / "data" / "captions.csv")

    path = cu.hub_file("hf://datasets/someone/flickr8k-hindi/data/captions.csv", cache_dir=tmp_path / "hub")
    assert cu.read_captions(path).equals(cu.read_captions(FIXTURES / "hindi_captions.csv"))
    with pytest.raises(ValueError, match="hf://datasets/"):
        cu.hub_file("hf://someone/flickr8k-hindi/captions.csv")


@pytest.fixture
def flickr_root(tmp_path, token_file):
    """A miniature unpacked Flickr8k: photos, split lists and the English Flickr8k.token.txt."""
    root = tmp_path / "flickr"
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    for i, name in enumerate(IMAGES[:4]):  # the fifth image is in the train list but missing, as in the real set
        Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)).save(root / "Flicker8k_Dataset" / name)
    for split in ("train", "dev", "test"):
        shutil.copy(FIXTURES / f"Flickr_8k.{split}Images.txt", root)
    shutil.copy(token_file, root)
    return root


def test_full_mode_without_a_caption_file_translates_flickr8k(translator, flickr_root, tmp_path, monkeypatch):
    folder, alone = translator
    monkeypatch.delenv("CLIP_HINDI_CAPTIONS", raising=False)
    monkeypatch.setattr(cu.datasets, "download_flickr8k", lambda data_dir: flickr_root)
    with pytest.warns(UserWarning, match="missing"):
        train, val, test = cu.prepare_data(cu.Config.full(translator=str(folder)), tmp_path / "data")
    assert (tmp_path / "data" / "flickr8k_hindi_machine.csv").exists()
    assert [len(train), len(val), len(test)] == [4, 2, 2]
    for part in (train, val, test):
        assert list(part["caption"]) == [alone[e] for e in part["english"]]  # Hindi beside its English source


def test_full_mode_reads_a_hub_caption_file_first(tmp_path, monkeypatch, flickr_root):
    import huggingface_hub

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--someone--hindi"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(FIXTURES / "hindi_captions.csv", repo / "snapshots" / commit / "captions.csv")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("CLIP_HINDI_CAPTIONS", "hf://datasets/someone/hindi/captions.csv")
    monkeypatch.setattr(cu.datasets, "download_flickr8k", lambda data_dir: flickr_root)
    monkeypatch.setattr(cu.datasets, "translate_captions", lambda *a, **k: pytest.fail("translated anyway"))
    train, _, _ = cu.prepare_data(cu.Config.full(), tmp_path / "data")
    assert len(train) and set(train["caption"]) <= set(cu.read_captions(FIXTURES / "hindi_captions.csv")["caption"])

    # a Hub file that cannot be had (offline, not cached) stops the run before the photos are downloaded
    monkeypatch.setenv("CLIP_HINDI_CAPTIONS", "hf://datasets/someone/hindi/missing.csv")
    monkeypatch.setattr(cu.datasets, "download_flickr8k", lambda data_dir: pytest.fail("downloaded photos first"))
    with pytest.raises(Exception, match="missing.csv|offline|cache"):
        cu.prepare_data(cu.Config.full(), tmp_path / "data2")


def test_naming_a_caption_file_after_a_run_without_one_builds_tables_from_that_file(translator, flickr_root, tmp_path,
                                                                                    monkeypatch):
    folder, alone = translator
    cfg, data = cu.Config.full(translator=str(folder)), tmp_path / "data"
    builds = []
    monkeypatch.setattr(cu.datasets, "download_flickr8k", lambda data_dir: builds.append(1) or flickr_root)
    monkeypatch.delenv("CLIP_HINDI_CAPTIONS", raising=False)
    with pytest.warns(UserWarning, match="missing"):
        translated, _, _ = cu.prepare_data(cfg, data)  # a first run with public sources alone
    assert "english" in translated
    assert cu.table_source(data) == f"Flickr8k's English captions machine-translated by {folder}"

    mine = tmp_path / "mine.csv"
    shutil.copy(FIXTURES / "hindi_captions.csv", mine)
    monkeypatch.setenv("CLIP_HINDI_CAPTIONS", str(mine))  # then the Settings form names a caption file
    train, val, test = cu.prepare_data(cfg, data)
    held = pd.concat([train, val, test])
    assert "english" not in train and len(held) and set(held["caption"]) <= set(cu.read_captions(mine)["caption"])
    assert cu.table_source(data).startswith(f"the caption file {mine.resolve()} (")
    assert len(builds) == 2

    again, _, _ = cu.prepare_data(cfg, data)  # the same file: the cached tables, nothing rebuilt
    assert len(builds) == 2 and list(again["caption"]) == list(train["caption"])
    mine.write_text(mine.read_text(encoding="utf-8").replace("बच्ची", "लड़की"), encoding="utf-8")  # edited
    edited, _, _ = cu.prepare_data(cfg, data)
    assert len(builds) == 3 and edited["caption"].str.contains("लड़की").any()
    monkeypatch.delenv("CLIP_HINDI_CAPTIONS")  # the field emptied again: the (cached) translation
    with pytest.warns(UserWarning, match="missing"):
        back, _, _ = cu.prepare_data(cfg, data)
    assert len(builds) == 4 and list(back["caption"]) == list(translated["caption"])
    monkeypatch.setenv("CLIP_HINDI_CAPTIONS", str(tmp_path / "typo.csv"))
    with pytest.raises(FileNotFoundError, match="caption file .*typo.csv not found"):
        cu.prepare_data(cfg, data)
