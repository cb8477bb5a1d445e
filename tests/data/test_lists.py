"""Official split lists: fetched like weights (folder, file:// URL, pinned upstream), checksum
verified, pickles read without executing anything, and their known counts."""

from __future__ import annotations

import io
import os
import pickle
import urllib.request
from pathlib import Path

import pytest

from fss.data import CocoSource, FSS1000Source, PascalSource, folds
from fss.data.lists import (
    HSNET_COMMIT,
    MIN_CLASS_PIXELS,
    OFFICIAL_LISTS,
    PFENET_COMMIT,
    IndexedImage,
    ListStore,
    derive_fold_lists,
    hsnet_coco_classwise,
    hsnet_pascal_pairs,
    load_pickle_safely,
)
from fss.utils.errors import DataError

# The reference copy beside the project (tests/helpers/config.py: OFFICIAL_LISTS); never copied in.
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "official-lists"

needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason=f"the official lists are not at {SHARED} (../shared/data/official-lists): the "
           "list-count tests need them and the project must not copy them",
)


@pytest.fixture
def store(tmp_path) -> ListStore:
    return ListStore(SHARED, tmp_path / "cache")


# ------------------------------------------------------------------- official counts


@needs_shared
def test_every_pinned_checksum_matches_the_shared_copy(store):
    sums = {}
    for line in (SHARED / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name.removeprefix("./")] = digest
    assert sums == {name: spec.sha256 for name, spec in OFFICIAL_LISTS.items()}
    for name in OFFICIAL_LISTS:
        assert store.path(name) == SHARED / name  # verified in place, not copied


@needs_shared
def test_hsnet_pascal_pair_counts(store, tmp_path):
    source = PascalSource(tmp_path, lists=store)  # no images needed to count pairs
    assert [len(source.hsnet_pairs("train", f)) for f in range(4)] == [11394, 10255, 7797, 11594]
    assert [len(source.hsnet_pairs("test", f)) for f in range(4)] == [346, 451, 725, 346]
    for fold in range(4):
        novel = set(folds.novel_classes(fold, 20))
        assert {c for _, c in source.hsnet_pairs("test", fold)} == novel
        assert {c for _, c in source.hsnet_pairs("train", fold)} == set(range(20)) - novel
    first = hsnet_pascal_pairs(store, "trn", 0)[0]
    assert first == ("2007_000032", 0)  # "2007_000032__01": 1-based class in the file


@needs_shared
def test_hsnet_coco_pickles_follow_the_interleaved_folds(store):
    for fold in range(4):
        novel = set(folds.novel_classes(fold, 80, scheme="interleaved"))
        assert novel == set(range(fold, 80, 4))
        trn = hsnet_coco_classwise(store, "trn", fold)
        val = hsnet_coco_classwise(store, "val", fold)
        assert {c for c, images in trn.items() if images} == set(range(80)) - novel
        assert {c for c, images in val.items() if images} == novel
        assert all(i.startswith("train2014/") for images in trn.values() for i in images)
        assert all(i.startswith("val2014/") for images in val.values() for i in images)


@needs_shared
def test_coco_contiguous_split_is_assembled_from_the_same_lists(store, tmp_path):
    interleaved = CocoSource(tmp_path, lists=store)
    contiguous = CocoSource(tmp_path, fold_scheme="contiguous", lists=store)
    assert contiguous.novel_classes(0) == list(range(20))
    assert interleaved.novel_classes(0) == list(range(0, 80, 4))
    train = contiguous.hsnet_classwise("trn", 0)
    test = contiguous.hsnet_classwise("val", 0)
    assert sorted(train) == list(range(20, 80)) and sorted(test) == list(range(20))
    assert all(train.values()) and all(test.values())
    # Class 1 is base in interleaved fold 0: the same list as in that fold's file.
    assert test[1] == hsnet_coco_classwise(store, "val", 1)[1]
    assert train[20] == hsnet_coco_classwise(store, "trn", 1)[20]


@needs_shared
def test_fss1000_class_splits(store, tmp_path):
    source = FSS1000Source(tmp_path, lists=store)
    names = {s: source.split_classes(s) for s in ("train", "val", "test")}
    assert [len(names[s]) for s in ("train", "val", "test")] == [520, 240, 240]
    assert not set(names["train"]) & set(names["val"]) | set(names["train"]) & set(names["test"])
    assert source.base_classes(0) == list(range(520))
    assert source.val_classes(0) == list(range(520, 760))
    assert source.novel_classes(0) == list(range(760, 1000))
    assert len(source.class_names) == 1000


# --------------------------------------------------------------- fetching and caching


@needs_shared
def test_file_url_downloads_into_the_cache_once(tmp_path, monkeypatch):
    store = ListStore(SHARED.resolve().as_uri(), tmp_path / "cache")
    path = store.path("hsnet/pascal/val/fold0.txt")
    assert path == tmp_path / "cache" / "hsnet/pascal/val/fold0.txt"
    assert path.read_bytes() == (SHARED / "hsnet/pascal/val/fold0.txt").read_bytes()

    def no_network(*args, **kwargs):
        raise AssertionError("a cached, verified list must not be fetched again")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert store.path("hsnet/pascal/val/fold0.txt") == path


@needs_shared
def test_default_source_is_the_pinned_upstream_url(tmp_path, monkeypatch):
    fetched = []

    def fake_urlopen(url, timeout):
        fetched.append(url)
        name = next(n for n, spec in OFFICIAL_LISTS.items() if spec.url == url)
        return io.BytesIO((SHARED / name).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    store = ListStore(None, tmp_path / "cache")
    store.path("hsnet/fss/test.txt")
    store.path("pfenet/pascal/val.txt")
    assert fetched == [
        f"https://raw.githubusercontent.com/juhongm999/hsnet/{HSNET_COMMIT}/data/splits/fss/test.txt",
        f"https://raw.githubusercontent.com/dvlab-research/PFENet/{PFENET_COMMIT}/lists/pascal/val.txt",
    ]


def test_download_failure_says_how_to_proceed(tmp_path):
    store = ListStore((tmp_path / "nowhere").as_uri(), tmp_path / "cache")
    with pytest.raises(DataError) as error:
        store.path("hsnet/fss/test.txt")
    message = str(error.value)
    assert "could not download list hsnet/fss/test.txt from file://" in message
    assert "data.lists_dir" in message and "\n" not in message


def test_missing_list_in_a_folder_names_the_file(tmp_path):
    with pytest.raises(DataError) as error:
        ListStore(tmp_path, tmp_path / "cache").path("hsnet/pascal/trn/fold0.txt")
    assert str(tmp_path / "hsnet/pascal/trn/fold0.txt") in str(error.value)


def _tampered_copy(folder: Path, name: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("2007_000032__01\n")
    return path


def test_checksum_mismatch_in_a_folder_is_refused(tmp_path):
    _tampered_copy(tmp_path / "lists", "hsnet/pascal/val/fold0.txt")
    with pytest.raises(DataError) as error:
        ListStore(tmp_path / "lists", tmp_path / "cache").path("hsnet/pascal/val/fold0.txt")
    message = str(error.value)
    assert "checksum mismatch for list hsnet/pascal/val/fold0.txt" in message
    assert f"from the folder {tmp_path / 'lists'}" in message
    assert "juhongm999/hsnet@6b1bc12" in message and "\n" not in message


def test_checksum_mismatch_of_a_download_is_refused_and_not_cached(tmp_path):
    _tampered_copy(tmp_path / "mirror", "pfenet/pascal/val.txt")
    url = (tmp_path / "mirror").as_uri()
    with pytest.raises(DataError) as error:
        ListStore(url, tmp_path / "cache").path("pfenet/pascal/val.txt")
    assert f"from {url}/pfenet/pascal/val.txt" in str(error.value)
    assert not (tmp_path / "cache" / "pfenet/pascal/val.txt").exists()


def test_edited_lists_are_accepted_only_when_asked(tmp_path, caplog):
    _tampered_copy(tmp_path / "lists", "hsnet/pascal/val/fold0.txt")
    store = ListStore(tmp_path / "lists", tmp_path / "cache", verify=False)
    assert hsnet_pascal_pairs(store, "val", 0) == [("2007_000032", 0)]
    assert "differs from the official one" in caplog.text


def test_malformed_list_line_names_file_and_line(tmp_path):
    path = _tampered_copy(tmp_path / "lists", "hsnet/pascal/val/fold0.txt")
    path.write_text("2007_000032__01\n2007_000033_1\n")
    store = ListStore(tmp_path / "lists", tmp_path / "cache", verify=False)
    with pytest.raises(DataError, match=r"hsnet/pascal/val/fold0.txt line 2 is '2007_000033_1'"):
        hsnet_pascal_pairs(store, "val", 0)


def test_unknown_list_name_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="unknown list 'hsnet/x.txt'; known: hsnet/coco"):
        ListStore(tmp_path).path("hsnet/x.txt")


# --------------------------------------------------------------------------- pickles


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({0: ["train2014/a.jpg"], 1: _Exploit(marker)})
    with pytest.raises(DataError) as error:
        load_pickle_safely(payload, "evil.pkl")
    assert "refusing to unpickle evil.pkl" in str(error.value)
    assert "system" in str(error.value)
    assert not marker.exists()
    # The plain unpickler would have run it (proves the payload is live).
    pickle.loads(payload)
    assert marker.exists()


def test_malicious_coco_list_is_refused_even_unverified(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "lists" / "hsnet/coco/trn/fold0.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({0: _Exploit(marker)}))
    store = ListStore(tmp_path / "lists", tmp_path / "cache", verify=False)
    with pytest.raises(DataError, match="refusing to unpickle hsnet/coco/trn/fold0.pkl"):
        hsnet_coco_classwise(store, "trn", 0)
    assert not marker.exists()


def test_restricted_unpickler_reads_plain_data_and_reports_corruption():
    table = {3: ["train2014/x.jpg", "train2014/y.jpg"], 7: []}
    assert load_pickle_safely(pickle.dumps(table, protocol=3), "ok.pkl") == table
    with pytest.raises(DataError, match="cannot read the pickle broken.pkl"):
        load_pickle_safely(pickle.dumps(table)[:20], "broken.pkl")


# ------------------------------------------------------------- PFENet-protocol lists


def test_2048_pixel_rule_and_novel_filter():
    assert MIN_CLASS_PIXELS == 2 * 32 * 32
    index = [
        IndexedImage("a.jpg", "a.png", {5: 2048}),            # exactly 2048: counts
        IndexedImage("b.jpg", "b.png", {5: 2047, 6: 5000}),   # 5 too small here
        IndexedImage("c.jpg", "c.png", {5: 9000, 0: 1}),      # one novel pixel
        IndexedImage("d.jpg", "d.png", {7: 100}),             # nothing qualifies
        IndexedImage("e.jpg", "e.png", {}),                   # background only
    ]
    base = [5, 6, 7]
    train = derive_fold_lists(index, base, drop_other_classes=True)
    assert [(i, c) for i, _, c in train.data_list] == [("a.jpg", (5,)), ("b.jpg", (5, 6))]
    assert train.sub_class == {5: [("a.jpg", "a.png")], 6: [("b.jpg", "b.png")], 7: []}
    test = derive_fold_lists(index, [0, 5], drop_other_classes=False)
    # Without the filter, c.jpg is a query of class 5 (its novel pixel does not matter) and
    # b.jpg is not (5 is too small and 6 is not a class of this split)...
    assert [(i, c) for i, _, c in test.data_list] == [("a.jpg", (5,)), ("c.jpg", (0, 5))]
    # ...but a present class may be picked for a query while it is never a support.
    assert test.sub_class == {0: [], 5: [("a.jpg", "a.png"), ("c.jpg", "c.png")]}
