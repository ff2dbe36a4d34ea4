"""A tiny NLLB-family translator (M2M100 architecture + NllbTokenizer) built and briefly trained on the spot,
saved with save_pretrained so it loads through the same AutoModelForSeq2SeqLM/AutoTokenizer call as the real one."""
import json
from pathlib import Path

# English Flickr8k-style captions (written for these tests) and Hindi renderings of them.
PAIRS = [
    ("A child in a pink dress is climbing stairs .", "गुलाबी कपड़ों में एक बच्ची सीढ़ियाँ चढ़ रही है।"),
    ("A girl goes into a wooden house .", "एक लड़की लकड़ी के घर में जा रही है।"),
    ("A black dog and a spotted dog are fighting", "एक काला कुत्ता और एक चितकबरा कुत्ता लड़ रहे हैं।"),
    ("Two dogs on the road .", "सड़क पर दो कुत्ते।"),
    ("A little girl sits in front of a large painted rainbow .", "एक छोटी लड़की एक बड़े रंगे हुए इंद्रधनुष के सामने बैठी है।"),
    ("A man lies on a bench .", "एक आदमी बेंच पर लेटा है।"),
    ("A boy jumps into the water .", "एक लड़का पानी में कूदता है।"),
    ("Children play in the park while their parents watch from a bench nearby .",
     "बच्चे पार्क में खेलते हैं जबकि उनके माता-पिता पास की बेंच से देखते हैं।"),
    ("A dog runs .", "कुत्ता दौड़ता है।"),
    ("A woman in a red coat walks across a snowy street with her small white dog .",
     "लाल कोट पहने एक महिला अपने छोटे सफ़ेद कुत्ते के साथ बर्फ़ीली सड़क पार करती है।"),
]


def save_tiny_nllb(folder, pairs=PAIRS, steps: int = 60, seed: int = 0) -> Path:
    """Train a BPE NllbTokenizer and a 2-layer M2M100 on `pairs` for a few steps; save both to `folder`.

    A few dozen steps make each English sentence map to its own Hindi-looking output, which is all the
    translation tests need (distinct outputs tell whether pairs and order survive batching).
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    bpe.train_from_iterator([text for pair in pairs for text in pair], trainer)
    learned = json.loads(bpe.to_str())["model"]
    tokenizer = NllbTokenizer(vocab=learned["vocab"], merges=[tuple(m) for m in learned["merges"]],
                              src_lang="eng_Latn", tgt_lang="hin_Deva")  # every NLLB language code is added
    config = M2M100Config(vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=128, dropout=0.0, attention_dropout=0.0,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2,
                          decoder_start_token_id=2)  # NLLB's ids: <s>=0, <pad>=1, </s>=2
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(config)
    batch = tokenizer([en for en, _ in pairs], text_target=[hi for _, hi in pairs], return_tensors="pt",
                      padding=True)
    labels = batch["labels"].masked_fill(batch["labels"] == tokenizer.pad_token_id, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
