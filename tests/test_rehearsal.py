"""The full-mode rehearsal: every notebook top to bottom with CLIP_HINDI_MODE=full, offline, on the fixture of
tests/rehearsal.py (tiny models under the real Hub names, miniature archives in the real layouts)."""
import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import rehearsal  # tests/ is on sys.path (pytest rootdir-less test modules)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rehearsal_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal")
    env = rehearsal.build(root / "fixture")
    repo = rehearsal.copy_repo(root / "repo")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("CLIP_HINDI_", "HF_"))}
    return repo, {**keep, **env, "PYTHON": sys.executable}, root / "fixture"


# Run one notebook in its own folder with nbclient (as nbmake and `jupyter execute` do) and keep its outputs.
EXECUTE = """
import sys, nbclient, nbformat
from pathlib import Path
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                        resources={"metadata": {"path": str(Path(sys.argv[1]).parent)}}).execute()
nbformat.write(nb, sys.argv[2])
"""


def _outputs(notebook) -> str:
    """The text a run printed, from a notebook executed by EXECUTE."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(out.get("text", "")) for c in cells for out in c.get("outputs", []))


def test_run_all_in_full_mode_then_a_fresh_runtime_loads_the_published_checkpoint(rehearsal_env, tmp_path):
    repo, env, fixture = rehearsal_env
    result = subprocess.run(["bash", "run_all.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "mode: full" in result.stdout
    for notebook in sorted((repo / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert notebook.name in result.stdout
    assert (repo / "runs" / "clip-hindi" / "best" / "model.safetensors").exists()
    assert (repo / "data" / "full" / "cats_vs_dogs" / "बिल्ली").is_dir()  # notebook 05 downloaded its labelled set

    # Colab opens each notebook in a fresh runtime: no run folder, so 03-05 must load the published checkpoint.
    shutil.rmtree(repo / "runs")
    for name in ("03_zero_shot_demo", "04_evaluate", "05_linear_probe"):
        result = subprocess.run([sys.executable, "-c", EXECUTE, str(repo / "notebooks" / f"{name}.ipynb"),
                                 str(tmp_path / f"{name}.ipynb")], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        printed = _outputs(tmp_path / f"{name}.ipynb")
        assert "Loaded the published checkpoint damerajee/clip-hindi" in printed, name
        assert "training one now" not in printed, name
    printed = _outputs(tmp_path / "05_linear_probe.ipynb")
    assert "skipped [4, 8] examples per class: the smallest class has 3 pool images" in printed
    assert not (repo / "runs").exists() or not any((repo / "runs").rglob("model.safetensors"))  # nothing trained

    # With public sources alone, notebook 01 made its captions by translation and kept their English sources ...
    machine = repo / "data" / "full" / "flickr8k_hindi_machine.csv"
    assert machine.exists() and "english" in pd.read_csv(repo / "data" / "full" / "train.csv").columns
    # ... and naming a caption file of the user's afterwards (CLIP_HINDI_CAPTIONS) builds the tables from that file.
    captions = {**env, "CLIP_HINDI_CAPTIONS": str(fixture / "flickr8k_hindi_captions.txt")}
    result = subprocess.run([sys.executable, "-c", EXECUTE, str(repo / "notebooks" / "01_prepare_data.ipynb"),
                             str(tmp_path / "01_prepare_data.ipynb")], env=captions, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    train = pd.read_csv(repo / "data" / "full" / "train.csv")
    assert "english" not in train.columns and train["caption"].str.contains("घास पर दौड़ रहा है").any()
    assert f"Their captions: the caption file {fixture / 'flickr8k_hindi_captions.txt'}" in _outputs(
        tmp_path / "01_prepare_data.ipynb")
