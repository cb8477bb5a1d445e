"""ListStore's download paths in a fresh clone (no official lists beside the repository):
a file:// folder and the pinned upstream URLs, fetched once into the cache. Edited bytes
with ``verify=False`` stand in for the official files; tests/data/test_lists.py repeats
the first two with the official files and their checksums when they are present."""

from __future__ import annotations

import io
import urllib.request

from fss.data.lists import HSNET_COMMIT, PFENET_COMMIT, ListStore, hsnet_pascal_pairs

LIST = "hsnet/pascal/val/fold0.txt"


def _refuse_network(*args, **kwargs):
    raise AssertionError("a cached list must not be fetched again")


def test_file_url_downloads_into_the_cache_once(tmp_path, monkeypatch, caplog):
    mirror = tmp_path / "mirror" / LIST
    mirror.parent.mkdir(parents=True)
    mirror.write_text("2007_000032__01\n2007_000039__05\n")
    store = ListStore((tmp_path / "mirror").as_uri(), tmp_path / "cache", verify=False)
    path = store.path(LIST)
    assert path == tmp_path / "cache" / LIST
    assert path.read_bytes() == mirror.read_bytes()
    assert "differs from the official one" in caplog.text
    monkeypatch.setattr(urllib.request, "urlopen", _refuse_network)
    assert store.path(LIST) == path
    assert hsnet_pascal_pairs(store, "val", 0) == [("2007_000032", 0), ("2007_000039", 4)]


def test_default_source_is_the_pinned_upstream_url(tmp_path, monkeypatch):
    fetched = []

    def fake_urlopen(url, timeout):
        fetched.append(url)
        return io.BytesIO(b"unused\n")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    store = ListStore(None, tmp_path / "cache", verify=False)
    store.path("hsnet/fss/test.txt")
    store.path("pfenet/pascal/val.txt")
    assert fetched == [
        f"https://raw.githubusercontent.com/juhongm999/hsnet/{HSNET_COMMIT}/data/splits/fss/test.txt",
        f"https://raw.githubusercontent.com/dvlab-research/PFENet/{PFENET_COMMIT}/lists/pascal/val.txt",
    ]
    monkeypatch.setattr(urllib.request, "urlopen", _refuse_network)
    store.path("hsnet/fss/test.txt")
    assert (tmp_path / "cache" / "pfenet/pascal/val.txt").read_bytes() == b"unused\n"
