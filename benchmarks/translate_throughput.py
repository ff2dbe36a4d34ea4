"""How long the built-in translation of Flickr8k's 40,455 English captions takes, without the model or a GPU.

Builds NLLB-200-distilled-600M's architecture from its config values (M2M100: d_model 1024, 12+12 layers,
FFN 4096, 16 heads, vocabulary 256,206; random weights: speed does not depend on them), times generate() on
this CPU (or a GPU) with fixed-length outputs, and sets the measured speed against the model's FLOPs per token.
For a T4 it takes, per decoding step of one batch, the slower of
  * the FLOPs at an assumed share of the 65 TFLOP/s fp16 peak (30% and 10% are printed), and
  * the weights every step reads (decoder + output layer, ~0.93 GB in fp16) at 300 GB/s,
times the steps Flickr8k needs. Not included: generate()'s own per-step overhead (Python, kernel launches),
which a GPU does not hide; run this script with --device cuda on a GPU to measure it all at once.

    python benchmarks/translate_throughput.py                    # ~3 GB RAM, a few minutes on 2 cores
    python benchmarks/translate_throughput.py --device cuda --batch 64 --new-tokens 29 --beams-measured 4
"""
import argparse
import math
import time

import torch
from transformers import M2M100Config, M2M100ForConditionalGeneration

NLLB_600M = dict(vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                 decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
                 scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
CAPTIONS = 40_455  # Flickr8k.token.txt
# Assumed lengths in NLLB tokens (not measured: the tokenizer cannot be downloaded here). Flickr8k captions average
# ~11-12 English words; SentencePiece gives ~1.3 pieces per English word, plus the language code and </s>.
SOURCE_TOKENS = 17
OUTPUT_TOKENS = 22  # Hindi runs a little longer in words and ~1.4 pieces per word, plus language code and </s>
BATCH_STRETCH = 1.3  # a batch decodes until its longest output ends: steps ~1.3x the mean output with sorting
T4_PEAK, T4_BANDWIDTH = 65e12, 300e9  # fp16 tensor-core FLOP/s; realistic of the 320 GB/s peak


def flops_per_token(c: dict, source_len: int, out_pos: int) -> tuple[float, float]:
    """(encoder FLOPs per source token, decoder FLOPs per generated token) of an M2M100 config."""
    d, f = c["d_model"], c["encoder_ffn_dim"]
    encoder = c["encoder_layers"] * 2 * (4 * d * d + 2 * d * f + 2 * source_len * d)  # QKVO, FFN, attention
    decoder = c["decoder_layers"] * 2 * (4 * d * d + 2 * d * d + 2 * d * c["decoder_ffn_dim"]
                                         + 2 * out_pos * d + 2 * source_len * d) + 2 * d * c["vocab_size"]
    cross_kv = c["decoder_layers"] * 2 * 2 * d * d  # cross-attention K, V of each source token, once
    return encoder + cross_kv, decoder


def time_generate(model, batch: int, source_len: int, new_tokens: int, beams: int, repeats: int = 2) -> float:
    """Seconds per generate() call with every output exactly new_tokens long (best of `repeats`)."""
    ids = torch.randint(4, model.config.vocab_size, (batch, source_len), device=model.device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams, do_sample=False,
                  min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    best = math.inf
    with torch.inference_mode():
        model.generate(**{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**kwargs)
            if ids.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink d_model and FFN (memory, time)")
    parser.add_argument("--device", default="cpu", help="cuda: measure on a GPU in fp16")
    parser.add_argument("--batch", type=int, default=4, help="captions per generate() call measured")
    parser.add_argument("--new-tokens", type=int, default=8, help="generated tokens per caption measured")
    parser.add_argument("--beams-measured", type=int, default=1, help="beam width measured")
    parser.add_argument("--gpu-batch", type=int, default=64, help="captions per call assumed on the T4")
    parser.add_argument("--beams", type=int, default=4, help="beam width assumed on the T4 (the default)")
    args = parser.parse_args()
    torch.manual_seed(0)

    config = dict(NLLB_600M, d_model=int(1024 * args.scale), encoder_ffn_dim=int(4096 * args.scale),
                  decoder_ffn_dim=int(4096 * args.scale))
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model = M2M100ForConditionalGeneration(M2M100Config(**config)).to(args.device, dtype).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.0f}M parameters (scale {args.scale}) on {args.device} in {dtype}; "
          f"torch threads {torch.get_num_threads()}")
    seconds = time_generate(model, args.batch, SOURCE_TOKENS, args.new_tokens, beams=args.beams_measured)
    enc, dec = flops_per_token(config, SOURCE_TOKENS, args.new_tokens // 2)
    work = args.batch * args.beams_measured * (SOURCE_TOKENS * enc + args.new_tokens * dec)
    a = torch.randn(512, config["d_model"], device=args.device, dtype=dtype)
    b = torch.randn(config["d_model"], config["encoder_ffn_dim"], device=args.device, dtype=dtype)
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    if a.is_cuda:
        torch.cuda.synchronize()
    matmul = 20 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start)
    print(f"measured: batch {args.batch} x {args.beams_measured} beam(s), {SOURCE_TOKENS} source -> "
          f"{args.new_tokens} new tokens: {seconds:.2f} s = {args.batch * args.new_tokens / seconds:.1f} generated "
          f"tokens/s; {enc / 1e9:.2f} GFLOP per source token, {dec / 1e9:.2f} per generated token -> "
          f"{work / seconds / 1e9:.1f} GFLOP/s ({work / seconds / matmul:.0%} of a plain "
          f"{a.shape[0]}x{a.shape[1]}x{b.shape[1]} matmul here, {matmul / 1e9:.0f} GFLOP/s)")
    if args.device.startswith("cuda"):
        print(f"-> Flickr8k on this GPU: about {math.ceil(CAPTIONS / args.batch) * seconds / 60:.0f} min "
              f"if every batch takes {args.new_tokens} decoding steps")

    full_enc, full_dec = flops_per_token(NLLB_600M, SOURCE_TOKENS, OUTPUT_TOKENS // 2)
    steps_per_batch = OUTPUT_TOKENS * BATCH_STRETCH
    batches = math.ceil(CAPTIONS / args.gpu_batch)
    step_bytes = 2 * (NLLB_600M["decoder_layers"] * (8 * 1024 ** 2 + 2 * 1024 * 4096) + 1024 * 256206)  # fp16
    print(f"\nT4 estimate for {CAPTIONS:,} captions, batch {args.gpu_batch}, {SOURCE_TOKENS} source / "
          f"{OUTPUT_TOKENS} output tokens, {steps_per_batch:.0f} decoding steps per batch:")
    for beams in sorted({1, args.beams}):
        step_flops = args.gpu_batch * beams * full_dec  # one decoding step of one batch
        encode = CAPTIONS * SOURCE_TOKENS * full_enc * beams  # HF repeats the source per beam for cross K/V
        for utilisation in (0.3, 0.1):
            per_step = max(step_flops / (T4_PEAK * utilisation), step_bytes / T4_BANDWIDTH)
            total = batches * steps_per_batch * per_step + encode / (T4_PEAK * utilisation)
            print(f"  {beams} beam(s), {utilisation:.0%} of the fp16 peak: compute "
                  f"{step_flops / (T4_PEAK * utilisation) * 1e3:.1f} ms, weights {step_bytes / T4_BANDWIDTH * 1e3:.1f}"
                  f" ms per step -> {total / 60:.1f} min")

if __name__ == "__main__":
    main()
