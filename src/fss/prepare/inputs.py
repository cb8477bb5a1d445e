"""Raw downloads as they come: a folder, a ``.tar`` / ``.tar.gz`` / ``.tgz`` or a ``.zip``.

:func:`members` walks one input and yields ``(name, read)`` for every file whose path (with
``/`` separators, relative to the archive root or the folder) matches a regular expression;
``read()`` returns the bytes and must be called before the next member (tar streams).
"""

from __future__ import annotations

import os
import re
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from fss.utils.errors import DataError

Member = tuple[str, Callable[[], bytes]]


def _is_tar(path: Path) -> bool:
    return path.name.endswith((".tar", ".tar.gz", ".tgz"))


def check_input(path: str | Path, what: str) -> Path:
    """The input path if it is a folder, a tar or a zip; else a one-line DataError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what} not found: {path} does not exist")
    if path.is_dir() or (path.is_file() and (_is_tar(path) or path.suffix == ".zip")):
        return path
    raise DataError(f"{what} {path} is neither a folder nor a .tar/.tar.gz/.tgz/.zip archive")


def members(path: Path, pattern: str | re.Pattern) -> Iterator[Member]:
    """Files of ``path`` whose relative name matches ``pattern`` (``re.search``)."""
    regex = re.compile(pattern)
    if path.is_dir():
        for folder, _, files in os.walk(path):
            for file in sorted(files):
                full = Path(folder) / file
                name = full.relative_to(path).as_posix()
                if regex.search(name):
                    yield name, full.read_bytes
        return
    try:
        if _is_tar(path):
            with tarfile.open(path, "r:*") as archive:
                for info in archive:
                    if info.isfile() and regex.search(info.name):
                        yield info.name, _tar_reader(archive, info)
        else:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and regex.search(info.filename):
                        yield info.filename, _zip_reader(archive, info)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as error:
        raise DataError(f"cannot read the archive {path} ({error}); is the download "
                        "complete? (compare its size or checksum with the official one)") from None


def _tar_reader(archive: tarfile.TarFile, info: tarfile.TarInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        stream = archive.extractfile(info)
        if stream is None:
            raise DataError(f"cannot read {info.name} from {archive.name}")
        return stream.read()

    return read


def _zip_reader(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    return lambda: archive.read(info)
