"""A Hindi CLIP distilled from an English CLIP on parallel captions, against a Hindi CLIP trained directly.

Quick mode, on notebook 01's tables, per seed: (1) the English teacher, Config.quick() trained with fit on
the English captions; (2) the distilled student, a random-init Hindi BERT whose text tower learns to put
each Hindi training caption where the teacher puts its English source (distill_text_tower, no images),
paired with the teacher's image tower; (3) the direct Hindi CLIP, Config.quick() trained with fit on the
Hindi captions, i.e. the same image-text budget as the teacher; (4) LiT, the teacher's image tower frozen
and a new Hindi text tower trained against it with fit on the Hindi captions. Test text-to-image recall is
on the same 246 test scenes (every one holds a colour-shape pair unseen in training), English captions for
the teacher and Hindi for the rest. The bar: the student's R@1 is at least 90 % of the teacher's.
cfg.max_minutes is off, so a loaded machine changes only the times, not the numbers.

    python benchmarks/distill.py [--seeds 42 1 2] [--distill-epochs 30] [--no-lit] [--data data/quick]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import pandas as pd  # noqa: E402

import clip_utils as cu  # noqa: E402


def english(table: pd.DataFrame) -> pd.DataFrame:
    """The same rows with the English caption in the `caption` column: what the teacher trains and is scored on."""
    return table.assign(caption=table["english"])


def timed(run):
    start = time.time()
    result = run()
    return result, round(time.time() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2], help="training seeds")
    parser.add_argument("--distill-epochs", type=int, default=30, help="epochs of distill_text_tower")
    parser.add_argument("--no-lit", action="store_true", help="skip the LiT row")
    parser.add_argument("--data", default=str(ROOT / "data" / "quick"), help="quick-mode data folder")
    args = parser.parse_args()
    train, val, test = cu.prepare_quick_data(args.data)
    rows = []
    for seed in args.seeds:
        out = Path(tempfile.mkdtemp(prefix=f"distill_{seed}_"))
        teacher_cfg = cu.Config.quick(seed=seed, max_minutes=None, out_dir=str(out / "teacher"))
        teacher, teacher_tokenizer = cu.build_model(teacher_cfg, captions=train["english"])
        _, seconds = timed(lambda: cu.fit(teacher, teacher_tokenizer, english(train), english(val), teacher_cfg))
        runs = {"English teacher (fit, English captions)":
                (cu.retrieval_metrics(teacher, teacher_tokenizer, english(test), teacher_cfg), seconds)}

        student_cfg = cu.Config.quick(seed=seed, max_minutes=None, epochs=args.distill_epochs,
                                      out_dir=str(out / "student"))
        student, tokenizer, student_cfg = cu.student_clip(teacher, teacher_cfg, student_cfg, captions=train["caption"])
        _, seconds = timed(lambda: cu.distill_text_tower(student, tokenizer, teacher, teacher_tokenizer,
                                                         train, val, student_cfg))
        runs["Hindi student (distil_text_tower, no images)"] = (
            cu.retrieval_metrics(student, tokenizer, test, student_cfg), seconds)

        direct_cfg = cu.Config.quick(seed=seed, max_minutes=None, out_dir=str(out / "direct"))
        direct, direct_tokenizer = cu.build_model(direct_cfg, captions=train["caption"])
        _, seconds = timed(lambda: cu.fit(direct, direct_tokenizer, train, val, direct_cfg))
        runs["Hindi CLIP trained directly (fit, Hindi captions)"] = (
            cu.retrieval_metrics(direct, direct_tokenizer, test, direct_cfg), seconds)

        if not args.no_lit:
            lit_cfg = cu.Config.quick(seed=seed, max_minutes=None, freeze="image", out_dir=str(out / "lit"))
            lit, lit_tokenizer, lit_cfg = cu.student_clip(teacher, teacher_cfg, lit_cfg, captions=train["caption"])
            _, seconds = timed(lambda: cu.fit(lit, lit_tokenizer, train, val, lit_cfg))
            runs["LiT (teacher's image tower frozen, fit)"] = (cu.retrieval_metrics(lit, lit_tokenizer, test, lit_cfg),
                                                              seconds)
        teacher_r1 = runs["English teacher (fit, English captions)"][0]["t2i_R@1"]
        for name, (metrics, seconds) in runs.items():
            rows.append({"seed": seed, "model": name, "t2i_R@1": metrics["t2i_R@1"], "t2i_R@5": metrics["t2i_R@5"],
                         "i2t_R@1": metrics["i2t_R@1"], "R@1_vs_teacher": metrics["t2i_R@1"] / teacher_r1,
                         "train_s": seconds})
        print(pd.DataFrame(rows).round(3).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print("\nper seed:")
    print(table.round(3).to_string(index=False))
    print("\nmean over seeds:")
    print(table.groupby("model", sort=False)[["t2i_R@1", "t2i_R@5", "i2t_R@1", "R@1_vs_teacher"]].mean().round(3))
    students = table[table["model"].str.startswith("Hindi student")]
    print(f"\nbar (student R@1 >= 0.9 x teacher's on every seed): "
          f"{'met' if (students['R@1_vs_teacher'] >= 0.9).all() else 'NOT met'}")


if __name__ == "__main__":
    main()
