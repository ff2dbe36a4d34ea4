"""Full-mode data paths on small fixture files written in the real formats (no network)."""
import http.server
import io
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import clip_utils as cu

FIXTURES = Path(__file__).parent / "fixtures"
ON_DISK = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg",
           "1003163366_44323f5815.jpg"]  # 1007129816_e794419615.jpg is in the train list but missing


@pytest.fixture
def flickr_root(tmp_path):
    """A miniature Flickr8k layout: the (sic) Flicker8k_Dataset folder and the three split lists."""
    images = tmp_path / "Flicker8k_Dataset"
    images.mkdir()
    for i, name in enumerate(ON_DISK):
        Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)).save(images / name)
    for split in ("train", "dev", "test"):
        shutil.copy(FIXTURES / f"Flickr_8k.{split}Images.txt", tmp_path)
    return tmp_path


def test_read_captions_token_format():
    df = cu.read_captions(FIXTURES / "flickr8k_token.txt")
    assert len(df) == 7
    assert df["image"].iloc[0] == "1000268201_693b08cb0e.jpg"  # "#0" dropped
    assert "2258277193_586949ec62.jpg.1" in set(df["image"])  # the broken key is kept, then dropped by split


def test_read_captions_csv_with_commas_and_missing_extension():
    df = cu.read_captions(FIXTURES / "hindi_captions.csv")
    assert len(df) == 4
    assert set(df["image"]) == {"1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg",
                                "1002674143_1b742ab4b8.jpg"}
    assert df["caption"].iloc[0] == "गुलाबी कपड़ों में एक बच्ची, सीढ़ियाँ चढ़ रही है।"  # unquoted comma
    assert df["caption"].iloc[2] == "दो कुत्ते, एक काला और एक चितकबरा, सड़क पर हैं।"  # quoted commas


def test_read_captions_csv_with_more_columns(tmp_path):
    (tmp_path / "c.csv").write_text('"image","caption","split"\n1000268201_693b08cb0e.jpg,"एक बच्ची, सीढ़ियों पर",train\n',
                                    encoding="utf-8")
    df = cu.read_captions(tmp_path / "c.csv")
    assert df.to_dict("records") == [dict(image="1000268201_693b08cb0e.jpg", caption="एक बच्ची, सीढ़ियों पर")]


def test_read_captions_space_separated():
    df = cu.read_captions(FIXTURES / "hindi_captions.txt")
    assert df["image"].tolist() == ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg",
                                    "1003163366_44323f5815.jpg"]
    assert df["caption"].iloc[2] == "बेंच पर लेटा आदमी, पास में कुत्ता।"


def test_read_captions_rejects_a_line_without_caption(tmp_path):
    (tmp_path / "bad.txt").write_text("1000268201_693b08cb0e कुत्ता\nonly_a_name\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line\(s\) \[2\]"):
        cu.read_captions(tmp_path / "bad.txt")


def test_load_flickr8k_maps_captions_onto_official_splits(flickr_root, capsys):
    with pytest.warns(UserWarning, match="1 captions of images in no split.*1 captions of images missing"):
        train, val, test = cu.load_flickr8k(flickr_root, FIXTURES / "flickr8k_token.txt")
    assert len(train) == 3 and len(val) == 1 and len(test) == 1
    assert all(Path(p).exists() for p in train["image"])  # absolute paths into Flicker8k_Dataset
    assert not set(train["image"]) & set(test["image"])
    report = capsys.readouterr().out
    assert "train: 3 images; images by number of captions: 0: 1, 1: 1, 2: 1" in report


def test_load_flickr8k_accepts_every_caption_format(flickr_root):
    for name in ("hindi_captions.csv", "hindi_captions.txt"):
        splits = cu.load_flickr8k(flickr_root, FIXTURES / name)  # nothing to drop: no warning
        assert sum(len(s) for s in splits) == {"hindi_captions.csv": 4, "hindi_captions.txt": 3}[name]


def test_load_flickr8k_without_images_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_flickr8k"):
        cu.load_flickr8k(tmp_path, FIXTURES / "flickr8k_token.txt")


def test_load_xm3600_first_caption_protocol():
    with pytest.warns(UserWarning, match="1 XM3600 images have no 'hi' caption"):
        first = cu.load_xm3600(FIXTURES / "captions.jsonl", "/data/xm3600")
    assert first["caption"].tolist() == ["खेत में चरती हुई दो गायें।", "बाज़ार में सब्ज़ी बेचती एक महिला।"]
    assert first["image"].iloc[0] == str(Path("/data/xm3600") / "000411001ff7dd4f.jpg")
    with pytest.warns(UserWarning):
        every = cu.load_xm3600(FIXTURES / "captions.jsonl", "/data/xm3600", all_captions=True)
    assert len(every) == 3


# -- downloads and archives ---------------------------------------------------

class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves one payload and honours "Range: bytes=N-", like the real hosts do."""
    payload = bytes(range(256)) * 40

    def do_GET(self):
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        if start >= len(self.payload):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(self.payload)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if self.path.endswith("cut.bin") else body)  # cut: connection drops

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data.bin"
    httpd.shutdown()


def test_download_resumes_a_partial_file_and_verifies(server, tmp_path):
    import hashlib

    payload = _RangeHandler.payload
    dest = tmp_path / "data.bin"
    (tmp_path / "data.bin.part").write_bytes(payload[:1000])  # a download cut off earlier
    cu.download(server, dest, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    assert dest.read_bytes() == payload and not (tmp_path / "data.bin.part").exists()
    (tmp_path / "done.bin.part").write_bytes(payload)  # killed after the last byte, before the rename
    assert cu.download(server, tmp_path / "done.bin", size=len(payload)).read_bytes() == payload
    (tmp_path / "stale.bin.part").write_bytes(payload + b"extra")  # bigger than the file: not complete
    with pytest.raises(IOError):
        cu.download(server, tmp_path / "stale.bin")
    assert not (tmp_path / "stale.bin").exists() and not (tmp_path / "stale.bin.part").exists()
    with pytest.raises(IOError, match="stopped at"):  # the connection drops halfway
        cu.download(server.replace("data.bin", "cut.bin"), tmp_path / "cut.bin")
    assert not (tmp_path / "cut.bin").exists() and (tmp_path / "cut.bin.part").exists()
    with pytest.raises(IOError, match="sha256"):
        cu.download(server, tmp_path / "other.bin", sha256="0" * 64)
    assert not (tmp_path / "other.bin").exists()


def test_extract_archive_refuses_path_escapes(tmp_path):
    evil_zip = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil_zip, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../escaped.txt", "bad")
    with pytest.raises(ValueError, match="escape"):
        cu.extract_archive(evil_zip, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()

    evil_tar = tmp_path / "evil.tgz"
    with tarfile.open(evil_tar, "w:gz") as tf:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(tarfile.TarError):
        cu.extract_archive(evil_tar, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()

    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("Flicker8k_Dataset/a.txt", "fine")
    assert (cu.extract_archive(good, tmp_path / "out") / "Flicker8k_Dataset" / "a.txt").read_text() == "fine"
