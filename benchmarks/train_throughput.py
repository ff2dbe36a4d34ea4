"""Training throughput: our loop against a faithful re-implementation of the published one.

Same model, same batch size, same captions, same images, same machine; the two loops alternate
within one invocation so that background load hits both alike. Data loading is part of every
timed step. The published loop (Simple-CLIP style):
  * tokenises the whole dataset once, padded to its longest caption (max_length=200);
  * decodes and transforms images one by one in the main process (num_workers=0);
  * runs in fp32 with the soft-target loss.
Ours: clip_utils.make_loader (per-batch padding, JPEG draft decoding; workers only on a GPU),
make_optimizer (fused AdamW) and train_step (clip loss; channels-last images; bf16 autocast where
the GPU or CPU has native bf16, as cfg.precision="auto" picks).

    python benchmarks/train_throughput.py --config quick           # CPU, a minute
    python benchmarks/train_throughput.py --config full --steps 3  # resnet50 + BERT-base, CPU: ~10 min
    python benchmarks/train_throughput.py --config full --device cuda --steps 50

Captions follow a Flickr8k-Hindi-like length distribution (most 8-20 words, a tail to 40).
"""
import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import clip_utils as cu  # noqa: E402

WORDS = ("एक कुत्ता बच्चा लड़की लड़का आदमी औरत घास पर में के साथ पानी सड़क लाल नीला हरा काला सफ़ेद "
         "दौड़ रहा रही है हैं खेल पास सामने पीछे ऊपर नीचे गेंद साइकिल पहाड़ बर्फ़ समुद्र किनारे "
         "कपड़े पहने हुए दो तीन छोटा बड़ा भूरा पेड़ झील नाव शहर भीड़ कूद").split()
HINDI_BERT_V2_VOCAB = 197_285  # vocab_size in the config of l3cube's MuRIL-based -v2 BERTs


def make_data(folder: Path, n_images: int, image_px: tuple, seed: int = 0) -> pd.DataFrame:
    """Photo-sized JPEGs (smooth colour fields plus noise) and 5 captions each."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        w, h = image_px
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = rng.uniform(0, 255, 3) * (1 - xx[..., None]) + rng.uniform(0, 255, 3) * yy[..., None]
        pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        for _ in range(5):
            n_words = int(rng.integers(8, 21)) if rng.random() < 0.95 else int(rng.integers(21, 41))
            rows.append(dict(image=str(path), caption=" ".join(rng.choice(WORDS, n_words)) + "।"))
    rows[0]["caption"] = " ".join(rng.choice(WORDS, 40)) + "।"  # the tail: one caption at the maximum
    return pd.DataFrame(rows)


# -- the published loop ---------------------------------------------------------

class PublishedDataset(torch.utils.data.Dataset):
    """Dataset-wide padding; one image decoded and transformed per item, in the main process."""

    def __init__(self, df, tokenizer, cfg):
        self.encoded = tokenizer(list(df["caption"]), padding=True, truncation=True, max_length=200)
        self.paths, self.transform = list(df["image"]), cu.image_transforms(cfg, train=False)  # resize + normalise

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        item = {k: torch.tensor(v[i]) for k, v in self.encoded.items()}
        image = np.asarray(Image.open(self.paths[i]).convert("RGB"))
        item["image"] = self.transform(image=image)["image"].float()
        return item


def published_steps(model, tokenizer, df, cfg, steps):
    loader = torch.utils.data.DataLoader(PublishedDataset(df, tokenizer, cfg), batch_size=cfg.batch_size,
                                         shuffle=True, num_workers=0, drop_last=True)
    optimizer = torch.optim.AdamW([  # the published groups, PyTorch's default (unfused) AdamW
        dict(params=model.image_encoder.parameters(), lr=cfg.image_encoder_lr),
        dict(params=model.text_encoder.parameters(), lr=cfg.text_encoder_lr),
        dict(params=[*model.image_projection.parameters(), *model.text_projection.parameters()],
             lr=cfg.head_lr, weight_decay=cfg.weight_decay)], weight_decay=0.0)
    model.train()
    batches = iter(loader)
    for _ in range(steps):
        batch = {k: v.to(cu.config._device(cfg)) for k, v in next(batches).items()}
        image_embeds = model.encode_image(batch["image"])
        text_embeds = model.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = cu.soft_target_loss(image_embeds, text_embeds)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return len(loader.dataset.encoded["input_ids"][0])  # every batch has the dataset-wide length


# -- ours -----------------------------------------------------------------------

def our_steps(model, tokenizer, df, cfg, steps):
    device = cu.config._device(cfg)
    model.image_encoder.to(memory_format=torch.channels_last)  # as fit does
    loader = cu.make_loader(df, tokenizer, cfg, train=True, **model.image_encoder.crop)
    optimizer = cu.make_optimizer(model, cfg)
    accelerator = cu.train._accelerator(cfg)  # mixed precision as fit picks it (cfg.precision)
    trained, optimizer = accelerator.prepare(model, optimizer)
    trained.train()
    batches, lengths = iter(loader), []
    for _ in range(steps):
        batch = cu.train._to(next(batches), device)
        lengths.append(batch["input_ids"].shape[1])
        cu.train_step(trained, batch, optimizer, cfg, accelerator)
    accelerator.unwrap_model(trained, keep_fp32_wrapper=False)
    return float(np.mean(lengths))


# -- measurement ----------------------------------------------------------------

class PeakMemory:
    """Peak GPU memory (CUDA) or peak resident memory of this process (CPU, sampled every 5 ms)."""

    def __init__(self, device):
        self.cuda, self.peak, self.running = device.type == "cuda", 0, False

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.running = True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
        self.gb = self.peak / 2**30


def run_once(kind, cfg, df, tokenizer, bert_config, steps):
    """Build a fresh model (same seed), warm up 1 step, then time `steps` steps."""
    from transformers import BertModel

    cu.config._seed_everything(cfg.seed)
    model = cu.CLIPModel(cfg, cu.ImageEncoder(cfg), cu.TextEncoder(cfg, BertModel(bert_config)))
    model = model.to(cu.config._device(cfg))
    steps_fn = published_steps if kind == "published" else our_steps
    steps_fn(model, tokenizer, df, cfg, 1)  # warm-up: allocator, oneDNN/cuDNN kernel choice
    with PeakMemory(cu.config._device(cfg)) as memory:
        start = time.perf_counter()
        tokens = steps_fn(model, tokenizer, df, cfg, steps)
        if cu.config._device(cfg).type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return dict(loop=kind, samples_per_s=steps * cfg.batch_size / seconds, seconds=seconds,
                peak_memory_gb=memory.gb, text_tokens=tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20 quick, 3 full)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop")
    parser.add_argument("--precision", default="auto", help="our loop's cfg.precision: auto, bf16 or fp32")
    args = parser.parse_args()
    from transformers import BertConfig

    torch.set_num_threads(os.cpu_count())
    if args.config == "quick":
        cfg = cu.Config.quick(device=args.device, precision=args.precision)
        image_px, steps = (96, 96), args.steps or 20
    else:  # the full-size architecture, random init: nothing downloads here
        cfg = cu.Config.full(device=args.device, image_pretrained=False, precision=args.precision)
        image_px, steps = (500, 375), args.steps or 3
    folder = Path(tempfile.mkdtemp(prefix="throughput_"))
    df = make_data(folder, n_images=max(64, (steps + 1) * cfg.batch_size // 5 + 8), image_px=image_px)
    tokenizer = cu.train_wordpiece_tokenizer(df["caption"], 1000)
    if args.config == "quick":
        bert_config = BertConfig(vocab_size=len(tokenizer), **cfg.text_config)
    else:  # BERT-base with hindi-bert-v2's vocabulary size (ids beyond our small tokenizer's stay unused)
        bert_config = BertConfig(vocab_size=HINDI_BERT_V2_VOCAB, max_position_embeddings=512)
    words = df["caption"].str.split().str.len()
    print(f"{args.config} config on {args.device} ({torch.get_num_threads()} threads), batch {cfg.batch_size}, "
          f"{steps} timed steps per run, our precision={cfg.precision}")
    print(f"captions: words median {words.median():.0f}, 90th pct {words.quantile(0.9):.0f}, max {words.max()}")
    results = []
    for repeat in range(args.repeats):
        for kind in ("published", "ours") if repeat % 2 == 0 else ("ours", "published"):
            row = run_once(kind, cfg, df, tokenizer, bert_config, steps)
            results.append(row)
            print(f"  {kind:9s} {row['samples_per_s']:7.2f} samples/s  peak {row['peak_memory_gb']:.2f} GB  "
                  f"text length {row['text_tokens']:.0f} tokens")
    table = pd.DataFrame(results).groupby("loop")[["samples_per_s", "peak_memory_gb", "text_tokens"]].median()
    print(table.round(2).to_string())
    print(f"speed-up (ours / published, median samples/s): "
          f"{table.loc['ours', 'samples_per_s'] / table.loc['published', 'samples_per_s']:.2f}x")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
