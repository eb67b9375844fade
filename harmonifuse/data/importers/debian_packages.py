"""Pinned Debian packages fetched at prepare time: ``apt-get download``, sha256 check, ``dpkg-deb -x``.

The real-speech corpus (:mod:`harmonifuse.data.importers.real_speech`) is built from two freeware
games in Debian main whose data packages hold voiced, subtitled dialogue. Installing them would
pull in scummvm, so each ``.deb`` is only downloaded (``apt-get download NAME=VERSION``, which
needs no root) and unpacked with ``dpkg-deb -x`` into the cache:

    $HARMONIFUSE_CACHE/debian/NAME_VERSION_all.deb      (default ~/.cache/harmonifuse/debian/)
    $HARMONIFUSE_CACHE/debian/NAME_VERSION/usr/...       the unpacked tree (with a completion marker)

Versions are pinned to Debian 12 (bookworm) and every download is checked against its sha256
before it is used; a mismatch stops with a message saying what to do. Both steps are atomic and
reused on later runs (the download lands under a temporary name and is moved into place only once
verified; the tree is unpacked into a temporary folder and renamed when complete).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harmonifuse.atomic import atomic_directory, atomic_write_bytes

log = logging.getLogger("harmonifuse.data.importers")

__all__ = ["PACKAGES", "DebianPackage", "PackageError", "cached_root", "copy_notices", "fetch",
           "package_cache_dir", "sha256_file"]

UNPACKED_MARKER = ".harmonifuse-unpacked.json"


class PackageError(RuntimeError):
    """A pinned package could not be fetched, verified or unpacked; the message says what to do."""


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    sha256: str
    data: str          # the game data folder inside the package
    copyright: str     # the licence (Debian's copyright file)
    readme: str        # the upstream readme the licence asks to keep with the data

    @property
    def deb_name(self) -> str:
        return f"{self.name}_{self.version}_all.deb"  # what apt-get download names it (no epoch here)


PACKAGES: dict[str, DebianPackage] = {
    "flight-of-the-amazon-queen": DebianPackage(
        "flight-of-the-amazon-queen", "1.0.0-9",
        "40c08fd258d6fe95c46c1eaf5e9137f84ba330657995a281bd887c94a560a0f1",
        data="usr/share/scummvm/flight-of-the-amazon-queen",
        copyright="usr/share/doc/flight-of-the-amazon-queen/copyright",
        readme="usr/share/doc/flight-of-the-amazon-queen/readme.txt.gz"),
    "drascula": DebianPackage(
        "drascula", "1.0+ds4-2",
        "ed4af8e2d41ad446e2f3b73533daa1804e2f13f62f596c0b02b8dc39544f22b4",
        data="usr/share/scummvm/drascula",
        copyright="usr/share/doc/drascula/copyright",
        readme="usr/share/doc/drascula/readme.txt"),
}


def package_cache_dir() -> Path:
    """``$HARMONIFUSE_CACHE/debian`` (default ``~/.cache/harmonifuse/debian``)."""
    from harmonifuse.assets import cache_dir

    return cache_dir() / "debian"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package(name: str) -> DebianPackage:
    try:
        return PACKAGES[name]
    except KeyError:
        raise PackageError(f"unknown package {name!r}; pinned: {', '.join(sorted(PACKAGES))}") from None


def _unpacked_dir(package: DebianPackage, cache: Path) -> Path:
    return cache / f"{package.name}_{package.version}"


def _is_unpacked(folder: Path, package: DebianPackage) -> bool:
    try:
        marker = json.loads((folder / UNPACKED_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == package.sha256


def cached_root(name: str, cache: Path | None = None) -> Path | None:
    """The unpacked tree of a pinned package if an earlier run left it complete in the cache, else
    None (nothing is downloaded)."""
    package = _package(name)
    folder = _unpacked_dir(package, Path(cache) if cache else package_cache_dir())
    return folder if _is_unpacked(folder, package) else None


def verify(deb: Path, package: DebianPackage) -> None:
    """Raise PackageError unless ``deb`` has the pinned sha256."""
    found = sha256_file(deb)
    if found != package.sha256:
        raise PackageError(
            f"{deb}: sha256 {found} differs from the pinned {package.sha256} of {package.name} "
            f"{package.version}: the file is damaged or another build. Delete it and run again to "
            f"download it anew; if apt serves a different {package.version} build, the pin in "
            f"harmonifuse/data/importers/debian_packages.py needs review")


def download(package: DebianPackage, cache: Path) -> Path:
    """``cache/NAME_VERSION_all.deb``, downloaded with ``apt-get download`` unless already there;
    verified against the pinned sha256 either way."""
    deb = cache / package.deb_name
    if deb.is_file():
        verify(deb, package)
        return deb
    apt = shutil.which("apt-get")
    if apt is None:
        raise PackageError(
            f"apt-get not found: fetching {package.name} {package.version} needs Debian's or Ubuntu's apt. "
            f"Elsewhere, download {package.deb_name} from https://packages.debian.org/bookworm/{package.name} "
            f"and put it in {cache}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{package.name}.download-") as tmp:
        log.info("downloading %s=%s with apt-get download", package.name, package.version)
        result = subprocess.run([apt, "download", f"{package.name}={package.version}"], cwd=tmp,
                                capture_output=True, text=True, check=False)
        fetched = sorted(Path(tmp).glob(f"{package.name}_*.deb"))
        if result.returncode != 0 or not fetched:
            detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise PackageError(
                f"apt-get download {package.name}={package.version} failed ({' / '.join(detail) or 'no .deb'}): "
                f"run `apt-get update` (the pinned version is Debian 12 bookworm's, section main); if your "
                f"release lacks it, download {package.deb_name} from https://packages.debian.org/bookworm/"
                f"{package.name} and put it in {cache}")
        verify(fetched[0], package)
        os.replace(fetched[0], deb)  # same folder: atomic, and only once verified
    return deb


def unpack(package: DebianPackage, deb: Path, cache: Path) -> Path:
    """``dpkg-deb -x`` into ``cache/NAME_VERSION`` (atomically; reused when complete)."""
    target = _unpacked_dir(package, cache)
    if _is_unpacked(target, package):
        return target
    dpkg_deb = shutil.which("dpkg-deb")
    if dpkg_deb is None:
        raise PackageError(f"dpkg-deb not found: unpacking {deb} needs it (Debian package dpkg; "
                           f"`apt-get install dpkg`), or unpack the .deb yourself and run the importer on "
                           f"its {package.data}")

    def build(tmp: Path) -> None:
        result = subprocess.run([dpkg_deb, "-x", str(deb), str(tmp)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise PackageError(f"dpkg-deb -x {deb} failed: {result.stderr.strip()[-300:]}; delete the "
                               "file and run again to download it anew")
        if not (tmp / package.data).is_dir():
            raise PackageError(f"{deb} holds no {package.data}: not the expected package")
        (tmp / UNPACKED_MARKER).write_text(json.dumps({"package": package.name, "version": package.version,
                                                       "sha256": package.sha256}), encoding="utf-8")

    log.info("unpacking %s into %s", deb.name, target)
    atomic_directory(target, build, keep_existing=lambda folder: _is_unpacked(folder, package))
    return target


def fetch(name: str, cache: Path | None = None) -> Path:
    """The unpacked tree (its root, holding ``usr/``) of the pinned package ``name``: downloaded,
    verified and unpacked on first use, reused afterwards."""
    package = _package(name)
    cache = Path(cache) if cache else package_cache_dir()
    existing = _unpacked_dir(package, cache)
    if _is_unpacked(existing, package):
        return existing
    return unpack(package, download(package, cache), cache)


def copy_notices(name: str, root: Path, out: Path) -> list[Path]:
    """Copy the package's licence and upstream readme beside the manifests, as the licence asks:
    ``OUT/LICENSE-NAME.txt`` and ``OUT/README-NAME.txt``."""
    package = _package(name)
    written = []
    for source, target in ((package.copyright, f"LICENSE-{name}.txt"), (package.readme, f"README-{name}.txt")):
        path = Path(root) / source
        if not path.is_file():
            raise PackageError(f"{path} is missing: the unpacked {name} package is incomplete; delete "
                               f"{root} and run again")
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        out.mkdir(parents=True, exist_ok=True)
        written.append(atomic_write_bytes(out / target, data))
    return written
