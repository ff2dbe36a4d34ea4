"""Files caches trust: fingerprints that notice a replaced file, writes that land whole or not at all."""
import os

import pandas as pd
import pytest

import clip_utils as cu
from clip_utils.files import atomic_write, file_fingerprint


def test_the_fingerprint_notices_size_time_order_extra_and_missing_files(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    first = file_fingerprint([a, b], 224)
    assert file_fingerprint([a, b], 224) == first  # nothing changed: the same
    assert file_fingerprint([b, a], 224) != first  # another order: image ids would point elsewhere
    assert file_fingerprint([a, b], 256) != first  # another setting
    stamp = os.stat(a).st_mtime_ns
    a.write_bytes(b"uno")  # the same size, the same time: indistinguishable by design (no reading of pixels)
    os.utime(a, ns=(stamp, stamp))
    assert file_fingerprint([a, b], 224) == first
    os.utime(a, ns=(stamp + 10**9, stamp + 10**9))  # replaced later under the same name
    assert file_fingerprint([a, b], 224) != first
    os.utime(a, ns=(stamp, stamp))
    a.write_bytes(b"longer")  # another size
    os.utime(a, ns=(stamp, stamp))
    assert file_fingerprint([a, b], 224) != first
    missing = file_fingerprint([a, tmp_path / "gone.jpg"])  # a missing file is counted, not an error
    assert missing != file_fingerprint([a])


def test_an_interrupted_write_leaves_the_old_file_or_none(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as partial:
            partial.write_text("half a ta")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and not list((tmp_path / "sub").iterdir())  # none, and no debris
    with atomic_write(target) as partial:
        partial.write_text("image,caption\n" + "a.jpg,x\n" * 1000)
    whole = target.read_text()
    with pytest.raises(RuntimeError):
        with atomic_write(target) as partial, open(partial, "w") as f:
            f.write("image,caption\n")
            f.flush()
            raise RuntimeError("killed mid-write")
    assert target.read_text() == whole and list((tmp_path / "sub").iterdir()) == [target]


def test_split_tables_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    table = pd.DataFrame({"image": [str(tmp_path / "a.png")], "caption": ["एक लाल गोला"]})
    real = pd.DataFrame.to_csv
    calls = []

    def dies_on_the_second(self, path, **kwargs):  # the process dies while writing val.csv
        calls.append(path)
        if len(calls) == 2:
            with open(path, "w") as f:
                f.write("image,cap")
            raise KeyboardInterrupt
        return real(self, path, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        cu.tables._cached_splits(tmp_path, lambda: (table, table, table), {"what": "a test table"})
    monkeypatch.setattr(pd.DataFrame, "to_csv", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]  # no short val.csv, no leftovers
    rebuilt = []
    splits = cu.tables._cached_splits(tmp_path, lambda: rebuilt.append(1) or (table, table, table),
                                    {"what": "a test table"})
    assert rebuilt and all(len(s) == 1 for s in splits)  # an incomplete set is made again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.json", "test.csv", "train.csv", "val.csv"]
