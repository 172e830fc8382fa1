"""Fetch dataset archives: resumable HTTP downloads, checksum verification, safe extraction.

For each archive, in order: skip it if a marker says it was already extracted with the expected checksum; else
download it into ``<root>/archives/<name>.part`` (resumed with an HTTP ``Range`` request after an interruption,
mirrors tried in turn), verify its SHA-256, and only then extract it. A mismatch moves the file aside to
``<name>.corrupt`` and extracts nothing. Extraction refuses members that would land outside the target folder
(absolute paths, ``..``, links pointing out, devices). An archive already in ``<root>/archives/`` is verified and
extracted without downloading, so a user can fetch the files by other means.

Archives whose publisher gives no checksum (``Archive.sha256 is None``) are only fetched with a checksum from the
user (``sha256``) or with ``trust_unpinned``, which records the hash of what arrived in
``<root>/archives/checksums.json``; later runs verify against that record.
"""

from __future__ import annotations

import json
import logging
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm import tqdm

from pipeline.errors import DownloadError
from pipeline.io import sha256_of, write_json

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "wsss-download/0.1"
SKIPPED_PREFIXES = ("__MACOSX/",)  # macOS resource forks inside some zips: never wanted


@dataclass(frozen=True)
class Archive:
    """One file to fetch and unpack.

    Attributes:
        name: File name under ``<root>/archives``.
        urls: Mirrors, tried in order.
        sha256: The pinned SHA-256, or None where no published checksum could be found.
        size: Size in bytes, if known.
        extract_to: Folder under the dataset root to unpack into.
        checksum_source: Where the pinned checksum comes from (documentation).
    """

    name: str
    urls: tuple[str, ...]
    sha256: str | None
    size: int | None = None
    extract_to: str = "."
    checksum_source: str = ""


def _fetch_once(url: str, part: Path, size: int | None, timeout: float) -> None:
    """Append the missing bytes of ``url`` to ``part`` (one HTTP request); raise OSError if cut short."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have == size:
        return
    if size is not None and have > size:
        part.unlink()
        have = 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part file is complete
            return
        raise
    with response:
        resumed = have > 0 and response.status == 206
        if have and not resumed:
            log.info("%s ignored the range request; downloading it again from the start", url)
            have = 0
        length = response.headers.get("Content-Length")
        expected = have + int(length) if length is not None else size
        with (
            open(part, "ab" if resumed else "wb") as handle,
            tqdm(total=expected, initial=have, unit="B", unit_scale=True, desc=part.stem, disable=None) as bar,
        ):
            while chunk := response.read(CHUNK):
                handle.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if expected is not None and got < expected:
        raise OSError(f"connection closed after {got} of {expected} bytes")


def fetch(urls: Iterable[str], dest: Path, size: int | None = None, timeout: float = 30.0, attempts: int = 3) -> Path:
    """Download to ``dest`` through ``dest.part``, resuming after interruptions and trying each mirror.

    Args:
        urls: Mirrors, tried in order.
        dest: Final path; written only once the download is complete.
        size: Expected size in bytes, if known.
        timeout: Seconds to wait for a connection or for data.
        attempts: Requests per mirror (each resumes where the last stopped).

    Returns:
        ``dest``.

    Raises:
        DownloadError: If no mirror delivered the file.
    """
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for url in urls:
        for attempt in range(1, attempts + 1):
            try:
                _fetch_once(url, part, size, timeout)
                part.replace(dest)
                return dest
            except (URLError, OSError) as exc:
                errors.append(f"{url}: {exc}")
                log.warning("download of %s interrupted (attempt %d/%d): %s", url, attempt, attempts, exc)
                if isinstance(exc, HTTPError) and exc.code in (403, 404, 410):
                    break
    kept = f"; the partial file {part} is kept and resumed next time" if part.exists() else ""
    raise DownloadError(f"cannot download {dest.name} ({errors[-1] if errors else 'no URL'}){kept}")


def _check_member(name: str, archive: Path) -> None:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise DownloadError(f"{archive}: member {name!r} would be written outside the target folder; not extracting")


def safe_extract(archive: Path, dest: Path) -> int:
    """Unpack a zip or tar archive into ``dest``, refusing members that would escape it.

    Every member is checked before anything is written, so a malicious or broken archive extracts nothing.

    Args:
        archive: A ``.zip`` or (compressed) ``.tar`` file.
        dest: Target folder.

    Returns:
        The number of members extracted.

    Raises:
        DownloadError: If the archive is unreadable or a member escapes ``dest`` (path or link).
    """
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.filename.startswith(SKIPPED_PREFIXES)]
            for member in members:
                _check_member(member.filename, archive)
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise DownloadError(f"{archive}: member {member.filename!r} is a symbolic link; not extracting")
            for member in tqdm(members, desc=f"extract {archive.name}", unit="file", disable=None, mininterval=2):
                zf.extract(member, dest)
            return len(members)
    try:
        with tarfile.open(archive) as tf:
            members = [m for m in tf.getmembers() if not m.name.startswith(SKIPPED_PREFIXES)]
            for member in members:
                _check_member(member.name, archive)
                if member.issym() or member.islnk():
                    _check_member(str(PurePosixPath(member.name).parent / member.linkname), archive)
                elif not (member.isfile() or member.isdir()):
                    raise DownloadError(f"{archive}: member {member.name!r} is not a file or folder; not extracting")
            tf.extractall(dest, members=members, filter="data")
            return len(members)
    except (tarfile.TarError, tarfile.FilterError) as exc:
        raise DownloadError(f"{archive}: cannot extract ({type(exc).__name__}: {exc})") from None


def _expected_checksums(
    archives: tuple[Archive, ...], overrides: dict[str, str], recorded: dict[str, str], trust_unpinned: bool
) -> dict[str, str | None]:
    expected = {}
    for archive in archives:
        value = overrides.get(archive.name) or archive.sha256 or recorded.get(archive.name)
        if value is None and not trust_unpinned:
            raise DownloadError(
                f"{archive.name} has no published checksum; pass --sha256 {archive.name}=<hex> if you have one, or "
                f"--trust-unpinned to record the SHA-256 of what you download"
            )
        expected[archive.name] = value.lower() if value else None
    return expected


def download_archives(
    archives: tuple[Archive, ...],
    root: Path | str,
    sha256: dict[str, str] | None = None,
    trust_unpinned: bool = False,
    keep_archives: bool = False,
    timeout: float = 30.0,
    attempts: int = 3,
) -> list[str]:
    """Download, verify and extract archives into ``root`` (see the module docstring).

    Args:
        archives: What to fetch.
        root: The dataset root (``data.root``).
        sha256: Checksums given by the user, by archive name (override the pinned ones).
        trust_unpinned: Accept archives without any checksum and record the hash of what arrived.
        keep_archives: Keep the archive files after extraction (default: delete them to save disk).
        timeout: Seconds to wait for a connection or for data.
        attempts: Requests per mirror.

    Returns:
        The names of the archives that were extracted by this call (already extracted ones are skipped).

    Raises:
        DownloadError: On a failed download, a checksum mismatch (the file is moved to ``<name>.corrupt`` and
            nothing is extracted), or an unsafe archive.
    """
    root = Path(root)
    store = root / "archives"
    record_path = store / "checksums.json"
    recorded = json.loads(record_path.read_text()) if record_path.is_file() else {}
    expected = _expected_checksums(archives, sha256 or {}, recorded, trust_unpinned)
    extracted = []
    for archive in archives:
        marker = store / f"{archive.name}.extracted"
        if marker.is_file() and json.loads(marker.read_text()).get("sha256") == expected[archive.name]:
            log.info("%s: already extracted, skipping", archive.name)
            continue
        path = store / archive.name
        if not path.is_file():
            fetch(archive.urls, path, archive.size, timeout, attempts)
        actual = sha256_of(path)
        if expected[archive.name] is None:
            recorded[archive.name] = actual
            write_json(record_path, recorded)
            log.warning("%s has no pinned checksum; recorded sha256 %s in %s", archive.name, actual, record_path)
        elif actual != expected[archive.name]:
            corrupt = path.with_name(path.name + ".corrupt")
            shutil.move(path, corrupt)
            raise DownloadError(
                f"checksum mismatch for {archive.name}: expected sha256 {expected[archive.name]}, got {actual}; "
                f"nothing was extracted and the file was moved to {corrupt} (delete it and download again)"
            )
        count = safe_extract(path, root / archive.extract_to)
        write_json(marker, {"sha256": actual, "members": count})
        if not keep_archives:
            path.unlink()
        extracted.append(archive.name)
    return extracted
