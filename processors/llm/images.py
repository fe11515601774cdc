"""Image content parts: content hashes for cache keys, downscaled data URLs for the wire, token counts.

A request's images are read and encoded only when it is actually sent (never for a cache hit), in a worker
thread so the event loop keeps serving other requests while PIL decodes.

Image work is done once per image file per process, not once per request (a referee sends each image with
every question about it, and every referee sends it again): what the cache key and the token estimate need of
a file (the hash of its bytes, its pixel size) is kept in a bounded LRU keyed by the file's identity
(``st_dev``, ``st_ino``, ``st_size``, ``st_mtime_ns``, ``st_ctime_ns`` of the regular file the path names), so
a file changed on disk is read again; the wire encoding (resize + base64) is kept in a byte-bounded LRU keyed
by (content hash, longest side, format), an image that fits the longest side keyed once for every side
(``encoding_key``), and one thread encodes an image while the others that want it wait. Each look-up still
``stat``s the path and refuses anything but a regular file; a miss reads it through ``read_regular_file``'s
checks. A request remembers what it read of its files (``Prepared.image_files``): its token estimate takes the
size from there and, when its encoding is kept, its body is built on the event loop without touching the file
again (it then holds the content its cache key names).
"""

from __future__ import annotations

import base64
import io
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.ids import bytes_id

if TYPE_CHECKING:
    from processors.llm.encoded_store import EncodedStore

IMAGE_PART_TYPES = ("image_path", "image_bytes", "image_url")


def is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES


def part_bytes(part: dict[str, Any]) -> bytes:
    if part["type"] == "image_path":  # a FIFO or device in an image's place fails at once, never blocks
        from loaders.images.paths import read_regular_file

        return read_regular_file(part["path"])
    if part["type"] == "image_bytes":
        return bytes(part["data"])
    raise ValueError(f"image part of type {part['type']!r} has no local bytes")


def content_ref(part: dict[str, Any]) -> dict[str, Any]:
    """What stands for an image in the cache key: the hash of its bytes (a remote URL stands for itself)."""
    return content_ref_and_info(part)[0]


def content_ref_and_info(part: dict[str, Any]) -> tuple[dict[str, Any], "FileInfo | None"]:
    """``content_ref`` and, for a local file, the ``FileInfo`` it was taken from (so a request's token
    estimate and wire body need no second look-up of the file)."""
    if part["type"] == "image_url":
        url = part["image_url"]["url"]
        if url.startswith("data:"):
            return {"image_sha": bytes_id(url.encode("ascii", "replace"))}, None
        return {"image_url": url}, None
    if part["type"] == "image_path":
        info = file_info(part["path"])
        return {"image_sha": info.digest}, info
    return {"image_sha": bytes_id(part_bytes(part))}, None


class DataURL(str):
    """A data URL made by ``_encode``: base64 behind a fixed prefix, so JSON writes it as it is, between
    quotes (no character to escape). The transport splices it into a request body instead of running its
    ~40 KB through the JSON encoder on every request (``transport.body_json``). A ``str`` in every other way."""

    __slots__ = ()


MIMES = {"jpeg": "image/jpeg", "png": "image/png"}


def _encode(data: bytes, max_side: int, fmt: str) -> tuple[str, tuple[int, int]]:
    """The data URL of ``data`` on the wire (within ``max_side``, as ``fmt``) and its pixel size."""
    encoded, size = _encode_image(data, max_side, fmt)
    return data_url(encoded, fmt), size


def data_url(encoded: bytes, fmt: str) -> DataURL:
    return DataURL(f"data:{MIMES[fmt]};base64,{base64.b64encode(encoded).decode('ascii')}")


def _encode_image(data: bytes, max_side: int, fmt: str) -> tuple[bytes, tuple[int, int]]:
    from PIL import Image, ImageOps  # lazy: PIL only when an image is actually sent

    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced scale, much faster
        # In place, and no convert of an image already RGB: the copies both make otherwise were ~30 % of an
        # encoding (0.65 of 2.4 ms for a 512x384 image), and the bytes written are the same.
        ImageOps.exif_transpose(image, in_place=True)
        image.thumbnail((max_side, max_side))
        if fmt == "jpeg":
            if image.mode != "RGB":
                image = image.convert("RGB")
            save_as, options = "JPEG", {"quality": 90}
        else:
            if image.mode not in ("RGB", "RGBA", "L", "LA"):
                image = image.convert("RGBA")
            save_as, options = "PNG", {}
        out = io.BytesIO()
        image.save(out, save_as, **options)
        size = image.size
    return out.getvalue(), size


def to_wire_part(part: dict[str, Any], *, max_side: int, detail: str, fmt: str) -> dict[str, Any]:
    """An ``image_url`` part the API accepts: local images downscaled and inlined as a data URL."""
    if part["type"] == "image_url":
        image_url = dict(part["image_url"])
        image_url.setdefault("detail", detail)
        return {"type": "image_url", "image_url": image_url}
    if part["type"] == "image_path":
        path = part["path"]
        key = encoding_key(file_info(path), max_side, fmt)
        url = _encoded_url(key, max_side, lambda: file_info(path, want_bytes=True))  # a miss: hashed as read
    else:
        data = part_bytes(part)
        info = FileInfo(bytes_id(data), None, data)
        url = _encoded_url(encoding_key(info, max_side, fmt), max_side, lambda: info)
    return {"type": "image_url", "image_url": {"url": url, "detail": detail}}


# ------------------------------------------------------------------------- per-process image caches
@dataclass(frozen=True)
class FileInfo:
    """What a request needs of one image file: the hash of its bytes (the cache key's ``image_sha``) and its
    pixel size from the header (None when PIL cannot tell). ``data`` only on the read that filled the entry."""

    digest: str
    size: tuple[int, int] | None
    data: bytes | None = None


FILE_INFO_KEEP = 65536  # image files remembered per process (~480 bytes each: at most ~31 MB)
_FILE_INFO: "OrderedDict[tuple[int, ...], FileInfo]" = OrderedDict()
_FILE_INFO_LOCK = threading.Lock()


def _identity(info) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def _header_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def file_info(path: str, *, want_bytes: bool = False) -> FileInfo:
    """The ``FileInfo`` of the regular file at ``path``, read and hashed once per file identity (see the
    module doc). Raises as ``read_regular_file`` does: ``FileNotFoundError`` for a missing file,
    ``NotRegularFileError`` for a FIFO, device or folder (never opened). ``want_bytes`` reads the file (the
    entry is refreshed from what was read) and returns its bytes in ``data``."""
    from loaders.images.paths import open_regular_file, require_regular_file

    if not want_bytes:
        key = _identity(require_regular_file(path))
        with _FILE_INFO_LOCK:
            found = _FILE_INFO.get(key)
            if found is not None:
                _FILE_INFO.move_to_end(key)
                return found
    fd, opened = open_regular_file(path)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    key = _identity(opened)  # of the file as opened: a path swapped since the stat above is not mixed up
    info = FileInfo(bytes_id(data), _header_size(data))
    if len(data) == opened.st_size:  # a file that grew or shrank while being read is not remembered
        with _FILE_INFO_LOCK:
            _FILE_INFO[key] = info
            _FILE_INFO.move_to_end(key)
            while len(_FILE_INFO) > FILE_INFO_KEEP:
                _FILE_INFO.popitem(last=False)
    return FileInfo(info.digest, info.size, data) if want_bytes else info


ENCODED_MAX_BYTES = 256 * 1024 * 1024  # data URLs kept, in characters (encoding is the dearest part)
ENCODED_KEEP = 65536  # and at most this many of them
_ENCODED: "OrderedDict[tuple[str, int, str], str]" = OrderedDict()
_ENCODED_LOCK = threading.Lock()
_ENCODING: dict[tuple[str, int, str], threading.Event] = {}  # keys being encoded now: the others wait for them
_encoded_bytes = 0


AS_IS = 0  # the longest side of an encoding key whose image is sent at its own size (``encoding_key``)


def encoding_key(info: FileInfo, max_side: int, fmt: str) -> tuple[str, int, str]:
    """The key of an image's wire encoding: (content hash, longest side, format). An image that already fits
    ``max_side`` is neither reduced (JPEG ``draft``) nor resized (``thumbnail``), so its encoding is the same
    at every larger ``max_side``: it is keyed ``AS_IS``, and referees with different sides (GLM-4V's 1120,
    InternVL's 1344) share one encoding of it. ``size`` is the header's, before any EXIF rotation, which
    keeps the longest side; unknown, the side is kept in the key."""
    fits = info.size is not None and max(info.size) <= max_side
    return info.digest, AS_IS if fits else max_side, fmt


def cached_url(key: tuple[str, int, str]) -> str | None:
    """The data URL kept under ``encoding_key`` ``key``, or None. No I/O: safe on the event loop."""
    with _ENCODED_LOCK:
        url = _ENCODED.get(key)
        if url is not None:
            _ENCODED.move_to_end(key)
        return url


def _encoded_url(key: tuple[str, int, str], max_side: int, read: Callable[[], FileInfo]) -> str:
    """``_encode``'s data URL, reused for the next requests about the same image (decode + resize + JPEG
    encode is the client's main CPU cost per request), within ``ENCODED_MAX_BYTES``. ``read`` gives the
    image's bytes on a miss; its encoding is kept under the key of what was read (the file may have changed
    since ``key`` was taken).

    One thread encodes an image while the others that want the same key wait for it: a referee sends its
    questions about one image at once, and every referee sends it at the same time, so without this each of
    them read and encoded it (measured: a score stage of 1,820 images at two referee sides encoded 5,225 times;
    with this and ``encoding_key``'s sharing, 1,820)."""
    while True:
        url = cached_url(key)
        if url is not None:
            return url
        with _ENCODED_LOCK:
            running = _ENCODING.get(key)
            if running is None:
                mine = _ENCODING[key] = threading.Event()
                break
        running.wait()  # then look again: a URL too large to keep is encoded by each in turn
    try:
        store = _STORE
        url = _stored_url(store, key)  # the file need not even be read
        if url is not None:
            _keep(key, url)
            return url
        info = read()
        read_key = encoding_key(info, max_side, key[2])
        if read_key != key:  # the file changed since ``key`` was taken
            url = cached_url(read_key) or _stored_url(store, read_key)
        if url is None:
            encoded, _ = _encode_image(info.data, max_side, key[2])
            url = data_url(encoded, key[2])
            if store is not None:
                store.put(read_key, encoded)
        _keep(read_key, url)
        return url
    finally:
        with _ENCODED_LOCK:
            del _ENCODING[key]
        mine.set()


def _stored_url(store: "EncodedStore | None", key: tuple[str, int, str]) -> str | None:
    """The data URL of the encoding the disk tier holds under ``key``, or None (no store, or not there)."""
    encoded = store.get(key) if store is not None else None
    return data_url(encoded, key[2]) if encoded is not None else None


def _keep(key: tuple[str, int, str], url: str) -> None:
    global _encoded_bytes
    if len(url) > ENCODED_MAX_BYTES:
        return
    with _ENCODED_LOCK:
        if key not in _ENCODED:
            _ENCODED[key] = url
            _encoded_bytes += len(url)
        _ENCODED.move_to_end(key)
        while _encoded_bytes > ENCODED_MAX_BYTES or len(_ENCODED) > ENCODED_KEEP:
            _, dropped = _ENCODED.popitem(last=False)
            _encoded_bytes -= len(dropped)


_STORE: "EncodedStore | None" = None  # the disk tier (``llm.image_store_gb``), None when off
_STORE_LOCK = threading.Lock()


def use_encoded_store(folder: "os.PathLike[str] | str | None", max_gb: float = 0.0) -> None:
    """Keep wire encodings on disk under ``folder`` too, up to ``max_gb`` (``processors.llm.encoded_store``);
    ``None`` or 0 switches the disk tier off. Called by each stage's LLM client with the run's setting: a call
    with the folder and limit already in use changes nothing."""
    global _STORE
    from processors.llm.encoded_store import EncodedStore

    with _STORE_LOCK:
        current = _STORE
        max_bytes = int(max_gb * 1024**3) if folder is not None and max_gb > 0 else 0
        if current is not None and current.folder == Path(folder or "") and current.max_bytes == max_bytes:
            return
        _STORE = EncodedStore(Path(folder), max_bytes) if max_bytes else None
        if current is not None:
            current.close()


def encoded_store() -> "EncodedStore | None":
    return _STORE


def clear_caches() -> None:
    """Forget every remembered image (tests; a long-lived process that wants its memory back). The disk
    tier's files stay; the process stops using it until ``use_encoded_store`` is called again."""
    global _encoded_bytes
    use_encoded_store(None)
    with _FILE_INFO_LOCK:
        _FILE_INFO.clear()
    with _ENCODED_LOCK:
        _ENCODED.clear()
        _encoded_bytes = 0


def image_size(part: dict[str, Any]) -> tuple[int, int] | None:
    """Pixel size of a local image from its header (cheap), or None when unknown (remote URL, unreadable)."""
    if part["type"] == "image_url":
        return None
    if part["type"] == "image_path":
        try:
            return file_info(part["path"]).size
        except (OSError, ValueError):
            return None
    try:
        return _header_size(part_bytes(part))
    except (OSError, ValueError):
        return None
