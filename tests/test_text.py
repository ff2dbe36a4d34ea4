import unicodedata

import numpy as np

import clip_utils as cu


def test_nukta_spellings_are_equal():
    precomposed = "\u095b"  # ज़ as one code point
    decomposed = "\u091c\u093c"  # ज + nukta
    assert precomposed != decomposed
    assert cu.normalize_caption(f"{precomposed}रा") == cu.normalize_caption(f"{decomposed}रा")
    assert cu.normalize_caption("सफ़ेद") == unicodedata.normalize("NFC", "सफ़ेद")


def test_invisible_characters_removed_without_splitting_words():
    assert cu.normalize_caption("नम\u200bस्ते") == "नमस्ते"
    assert cu.normalize_caption("\ufeffक्\u200dष") == "क्ष"
    assert cu.normalize_caption("घास\u200c पर") == "घास पर"


def test_whitespace_and_danda():
    assert cu.normalize_caption("  घास   पर\tकुत्ता  ।") == "घास पर कुत्ता।"
    assert cu.normalize_caption("घास पर कुत्ता |") == "घास पर कुत्ता।"
    assert cu.normalize_caption("श्लोक ।।") == "श्लोक॥"


def test_missing_captions_become_empty():
    assert cu.normalize_caption(None) == ""
    assert cu.normalize_caption(np.nan) == ""
    assert cu.normalize_caption("   ") == ""


def test_tokenizer_round_trips_devanagari():
    words = ["नमस्ते", "क्षत्रिय", "किताबें", "द्वार", "पृष्ठभूमि", "अंगूठियाँ", "ज़मीन"]
    tok = cu.train_wordpiece_tokenizer([" ".join(words)] * 5 + ["घास पर कुत्ता है।"], vocab_size=200)
    for word in words:
        ids = tok(word)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == cu.normalize_caption(word)
    pieces = tok.tokenize("घास पर कुत्ता है।")
    assert pieces[-1] == "।"  # danda is its own punctuation token
    assert cu.keeps_devanagari(tok, "नमस्ते किताबें")


def test_unseen_inflection_shares_the_stem():
    # Training saw black only on masculine shapes (काला, काले); काली must still mean black.
    tok = cu.train_wordpiece_tokenizer(["एक काला गोला", "दो काले गोले", "हरी पतंग की तस्वीर"] * 3, vocab_size=200)
    assert tok.tokenize("काली पतंग") == ["काल", "##ी", "पतंग"]
    assert tok.tokenize("काला")[0] == tok.tokenize("काले")[0] == "काल"
    assert tok.decode(tok("काली पतंग")["input_ids"], skip_special_tokens=True) == "काली पतंग"
    assert tok.tokenize("की") == ["की"]  # short function words stay whole


def test_accent_stripping_tokenizer_is_caught():
    from tokenizers import normalizers

    tok = cu.train_wordpiece_tokenizer(["नमस्ते दुनिया"] * 3, vocab_size=100)
    tok.backend_tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    assert not cu.keeps_devanagari(tok, "नमस्ते")
