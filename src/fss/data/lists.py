"""Split lists: the official ones (fetched like weights, checksum-verified) and the
PFENet-protocol per-fold lists built from them.

Official lists are never copied into this project. :class:`ListStore` gets each one

- from a folder (or ``file://`` / ``https://`` URL of a folder) the user gives
  (``data.lists_dir``), laid out as ``hsnet/...`` and ``pfenet/...`` below; or
- on first use from the official repository at a pinned commit, into the cache
  (``<paths.cache_dir>/lists``),

and verifies its sha256 against the pinned value before anything reads it (a mismatch is
refused, naming where the file came from). The COCO lists of HSNet are pickles: they are
read with an unpickler that refuses every global, so a tampered file cannot run code.

PFENet-protocol lists (``data_list`` / ``sub_class_file_list`` per fold, as PFENet, BAM
and HDMNet use) are built here from a source list of ``image label`` pairs and the label
PNGs: one pass counts the pixels of every class in every label map (cached as JSON), then
each fold's lists are derived (also cached):

- train: images whose classes are all base classes (any image with a novel-class pixel is
  dropped), with at least one base class of >= 2048 pixels (2 * 32 * 32);
- val/test: images with at least one novel class of >= 2048 pixels;
- ``sub_class_file_list[c]``: the images where class ``c`` has >= 2048 pixels (the
  support pool of ``c``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fss.data.io import read_label, save_bytes
from fss.utils.errors import DataError
from fss.utils.filelock import file_lock

log = logging.getLogger(__name__)

HSNET_REPO = "juhongm999/hsnet"
HSNET_COMMIT = "6b1bc12b3ff9f3950f49c55ab6f089e8d9e0d191"
PFENET_REPO = "dvlab-research/PFENet"
PFENET_COMMIT = "a5056754d232829644e84d36b1e1d30818bd4c4f"
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

# A class counts in an image only with at least this many pixels (PFENet's 2 * 32 * 32).
MIN_CLASS_PIXELS = 2 * 32 * 32


@dataclass(frozen=True)
class OfficialList:
    """One official list file: where it lives upstream and its pinned checksum."""

    name: str  # path in a lists folder, e.g. "hsnet/pascal/trn/fold0.txt"
    repo: str
    commit: str
    repo_path: str
    sha256: str

    @property
    def url(self) -> str:
        return RAW_URL.format(repo=self.repo, commit=self.commit, path=self.repo_path)


_SHA256 = {
    "hsnet/coco/trn/fold0.pkl": "5a94e113d8c150a7e20723360dd9779eaa1305ccddc28dff4501e29ed3df5c45",
    "hsnet/coco/trn/fold1.pkl": "69629cdd84fd57b3bb4e281b5bf65440f7ecf9b62eb119f1d8d7fe78b0fb02a8",
    "hsnet/coco/trn/fold2.pkl": "594adc4b8ebecf9b8b559284f334ff3dd3fa3c150317cbc6ce7917ce81a08c03",
    "hsnet/coco/trn/fold3.pkl": "07b38ccc9e15ebfd1ab6288eeaad3a5f289bbba3419807212169fd44b89cc5c5",
    "hsnet/coco/val/fold0.pkl": "96002389be83b4730d13b814398f54eb2baf5c3283598ec2288d60624d6ef9c3",
    "hsnet/coco/val/fold1.pkl": "a34deecdf2858fc436f5ea4d5a2d46b6674ce09f7ebce41c34b694116381fa56",
    "hsnet/coco/val/fold2.pkl": "0f275c5e9bf538f6ef8a95054f6daf2519b53785c4ab7fd07e633dda57dac1e5",
    "hsnet/coco/val/fold3.pkl": "927597bd78036a460abdab243330667af6ceffdb483bc3331ae55d148f00c449",
    "hsnet/fss/test.txt": "26f1b9e9dd0c4a58c01db306aeb5bccb5de361d544ec1b15f219efc4b74c0bf1",
    "hsnet/fss/trn.txt": "815bce03f2502719ba3bd9c1f79111b74ec8ab63e6111830ff7312de49b1cf17",
    "hsnet/fss/val.txt": "9cac02c58602f2789b4e6393200e450e3ba1edae6673d6a87ae2063d0c547aee",
    "hsnet/pascal/trn/fold0.txt": "40fded8be6afbc4b70953277f2a178af8055cddd4e73fb4646b7bf19704b9da2",
    "hsnet/pascal/trn/fold1.txt": "558167c3c6fea0cda1bb7c7a275e66d5de7bc13cbc97e00c5872ac84d5f0954e",
    "hsnet/pascal/trn/fold2.txt": "d07e35f4a4ae95774c619bafb57d65d682dbd5b9f33c7f71a4f5cef8e3f99609",
    "hsnet/pascal/trn/fold3.txt": "ffe09100c0c4d9c19d074a33b0f29fe5a89a730579ba39a9f9e908186298ac17",
    "hsnet/pascal/val/fold0.txt": "748e2f4732ac502cb3aa1f3768936b394bd7ba4e611ac5bf959291a268e249df",
    "hsnet/pascal/val/fold1.txt": "afce1929e4dacbc13c07f9a26d4ce7738d415e1b18443fe173e58303836f5c14",
    "hsnet/pascal/val/fold2.txt": "50b1f5218e8f882ca65d85da5be230b978a70067e9b3e0e9fca1528f546bd7fb",
    "hsnet/pascal/val/fold3.txt": "c3825d7c52d1608d4c62c5b85d6ef3f74cf5898032bc068a94c971df17bdf71a",
    "pfenet/pascal/sbd_data.txt": "da815450986311495e949117cfe30af961f7dcf01fb44af1d3235236e8d453c9",
    "pfenet/pascal/val.txt": "25cdf9026986ab18d9c235d458f2b39bc44a29b801f3371624a22011bcee980c",
    "pfenet/pascal/voc_original_train.txt": "8f1a904b0405e6d340af64292ab237d10791182ee23fa6a518b26d474ff0f99e",
    "pfenet/pascal/voc_sbd_merge.txt": "29810afd761b4fbd23a95de996e51bac3c5c8ad5da520b1d920e057aff2a5744",
    "pfenet/pascal/voc_sbd_merge_noduplicate.txt": "87578cffe141c681b15bf0b07a4cc79019ed7af02335b5ca614ccd044827fc0b",
}


def _official(name: str, sha256: str) -> OfficialList:
    origin, rest = name.split("/", 1)
    if origin == "hsnet":
        return OfficialList(name, HSNET_REPO, HSNET_COMMIT, f"data/splits/{rest}", sha256)
    return OfficialList(name, PFENET_REPO, PFENET_COMMIT, f"lists/{rest}", sha256)


OFFICIAL_LISTS: dict[str, OfficialList] = {n: _official(n, s) for n, s in _SHA256.items()}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ListStore:
    """Gets official list files, verified, from a user folder/URL or the pinned upstream.

    Args:
        lists_dir: ``None`` (download from the official repositories on first use), a local
            folder, or a ``file://`` / ``http(s)://`` URL of a folder, laid out like the
            official lists (``hsnet/pascal/trn/fold0.txt``, ``pfenet/pascal/val.txt``...).
        cache_dir: where downloaded lists (and the lists built from them) are kept.
        verify: check every file against its pinned sha256 (refuse on mismatch). ``False``
            accepts edited lists from ``lists_dir`` (a warning is logged once per file).
    """

    def __init__(
        self,
        lists_dir: str | Path | None = None,
        cache_dir: str | Path = ".cache/lists",
        verify: bool = True,
    ):
        self.lists_dir = None if lists_dir in (None, "") else str(lists_dir)
        self.cache_dir = Path(cache_dir)
        self.verify = bool(verify)
        self._warned: set[str] = set()

    # -- where a file comes from -----------------------------------------------------
    @property
    def _is_url(self) -> bool:
        return self.lists_dir is not None and "://" in self.lists_dir

    def _spec(self, name: str) -> OfficialList:
        if name not in OFFICIAL_LISTS:
            raise DataError(f"unknown list {name!r}; known: {', '.join(sorted(OFFICIAL_LISTS))}")
        return OFFICIAL_LISTS[name]

    def path(self, name: str) -> Path:
        """Local path of the verified list ``name`` (downloading it first if needed)."""
        spec = self._spec(name)
        if self.lists_dir is not None and not self._is_url:
            path = Path(self.lists_dir) / name
            if not path.is_file():
                raise DataError(f"list {name} not found: expected the file {path} "
                                f"(data.lists_dir={self.lists_dir}); point data.lists_dir at a "
                                "folder with the official hsnet/ and pfenet/ lists, or set it "
                                "to null to download them")
            self._check(spec, path.read_bytes(), f"the folder {self.lists_dir}")
            return path
        cached = self.cache_dir / name
        with file_lock(self.cache_dir / ".lock"):
            if cached.is_file():
                data = cached.read_bytes()
                if sha256_of(data) == spec.sha256 or not self.verify:
                    return cached
                log.warning("Cached list %s does not match its checksum: downloading it again",
                            cached)
            url = f"{self.lists_dir.rstrip('/')}/{name}" if self._is_url else spec.url
            data = self._download(url, name)
            self._check(spec, data, url)
            save_bytes(cached, data)
        return cached

    def read_bytes(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def _download(self, url: str, name: str) -> bytes:
        log.info("Downloading list %s from %s", name, url)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (pinned URL)
                return response.read()
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise DataError(f"could not download list {name} from {url} ({error}); fetch the "
                            f"official lists by hand and set data.lists_dir=<folder>") from None

    def _check(self, spec: OfficialList, data: bytes, origin: str) -> None:
        digest = sha256_of(data)
        if digest == spec.sha256:
            return
        if not self.verify:
            if spec.name not in self._warned:
                self._warned.add(spec.name)
                log.warning("List %s from %s differs from the official one (%s@%s); using it "
                            "because data.lists_verify=false", spec.name, origin, spec.repo,
                            spec.commit[:7])
            return
        raise DataError(f"checksum mismatch for list {spec.name} from {origin}: sha256 "
                        f"{digest[:16]}..., expected {spec.sha256[:16]}... ({spec.repo}@"
                        f"{spec.commit[:7]}/{spec.repo_path}); refusing it (replace the file, "
                        "or set data.lists_verify=false to use an edited list on purpose)")

    def __repr__(self) -> str:
        return (f"ListStore(lists_dir={self.lists_dir!r}, cache_dir='{self.cache_dir}', "
                f"verify={self.verify})")


# --------------------------------------------------------------------------- pickles


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only the primitive types pickle creates without a global (dict, list, str,
    int, float, tuple, bytes, bool, None): every class or function lookup is refused."""

    def __init__(self, stream, origin: str):
        super().__init__(stream)
        self.origin = origin

    def find_class(self, module: str, name: str) -> Any:
        raise DataError(f"refusing to unpickle {self.origin}: it references {module}.{name} "
                        "(a list file holds only dicts, lists, numbers and strings); the file "
                        "was tampered with or is not an official list")

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing to unpickle {self.origin}: it uses persistent ids")


def load_pickle_safely(data: bytes, origin: str) -> Any:
    """Unpickle ``data`` without ever importing or calling anything (see the unpickler)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), origin).load()
    except DataError:
        raise
    except Exception as error:  # corrupt stream: EOFError, UnpicklingError, ...
        raise DataError(f"cannot read the pickle {origin} ({type(error).__name__}: {error}); "
                        "replace the file") from None


# --------------------------------------------------------------------------- parsers


def _lines(data: bytes, origin: str) -> list[str]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"list {origin} is not UTF-8 text; replace the file") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def hsnet_pascal_pairs(store: ListStore, split: str, fold: int) -> list[tuple[str, int]]:
    """``(image id, 0-based class)`` pairs of ``hsnet/pascal/<split>/fold<fold>.txt``
    (lines ``2007_000033__01``: image id, then the 1-based class)."""
    name = f"hsnet/pascal/{split}/fold{fold}.txt"
    pairs = []
    for number, line in enumerate(_lines(store.read_bytes(name), name), start=1):
        image_id, sep, class_text = line.rpartition("__")
        if not sep or not class_text.isdigit() or not 1 <= int(class_text) <= 20:
            raise DataError(f"list {name} line {number} is {line!r}; expected IMAGEID__CC with "
                            "CC the 1-based class (01..20)")
        pairs.append((image_id, int(class_text) - 1))
    return pairs


def hsnet_coco_classwise(store: ListStore, split: str, fold: int) -> dict[int, list[str]]:
    """``hsnet/coco/<split>/fold<fold>.pkl``: 0-based class -> image paths (relative to
    ``COCO2014``, e.g. ``train2014/COCO_train2014_000000000009.jpg``)."""
    name = f"hsnet/coco/{split}/fold{fold}.pkl"
    path = store.path(name)
    content = load_pickle_safely(path.read_bytes(), f"{name} ({path})")
    if not isinstance(content, dict) or not all(
        isinstance(k, int) and isinstance(v, list) and all(isinstance(p, str) for p in v)
        for k, v in content.items()
    ):
        raise DataError(f"list {name} is not a dict of class id -> list of image paths")
    bad = sorted(k for k in content if not 0 <= k < 80)
    if bad:
        raise DataError(f"list {name} has class ids {bad[:5]} outside 0..79")
    return {int(k): list(v) for k, v in content.items()}


def fss_classes(store: ListStore, split: str) -> list[str]:
    """Class folder names of ``hsnet/fss/<split>.txt`` (``trn``, ``val``, ``test``)."""
    name = f"hsnet/fss/{split}.txt"
    return _lines(store.read_bytes(name), name)


def read_pair_list(data: bytes, origin: str) -> list[tuple[str, str]]:
    """``IMAGE_PATH LABEL_PATH`` lines (PFENet format) -> pairs."""
    pairs = []
    for number, line in enumerate(_lines(data, origin), start=1):
        parts = line.split()
        if len(parts) != 2:
            raise DataError(f"list {origin} line {number} is {line!r}; expected "
                            "'IMAGE_PATH LABEL_PATH'")
        pairs.append((parts[0], parts[1]))
    return pairs


# -------------------------------------------------------------- PFENet-protocol lists


@dataclass(frozen=True)
class IndexedImage:
    """One image of a source list and the pixel count of each class in its label map."""

    image: str  # path relative to the dataset folder
    label: str
    counts: dict[int, int]  # 0-based class -> pixels


def _count_classes(path: Path, num_classes: int) -> dict[int, int]:
    label = read_label(path, num_classes)
    counts = np.bincount(label.ravel(), minlength=256)
    return {c - 1: int(counts[c]) for c in range(1, num_classes + 1) if counts[c]}


def build_label_index(
    pairs: Sequence[tuple[str, str]],
    folder: Path,
    num_classes: int,
    cache_file: Path,
    workers: int = 8,
) -> list[IndexedImage]:
    """Class pixel counts of every label map of ``pairs`` (paths relative to ``folder``),
    computed once and cached in ``cache_file`` (JSON)."""
    with file_lock(cache_file.with_suffix(".lock")):
        if cache_file.is_file():
            entries = json.loads(cache_file.read_text())["images"]
            return [IndexedImage(i, lb, {int(c): n for c, n in counts.items()})
                    for i, lb, counts in entries]
        from tqdm import tqdm

        log.info("Indexing %d label maps under %s (once; cached in %s)", len(pairs), folder,
                 cache_file)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            counts = list(tqdm(
                pool.map(lambda pair: _count_classes(folder / pair[1], num_classes), pairs),
                total=len(pairs), desc=f"indexing {folder.name} labels", unit="img",
                mininterval=2.0, disable=len(pairs) < 200,
            ))
        index = [IndexedImage(i, lb, c) for (i, lb), c in zip(pairs, counts, strict=True)]
        payload = {"folder": str(folder), "num_classes": num_classes,
                   "images": [[e.image, e.label, {str(k): v for k, v in e.counts.items()}]
                              for e in index]}
        save_bytes(cache_file, json.dumps(payload).encode())
    return index


@dataclass(frozen=True)
class FoldLists:
    """PFENet-protocol lists of one fold and split.

    data_list:  the query images, in source-list order, each with the classes an episode
                may pick for it (PFENet: every class of the split present in the image).
    sub_class:  class -> the images where it has >= ``min_pixels`` pixels (support pool).
    """

    data_list: list[tuple[str, str, tuple[int, ...]]]
    sub_class: dict[int, list[tuple[str, str]]]


def derive_fold_lists(
    index: Iterable[IndexedImage],
    classes: Sequence[int],
    drop_other_classes: bool,
    min_pixels: int = MIN_CLASS_PIXELS,
) -> FoldLists:
    """The ``data_list`` / ``sub_class_file_list`` of PFENet for the given split classes.

    ``drop_other_classes`` (training): skip every image holding a class outside
    ``classes`` (a novel class), however small.
    """
    wanted = set(classes)
    data_list = []
    sub_class: dict[int, list[tuple[str, str]]] = {c: [] for c in classes}
    for entry in index:
        present = [c for c in sorted(entry.counts) if entry.counts[c] > 0]
        if drop_other_classes and not set(present) <= wanted:
            continue
        qualifying = [c for c in present if c in wanted and entry.counts[c] >= min_pixels]
        if not qualifying:
            continue
        candidates = tuple(c for c in present if c in wanted)
        data_list.append((entry.image, entry.label, candidates))
        for c in qualifying:
            sub_class[c].append((entry.image, entry.label))
    return FoldLists(data_list, sub_class)


def cached_fold_lists(
    cache_dir: Path,
    index_loader,
    classes: Sequence[int],
    drop_other_classes: bool,
    min_pixels: int = MIN_CLASS_PIXELS,
) -> FoldLists:
    """:func:`derive_fold_lists`, cached in ``cache_dir`` as JSON plus the PFENet text
    format (``data_list.txt`` lines ``IMAGE LABEL``; ``sub_class_file_list.json`` with
    1-based class keys, as PFENet numbers classes). ``index_loader()`` gives the index."""
    cache_file = cache_dir / "lists.json"
    with file_lock(cache_dir.with_suffix(".lock")):
        if cache_file.is_file():
            payload = json.loads(cache_file.read_text())
            return FoldLists(
                [(i, lb, tuple(c)) for i, lb, c in payload["data_list"]],
                {int(c): [tuple(p) for p in v] for c, v in payload["sub_class"].items()},
            )
        lists = derive_fold_lists(index_loader(), classes, drop_other_classes, min_pixels)
        payload = {"data_list": [list(x) for x in lists.data_list],
                   "sub_class": {str(c): v for c, v in lists.sub_class.items()}}
        save_bytes(cache_dir / "data_list.txt",
                   "".join(f"{i} {lb}\n" for i, lb, _ in lists.data_list).encode())
        save_bytes(cache_dir / "sub_class_file_list.json", json.dumps(
            {str(c + 1): [list(p) for p in v] for c, v in lists.sub_class.items()}).encode())
        save_bytes(cache_file, json.dumps(payload).encode())
    return lists


def cache_key(*parts: Any) -> str:
    """Short stable hash of what a built list depends on."""
    return sha256_of(json.dumps([str(p) for p in parts]).encode())[:12]


__all__ = [
    "MIN_CLASS_PIXELS",
    "OFFICIAL_LISTS",
    "FoldLists",
    "IndexedImage",
    "ListStore",
    "build_label_index",
    "cache_key",
    "cached_fold_lists",
    "derive_fold_lists",
    "fss_classes",
    "hsnet_coco_classwise",
    "hsnet_pascal_pairs",
    "load_pickle_safely",
    "read_pair_list",
]
