"""Big files: resumable HTTP download (Range requests) with checksum, and unpacking that cannot escape its folder.

Used by the named recipes. A download goes to ``<dest>.part``; a rerun continues from the bytes already
there (``Range: bytes=N-``; a server that ignores Range answers 200 and the file restarts from zero). The
finished file is checked against its MD5/SHA-256 when one is published, then renamed to ``dest``. Unpacking
refuses members with absolute paths, ``..`` or links (zip) and uses tarfile's ``data`` filter (tar, which also
refuses device and FIFO members). An archive or ``.part`` path that holds a FIFO, socket or device is refused
before it is opened.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urljoin

import aiohttp

from loaders.images.download import DownloadConfig, make_session
from loaders.images.netguard import BadUrlError, BlockedAddressError, check_url
from loaders.images.paths import NotRegularFileError, PathEscapeError, require_regular_file, safe_join

logger = logging.getLogger(__name__)


class ArchiveError(RuntimeError):
    """A download or an archive that cannot be used; the message says what to do."""


def _regular_or_absent(path: Path) -> None:
    """Refuse a FIFO/device/folder where an archive or its ``.part`` belongs: opening one blocks or never ends."""
    try:
        require_regular_file(path)
    except FileNotFoundError:
        pass
    except NotRegularFileError as exc:
        raise ArchiveError(f"{exc}; remove it and rerun") from None


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, config: DownloadConfig, *, md5: str | None = None,
                  sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` unless it is already there; resumes a partial ``.part`` file."""
    _regular_or_absent(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _regular_or_absent(part)
    for attempt in range(config.retries + 1):
        try:
            asyncio.run(_download(url, part, config))
            break
        except (BlockedAddressError, BadUrlError) as exc:
            raise ArchiveError(f"refusing to download {url}: {exc}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            logger.warning("download of %s interrupted (%s); attempt %d", url, exc, attempt + 1)
            if attempt == config.retries:
                raise ArchiveError(
                    f"could not download {url} after {attempt + 1} attempts ({exc}); rerun to resume from "
                    f"{part.stat().st_size if part.exists() else 0} bytes"
                ) from exc
    for algorithm, expected in (("md5", md5), ("sha256", sha256)):
        if expected and file_digest(part, algorithm) != expected.lower():
            part.unlink()
            raise ArchiveError(f"{url}: {algorithm} mismatch (expected {expected}); the partial file was removed")
    os.replace(part, dest)
    return dest


async def _download(url: str, part: Path, config: DownloadConfig) -> None:
    """One attempt; redirects are followed by hand so every hop passes the address check before connecting."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout_s, sock_read=config.read_timeout_s)
    async with make_session(config) as session:
        for _hop in range(config.max_redirects + 1):
            await check_url(url, allow_private=config.allow_private_addresses, networks=config.allowed_networks)
            async with session.get(url, headers=headers, timeout=timeout, allow_redirects=False) as resp:
                if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                    url = urljoin(url, resp.headers["Location"])
                    continue
                if resp.status == 416 and have:  # we already hold every byte
                    return
                if resp.status not in (200, 206):
                    raise ArchiveError(f"{url}: HTTP {resp.status}; check the URL or the recipe's mirror")
                with open(part, "ab" if resp.status == 206 else "wb") as handle:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        handle.write(chunk)
                return
        raise ArchiveError(f"{url}: more than {config.max_redirects} redirects")


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a .zip / .tar / .tar.gz / .tgz into ``dest``, refusing members that would land outside it."""
    _regular_or_absent(archive)
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member(info.filename, dest, is_link=(info.external_attr >> 16) & 0o170000 == 0o120000)
            zf.extractall(dest)
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                _check_member(member.name, dest, is_link=member.issym() or member.islnk())
            tf.extractall(dest, filter="data")
    else:
        raise ArchiveError(f"{archive}: unknown archive type (expected .zip, .tar, .tar.gz or .tgz)")


def _check_member(member: str, dest: Path, *, is_link: bool) -> None:
    if is_link:
        raise ArchiveError(f"archive member {member!r} is a link; refusing to unpack it")
    try:
        safe_join(dest, member.rstrip("/"), resolve_links=False)
    except PathEscapeError as exc:
        raise ArchiveError(f"archive member {member!r} would land outside {dest}: {exc}") from None
