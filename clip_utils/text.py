"""Hindi text: caption normalisation (NFC, dandas, invisible characters) and a WordPiece
tokenizer that keeps every matra and virama."""
from __future__ import annotations

import re
import unicodedata

# Invisible characters that creep in from the web and machine translation. Deleting
# them (not replacing them with a space) keeps the word around them in one piece.
# ZWJ/ZWNJ only choose between conjunct glyph forms, so the word's meaning stays.
_INVISIBLE = re.compile("[\u00ad\u200b\u200c\u200d\u200e\u200f\u2060\ufeff\u202a-\u202e]")
_DANDA_SPACE = re.compile(r"\s+([।॥])")  # "है ।" -> "है।"


def caption_text(cell) -> str | None:
    """A table cell as caption text: a string as it is, UTF-8 bytes decoded, "" for a missing-value marker
    (None, NaN, pd.NA, NaT); None for anything else (a number, a list, undecodable bytes), which is no caption."""
    if isinstance(cell, str):
        return cell
    if isinstance(cell, (bytes, bytearray)):
        try:
            return bytes(cell).decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        missing = cell is None or bool(cell != cell) or str(cell) in ("<NA>", "NaT")  # NaN != NaN; pd.NA, NaT
    except (TypeError, ValueError):  # pd.NA refuses bool(); an array is ambiguous
        missing = str(cell) == "<NA>"
    return "" if missing else None


def normalize_caption(text) -> str:
    """NFC-normalise a caption, drop invisible characters, tidy dandas and whitespace ("" for NaN, None, pd.NA)."""
    cell = caption_text(text)
    # NFC: precomposed and decomposed nukta become one spelling
    text = unicodedata.normalize("NFC", str(text) if cell is None else cell)
    text = _INVISIBLE.sub("", text)
    text = text.replace("।।", "॥").replace("|", "।")  # ASCII pipe is a common stand-in for the danda
    text = " ".join(text.split())
    return _DANDA_SPACE.sub(r"\1", text)


# A word's final vowel signs and nasal marks: Hindi inflects by them (काला/काली/काले, बूँद/बूँदें).
_ENDING = re.compile("[\u0900-\u0903\u093a\u093b\u093e-\u094c\u094e\u094f\u0955-\u0957\u0962\u0963]+$")


def _stem_and_ending(word: str) -> tuple[str, str]:
    """Split a word's inflectional ending off its stem: "काली" -> ("काल", "ी"); short words stay whole."""
    match = _ENDING.search(word)
    if match is None or match.start() < 2:  # का, की, है, में: too short to have a stem worth sharing
        return word, ""
    return word[:match.start()], word[match.start():]


def train_wordpiece_tokenizer(captions, vocab_size: int = 1000):
    """Build a WordPiece tokenizer from captions: frequent stems and endings, every character as fallback.

    Hindi adjectives, nouns and verbs inflect by their final vowel sign (काला गोला, काली पतंग,
    काले गोले). The vocabulary holds the stem (काल) and the ending (##ी) as separate pieces, so a
    form that never occurs in training (काली, if every black shape in training was masculine)
    still shares the stem's embedding instead of falling apart into meaningless characters.

    Built by counting, not with the `tokenizers` trainer: that trainer breaks frequency ties in
    hash order, so its vocabulary (and every token id) changed from run to run. Words outside the
    vocabulary split into characters ("##" marks a piece inside a word), so nothing becomes [UNK]
    unless its characters never occur in the captions.
    """
    from collections import Counter

    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    splitter = pre_tokenizers.BertPreTokenizer()  # Unicode-aware: danda and commas are punctuation
    words = Counter(word for caption in captions
                    for word, _ in splitter.pre_tokenize_str(normalize_caption(caption)))
    counts = Counter()
    for word, n in words.items():
        stem, ending = _stem_and_ending(word)
        counts[stem] += n
        if ending:
            counts["##" + ending] += n
    chars = sorted({ch for word in words for ch in word})
    pieces = [p for p, _ in sorted(counts.items(), key=lambda pc: (-pc[1], pc[0])) if len(p.removeprefix("##")) > 1]
    room = max(0, vocab_size - len(specials) - 2 * len(chars))
    vocab = specials + chars + ["##" + ch for ch in chars] + pieces[:room]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    # NFC only: BERT's default normaliser lowercases and strips accents, which deletes matras.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = splitter
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def keeps_devanagari(tokenizer, text: str = "नमस्ते क्षत्रिय किताबें") -> bool:
    """True if the tokenizer's normaliser and pieces keep every matra and virama of `text`."""
    normalizer = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    if normalizer is not None and unicodedata.normalize("NFC", normalizer.normalize_str(text)) != text:
        return False  # e.g. BERT's lowercase/strip_accents turns नमस्ते into नमसत
    pieces = tokenizer.tokenize(text)
    joined = "".join(p.removeprefix("##").lstrip("▁Ġ") for p in pieces)
    return joined == text.replace(" ", "") and tokenizer.unk_token not in pieces
