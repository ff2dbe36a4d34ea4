"""English -> Hindi caption translation with an open model loaded by name (NLLB-200 by default): length-sorted
batches, resumable output that keeps each Hindi line beside its English source, and a count of suspect outputs."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from pathlib import Path

import pandas as pd

from ..config import Config, _pick_device
from ..files import atomic_write
from ..tables import _check_columns
from ..text import caption_text, normalize_caption

DEFAULT_TRANSLATOR = Config.translator  # facebook/nllb-200-distilled-600M, CC-BY-NC-4.0: see the README
# The translation file: one row per English caption. "caption" is the Hindi text, so read_captions (which takes
# the image and caption columns by name) and load_flickr8k read it as a Hindi caption table as it is.
TRANSLATION_COLUMNS = ["image", "number", "english", "caption", "truncated"]
_DEVANAGARI = re.compile("[\u0900-\u097f]")
_LATIN = re.compile("[A-Za-z]")


def read_english_captions(source) -> pd.DataFrame:
    """English captions as a table (image, number, english) from Flickr8k.token.txt or a table.

    Flickr8k.token.txt lines are "1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress ...". A table needs
    an "image" column and an "english" (or "caption") column; "number" defaults to the caption's rank per image.
    """
    if isinstance(source, pd.DataFrame):
        text_column = "english" if "english" in source else "caption"
        _check_columns(source, ("image", text_column), "the English caption table")
        texts = [caption_text(c) for c in source[text_column]]  # astype(str) would translate NaN as "nan"
        missing = [i for i, text in enumerate(texts) if not (text or "").strip()]
        if missing:
            row = source.index[missing[0]]
            raise ValueError(f"the English caption table has {len(missing)} rows without a caption in column "
                             f"{text_column!r}, first row {row} (image {source['image'].iat[missing[0]]!r}): "
                             "drop them, e.g. df.dropna(subset=[" + repr(text_column) + "])")
        table = pd.DataFrame({"image": source["image"].astype(str), "english": texts}, index=source.index)
        table["number"] = (source["number"].astype(int) if "number" in source
                           else table.groupby("image").cumcount())
    else:
        rows = []
        for i, line in enumerate(Path(source).read_text(encoding="utf-8-sig").splitlines()):
            if not line.strip():
                continue
            key, tab, english = line.partition("\t")
            name, hash_, number = key.strip().rpartition("#")
            if not (tab and hash_ and number.isdigit()):
                raise ValueError(f"{source} line {i + 1}: expected 'image.jpg#n<TAB>English caption', "
                                 f"got {line[:60]!r}")
            if not english.strip():
                raise ValueError(f"{source} line {i + 1}: {key.strip()!r} has no English caption; delete the line")
            rows.append((name, int(number), english))
        if not rows:
            raise ValueError(f"{source}: no captions")
        table = pd.DataFrame(rows, columns=["image", "number", "english"])
    table["english"] = [" ".join(text.split()) for text in table["english"]]
    duplicated = table.duplicated(["image", "number"])
    if duplicated.any():
        raise ValueError(f"{source if not isinstance(source, pd.DataFrame) else 'the table'}: caption "
                         f"{table.loc[duplicated, ['image', 'number']].iloc[0].tolist()} appears twice; "
                         "each (image, number) must be unique")
    return table[["image", "number", "english"]].reset_index(drop=True)


def read_translations(path) -> pd.DataFrame:
    """The translation file as a table (image, number, english, caption = Hindi, truncated); a torn last line is
    ignored."""
    data = Path(path).read_bytes()
    data = data[:data.rfind(b"\n") + 1]  # a run killed mid-write leaves a partial last line, maybe half a character
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 (line {line}): delete it to translate again") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] != TRANSLATION_COLUMNS:
        raise ValueError(f"{path} is not a translation file: its header should be {','.join(TRANSLATION_COLUMNS)}")
    bad = [i + 1 for i, row in enumerate(rows) if len(row) != len(TRANSLATION_COLUMNS)]
    if bad:
        raise ValueError(f"{path}: line(s) {bad[:5]} do not have {len(TRANSLATION_COLUMNS)} fields; "
                         "delete the file to translate again")
    table = pd.DataFrame(rows[1:], columns=TRANSLATION_COLUMNS)
    return table.astype({"number": int, "truncated": int})


def _csv_lines(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _load_translator(model_name: str, src_lang: str, device: str, dtype):
    """Tokenizer and model by Hub name or folder, on `device`: bf16/fp16 on a GPU, fp32 on the CPU."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    device = _pick_device(device)
    if dtype == "auto":  # T4s and older GPUs have no bf16; half precision on a CPU is slow
        native_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
        dtype = torch.bfloat16 if native_bf16 else torch.float16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(model_name, src_lang=src_lang)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_name, dtype=dtype).to(device).eval()
    return tokenizer, model, device


def translate_captions(source, out_path, model_name: str = DEFAULT_TRANSLATOR, src_lang: str = "eng_Latn",
                       tgt_lang: str | None = "hin_Deva", batch_size: int = 64, num_beams: int = 4,
                       max_new_tokens: int = 96, device: str = "auto", dtype="auto") -> pd.DataFrame:
    """Translate English captions into a CSV of (image, number, english, caption, truncated), resuming a stopped run.

    Rows are appended and flushed batch by batch, so an interrupted run picks up where it stopped: captions
    already in `out_path` are skipped (none twice, none lost). Batches are sorted by length, longest first
    (little padding, and an out-of-memory error shows in the first batch); when every caption is done the file
    is rewritten in the source's order. A finished file is returned without loading the model.

    Args:
        source: Flickr8k.token.txt or a table, as read_english_captions reads it.
        out_path: the translation CSV; "<out_path>.json" records the model and settings it was made with.
        model_name: a seq2seq model on the Hub or in a folder, loaded with AutoModelForSeq2SeqLM.
        src_lang, tgt_lang: NLLB language codes; the target code is forced as the first generated token
            (tgt_lang=None for single-pair models such as Helsinki-NLP/opus-mt-en-hi).
        batch_size: captions per generate call (each holds num_beams hypotheses).
        num_beams: beam width; 1 is greedy decoding, about twice as fast on a GPU.
        max_new_tokens: an output that reaches this many tokens without ending is cut and marked truncated.
        device, dtype: "auto" picks CUDA with bf16 (fp16 without bf16) when there is a GPU, else CPU with fp32.
    """
    from tqdm.auto import tqdm

    out_path, english = Path(out_path), read_english_captions(source)
    settings = dict(model_name=model_name, src_lang=src_lang, tgt_lang=tgt_lang, num_beams=num_beams,
                    max_new_tokens=max_new_tokens)
    meta = out_path.with_name(out_path.name + ".json")
    if out_path.exists():
        try:
            made_with = json.loads(meta.read_text()) if meta.exists() else settings
        except ValueError:
            raise ValueError(f"{meta} is not valid JSON: delete it and {out_path.name} to translate again") from None
        if made_with != settings:
            raise ValueError(f"{out_path} was made with {made_with}, not {settings}: delete it (and {meta.name}) "
                             "or choose another out_path")
        done = read_translations(out_path)
        with open(out_path, "r+b") as f:  # cut a torn last line so the next row starts on a line of its own
            data = f.read()
            f.truncate(data.rfind(b"\n") + 1)
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(",".join(TRANSLATION_COLUMNS) + "\n", encoding="utf-8")
        with atomic_write(meta) as partial:  # a torn settings file would stop every later run
            partial.write_text(json.dumps(settings))
        done = pd.DataFrame(columns=TRANSLATION_COLUMNS)
    done_keys = set(zip(done["image"], done["number"]))
    todo = english[[key not in done_keys for key in zip(english["image"], english["number"])]]

    if len(todo):
        import torch

        tokenizer, model, device = _load_translator(model_name, src_lang, device, dtype)
        forced_bos = None
        if tgt_lang is not None:
            forced_bos = tokenizer.convert_tokens_to_ids(tgt_lang)
            if forced_bos is None or forced_bos == tokenizer.unk_token_id:
                raise ValueError(f"{model_name}'s tokenizer has no language code {tgt_lang!r}: pass its own code "
                                 "(NLLB: hin_Deva) or tgt_lang=None for a model that translates one pair")
        lengths = [len(ids) for ids in tokenizer(list(todo["english"]))["input_ids"]]
        order = sorted(range(len(todo)), key=lambda i: -lengths[i])  # stable: equal lengths keep file order
        bar = tqdm(total=len(english), initial=len(english) - len(todo), unit="caption", desc="translating")
        with open(out_path, "a", encoding="utf-8", newline="") as f, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = todo.iloc[order[start:start + batch_size]]
                inputs = tokenizer(list(batch["english"]), padding=True, truncation=True, max_length=256,
                                   return_tensors="pt").to(device)
                out = model.generate(**inputs, forced_bos_token_id=forced_bos, num_beams=num_beams,
                                     max_new_tokens=max_new_tokens, do_sample=False)  # (B, T)
                ended = (out[:, 1:] == tokenizer.eos_token_id).any(dim=1).tolist()  # [:, 0] is the start token
                hindi = [normalize_caption(text) for text in tokenizer.batch_decode(out, skip_special_tokens=True)]
                f.write(_csv_lines(zip(batch["image"], batch["number"], batch["english"], hindi,
                                       [int(not e) for e in ended])))
                f.flush()
                os.fsync(f.fileno())  # the rows survive a crash of the whole machine, not only of Python
                bar.update(len(batch))
        bar.close()

    table = read_translations(out_path)
    rank = {key: i for i, key in enumerate(zip(english["image"], english["number"]))}
    position = [rank.get(key, len(rank)) for key in zip(table["image"], table["number"])]
    if position != sorted(position):  # back to the source's order: one atomic rewrite
        if len(rank) in position:
            warnings.warn(f"{out_path} holds captions that are not in {source}; they are kept at the end",
                          stacklevel=2)
        table = table.iloc[sorted(range(len(table)), key=position.__getitem__)].reset_index(drop=True)
        with atomic_write(out_path) as partial:
            partial.write_text(",".join(TRANSLATION_COLUMNS) + "\n" + _csv_lines(table.itertuples(index=False)),
                               encoding="utf-8")
    return table


def translation_quality(table) -> pd.DataFrame:
    """Count suspect machine translations: empty, untranslated (more Latin than Devanagari letters) and truncated.

    `table` is a translation table (read_translations) or any table with a Hindi "caption" column; "truncated"
    is counted where the table has that column. Returns one row per kind with its count and share.
    """
    hindi = table["caption"].fillna("").astype(str)
    empty = hindi.str.strip() == ""
    latin = ~empty & (hindi.map(lambda t: len(_LATIN.findall(t))) > hindi.map(lambda t: len(_DEVANAGARI.findall(t))))
    kinds = {"empty": empty, "untranslated (Latin script)": latin}
    if "truncated" in table:
        kinds["truncated (hit max_new_tokens)"] = table["truncated"].astype(int) == 1
    return pd.DataFrame({"captions": {k: int(v.sum()) for k, v in kinds.items()},
                         "share": {k: float(v.mean()) if len(table) else 0.0 for k, v in kinds.items()}})
