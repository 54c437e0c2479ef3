"""Fetching the official files of a data set: where they are served, their published
checksums, downloads that keep a file only when its checksum matches, and tarballs unpacked
without links or paths that leave the data root.

`rankbias data download NAME` (`rankbias.data.download`) calls `fetch_files` with the
files of the registry's entry. (This module is not called download.py: the package's
function `download` would hide it.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from rankbias.data.formats import _IDX_FILES
from rankbias.utils import RankbiasError, atomic_path


@dataclass(frozen=True)
class _Remote:
    """One official file of a data set."""

    url: str
    checksum: str  # of the file as served: md5 (32 hex digits) or sha256 (64)
    folder: str = ""  # sub-folder of the data root it is saved in
    extract: str | None = None  # for a tarball: the folder it unpacks to (tarball removed)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # torchvision's mirror
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
# MD5s of the official files as published by their authors (also torchvision's lists).
# Debian's dataset-fashion-mnist recompressed its .gz files: their MD5s differ, their
# contents do not, and they are read, never checked against these.
_MNIST_MD5 = ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")
_FASHION_MD5 = ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")

# The official files of each data set that has some.
OFFICIAL: dict[str, tuple[_Remote, ...]] = {
    "mnist": tuple(_Remote(_MNIST_URL + f"{stem}.gz", md5, folder="mnist")
                   for stem, md5 in zip(_IDX_FILES, _MNIST_MD5)),
    "fashion-mnist": tuple(_Remote(_FASHION_URL + f"{stem}.gz", md5, folder="fashion-mnist")
                           for stem, md5 in zip(_IDX_FILES, _FASHION_MD5)),
    "cifar10": (_Remote(_CIFAR_URL + "cifar-10-python.tar.gz",
                        "c58f30108f718f92721af3b95e74349a", extract="cifar-10-batches-py"),),
    "cifar100": (_Remote(_CIFAR_URL + "cifar-100-python.tar.gz",
                         "eb9058c3a382ffc7106e4002c42a8d85", extract="cifar-100-python"),),
    "svhn": (_Remote(_SVHN_URL + "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373",
                     folder="svhn"),
             _Remote(_SVHN_URL + "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3",
                     folder="svhn")),
}


def fetch_files(remotes: tuple[_Remote, ...], root: Path, base_url: str | None,
                checksums: Mapping[str, str] | None, progress: bool,
                unpacked: Callable[[], bool]) -> None:
    """Fetch each remote file into root unless it is there with the right checksum; a
    tarball is fetched and unpacked only while `unpacked()` says its folder is missing."""
    for remote in remotes:
        url = remote.url if base_url is None else f"{base_url.rstrip('/')}/{remote.filename}"
        expected = (checksums or {}).get(remote.filename, remote.checksum)
        if remote.extract:
            if not unpacked():
                archive = root / remote.filename
                _fetch(url, archive, expected, progress)
                _extract_tarball(archive, root, remote.extract)
        else:
            dest = root / remote.folder / remote.filename
            if not (dest.is_file() and _digest(dest, expected) == expected.lower()):
                _fetch(url, dest, expected, progress)


def _digest(path: Path, checksum: str) -> str:
    h = _hasher(checksum)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hasher(checksum: str):
    algo = {32: "md5", 64: "sha256"}.get(len(checksum))
    if algo is None:
        raise RankbiasError(f"checksum {checksum!r} is neither an md5 (32 hex digits) nor a "
                            "sha256 (64)")
    return hashlib.new(algo, usedforsecurity=False)  # md5 only checks integrity here


def _fetch(url: str, dest: Path, checksum: str, progress: bool) -> None:
    """Download url to dest through a temporary file; keep it only if the checksum matches."""
    from tqdm import tqdm

    h = _hasher(checksum)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            size = int(response.headers.get("Content-Length") or 0) or None
            with atomic_path(dest) as tmp, open(tmp, "wb") as out, tqdm(
                    total=size, unit="B", unit_scale=True, desc=dest.name, file=sys.stderr,
                    disable=not progress, leave=False) as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
                if h.hexdigest() != checksum.lower():
                    # raised inside atomic_path: the temporary file is removed
                    raise RankbiasError(f"{url}: checksum mismatch (got {h.hexdigest()}, "
                                        f"expected {checksum}); nothing was saved")
    except (urllib.error.URLError, OSError) as err:  # HTTP errors, DNS, refused, timeouts
        reason = getattr(err, "reason", None) or err
        raise RankbiasError(f"could not download {url}: {reason}") from None


def _extract_tarball(archive: Path, root: Path, folder: str) -> None:
    """Unpack archive's `folder` into root/folder (replacing it); delete the archive either
    way (its checksum was fine, so a failure here is not cured by keeping it)."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        with tarfile.open(archive) as tar:
            _safe_extract(tar, tmp)
        if not (tmp / folder).is_dir():
            raise RankbiasError(f"{archive} does not contain {folder}/")
        if (root / folder).exists():
            shutil.rmtree(root / folder)
        os.replace(tmp / folder, root / folder)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise RankbiasError(f"{archive}: cannot unpack ({err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        archive.unlink(missing_ok=True)


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract only plain files and folders inside dest (no links, no ../ paths)."""
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.10.12
        tar.extractall(dest, filter="data")
        return
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if not (member.isfile() or member.isdir()) or dest.resolve() not in target.parents:
            raise RankbiasError(f"{tar.name}: unsafe member {member.name!r}")
    tar.extractall(dest)  # noqa: S202 - every member checked above
