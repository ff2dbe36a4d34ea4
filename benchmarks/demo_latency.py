"""Demo page latency: a Hindi query to its results, through the running app, over a 10k-image quick gallery.

Starts `python app.py` (quick mode, a quick-recipe checkpoint, the gallery folder, the embeddings cache)
on a local port as a separate process, as a person would, then times whole requests:
  browser  (with --browser; needs Chromium) from pressing Enter in the page to the results' captions on
           screen, in headless Chromium: what a visitor waits for (the thumbnails then load on their own);
  api      gradio_client's predict("/search"): the HTTP request, the queue, query encoding, the search and
           the reply naming the result files (not downloading them: that is the thumbnails' part);
  search   cu.search_images alone, in this process, for comparison (what the page adds is the difference).
The gallery (synthetic scenes at 64 px) and the checkpoint are made once under --work; the embeddings are
computed at the first start and cached (a second run reuses them, as the app does). The checkpoint is the
quick recipe's architecture, trained (runs/quick/best) if one exists, else untrained: the work per query
is the same.

    python benchmarks/demo_latency.py [--images 10000] [--queries 50] [--k 8] [--browser]
"""
import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import clip_utils as cu  # noqa: E402

QUERIES = ["एक बड़ा लाल त्रिभुज", "एक छोटा नीला तारा", "दो पीले गोले", "बाईं ओर एक हरी पतंग", "तीन काले वर्ग",
           "ऊपर एक छोटी गुलाबी अंगूठी", "बीच में एक बैंगनी सितारा", "नीचे की ओर एक नारंगी वृत्त"]


def prepare(work: Path, n_images: int) -> tuple[Path, Path, str]:
    """(checkpoint folder, gallery folder, what the checkpoint is), made once under `work`."""
    gallery = work / f"gallery_{n_images}"
    if not (gallery / "done").exists():
        start = time.perf_counter()
        cu.make_synthetic_dataset(gallery, n_images=n_images, seed=7, image_px=64)
        (gallery / "done").write_text("")
        print(f"drew {n_images} scenes in {time.perf_counter() - start:.0f} s")
    trained = cu.load_trained(cu.Config.quick(out_dir=str(ROOT / "runs" / "quick")))
    if trained is not None:
        return ROOT / "runs" / "quick" / "best", gallery, "the trained quick run (runs/quick/best)"
    checkpoint = work / "untrained_quick"
    if not (checkpoint / "model.safetensors").exists():
        cfg = cu.Config.quick(out_dir=str(work))
        model, tokenizer = cu.build_model(cfg, captions=QUERIES * 10)
        cu.save_checkpoint(checkpoint, model.eval(), tokenizer, cfg)
    return checkpoint, gallery, "an untrained quick-recipe model (no runs/quick yet; the same work per query)"


def serve(checkpoint: Path, gallery: Path, work: Path, port: int) -> subprocess.Popen:
    """app.py on `port`; returns once the page answers (the first start embeds the gallery)."""
    env = {**os.environ, "CLIP_HINDI_MODE": "quick", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(work / "gradio")}
    log = open(work / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(checkpoint), "--gallery", str(gallery),
                             "--cache", str(work / "cache"), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.perf_counter()
    while time.perf_counter() - start < 900:
        if proc.poll() is not None:
            sys.exit(f"app.py stopped:\n{(work / 'app.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                print(f"app ready in {time.perf_counter() - start:.1f} s")
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("app.py did not answer within 15 minutes")


def summary(name: str, seconds: list[float]) -> str:
    ms = sorted(s * 1000 for s in seconds)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return (f"{name:8s} median {statistics.median(ms):7.1f} ms   p95 {p95:7.1f} ms   max {ms[-1]:7.1f} ms"
            f"   (n={len(ms)})")


def time_api(url: str, queries: list[str], k: int) -> list[float]:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    for query in QUERIES[:3]:  # warm-up: first-call costs (imports, thread pools) are not what a visitor waits for
        client.predict(query, k, api_name="/search")
    seconds = []
    for query in queries:
        start = time.perf_counter()
        items, _ = client.predict(query, k, api_name="/search")
        seconds.append(time.perf_counter() - start)
        assert len(items) == k, items
    return seconds


def time_browser(url: str, queries: list[str]) -> list[float]:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    seconds = []
    try:
        browser.get(url)
        box = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, "#query textarea"))
        for i, query in enumerate(queries):
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.DELETE, query)
            start = time.perf_counter()
            box.send_keys(Keys.ENTER)
            WebDriverWait(browser, 30, poll_frequency=0.005).until(
                lambda b: f"for {query}" in b.find_element(By.ID, "search-status").text
                and b.find_elements(By.CSS_SELECTOR, "#results .caption-label"))
            if i:  # the first query warms the page up
                seconds.append(time.perf_counter() - start)
    finally:
        browser.quit()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000, help="gallery size")
    parser.add_argument("--queries", type=int, default=50, help="timed queries")
    parser.add_argument("--k", type=int, default=8, help="results per query (the page's default)")
    parser.add_argument("--work", default=str(ROOT / "data" / "demo_latency"), help="gallery, checkpoint, cache")
    parser.add_argument("--browser", action="store_true", help="also time the page in headless Chromium")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, gallery, what = prepare(work, args.images)
    print(f"model: {what}; gallery: {args.images} images in {gallery}")
    queries = [QUERIES[i % len(QUERIES)] for i in range(args.queries)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = serve(checkpoint, gallery, work, port)
    load_before = os.getloadavg()[0]
    try:
        rows = [summary("api", time_api(f"http://127.0.0.1:{port}/", queries, args.k))]
        if args.browser:
            rows.append(summary("browser", time_browser(f"http://127.0.0.1:{port}/", queries[:20])))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    model, tokenizer, cfg = cu.load_checkpoint(checkpoint)
    images = sorted(str(p) for p in gallery.glob("*.png"))
    embeds, index = cu.embed_gallery(model, images, cfg, cache_dir=work / "cache", index="auto")  # the app's cache
    seconds = []
    for query in queries:
        start = time.perf_counter()
        cu.search_images(query, model, tokenizer, images, cfg, k=args.k, index=index)
        seconds.append(time.perf_counter() - start)
    rows.append(summary("search", seconds))
    print(f"{len(images)} images, k={args.k}, {os.cpu_count()} CPU cores, load average before / after "
          f"{load_before:.1f} / {os.getloadavg()[0]:.1f} (other processes share the cores)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
