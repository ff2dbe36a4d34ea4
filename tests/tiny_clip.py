"""A tiny transformers CLIP saved on the spot, for the distillation tests and the full-mode rehearsal."""
import torch


def save_tiny_clip(folder, seed: int = 0):
    """A tiny transformers CLIPModel and CLIP tokenizer (byte-level characters, no merges) saved in `folder`.

    Same classes and file layout as openai/clip-vit-base-patch32, a thousandth of its size: 32 px
    images, one layer per tower. Returns (model, tokenizer).
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    towers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                         pad_token_id=vocab["<|endoftext|>"], **towers),
                        vision_config=dict(image_size=32, patch_size=8, **towers), projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return model, tokenizer
