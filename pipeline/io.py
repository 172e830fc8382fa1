"""Artifact formats shared by the stages: atomic writes, label PNGs, JSON, and the sharded CAM store.

No artifact uses pickle: CAMs are plain arrays in ``.npz`` shards loaded with ``allow_pickle=False``,
labels are palette PNGs, metadata is JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.errors import DatasetError, one_line
from pipeline.outputs import commit_point, fsync_path, remove_leftovers, replaced_dir, sibling


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; ``fsync`` it and rename it onto ``path`` only if the block succeeds.

    The temporary is named after ``path`` and this process (``.<name>.tmp-<pid>-*``), so that the next writer of
    ``path`` can remove it if this process is killed (:func:`~pipeline.outputs.remove_leftovers`).

    Args:
        path: The final destination.

    Yields:
        A temporary file path in the same directory (same file system, so the rename is atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling(path, "tmp", path.suffix)
    try:
        yield tmp
        fsync_path(tmp)
        commit_point(path)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path | str, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (removing temporaries that killed writers left)."""
    remove_leftovers(Path(path))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path | str) -> Any:
    """Read a JSON file.

    Raises:
        ValueError: If it is not UTF-8 JSON (a ``json.JSONDecodeError`` or ``UnicodeDecodeError``).
    """
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_label_png(path: Path | str, label: np.ndarray, palette: list[list[int]] | list[tuple]) -> None:
    """Save a (H, W) uint8 label map as a palette PNG, atomically.

    Args:
        path: Destination ``.png``.
        label: Class ids; 255 = ignore.
        palette: RGB colours indexed by class id (up to 256 entries).
    """
    image = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    flat = [channel for color in palette for channel in color]
    image.putpalette(flat + [0] * (768 - len(flat)))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def load_label_png(path: Path | str) -> np.ndarray:
    """Load a label PNG as a (H, W) uint8 array of class ids (palette indices, not colours)."""
    with Image.open(path) as image:
        if image.mode not in ("P", "L"):
            raise ValueError(f"{path}: label PNG must be palette or greyscale, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8).copy()


def labels_fingerprint(label_dir: Path, ids: list[str]) -> str:
    """A short hash of the label PNGs ``<label_dir>/<id>.png`` of ``ids`` (a checkpoint on others is not resumed)."""
    digest = hashlib.sha256()
    for image_id in ids:
        path = label_dir / f"{image_id}.png"
        digest.update(image_id.encode())
        digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()[:16]


def sha256_of(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_image_png(path: Path | str, image: np.ndarray) -> None:
    """Save a (H, W, 3) uint8 RGB image as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


CAM_FORMAT = "wsss-cams/3"
"""float16 maps, or 8-bit ones with a per-channel range, optionally at a lower resolution with the image's size;
deflate level 1 (``wsss-cams/2``: always at the image's size; ``wsss-cams/1``: float16, deflate level 6)."""
RANGE = ".range"
"""Suffix of the (K, 2) float32 ``[low, high]`` array stored beside each quantised (K, H, W) uint8 map."""
SIZE = "size"
"""Name of the (2,) int32 ``(H, W)`` array of an image whose maps are stored at a lower resolution."""
LEVELS = 255


def quantize_maps(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit maps, each channel scaled between its own minimum and maximum: (K, H, W) -> uint8, (K, 2) float32.

    The round trip through :func:`dequantize_maps` is off by at most ``(high - low) / 510`` per channel; a
    constant channel comes back exactly.
    """
    x = np.asarray(maps, dtype=np.float32)
    low, high = x.min(axis=(1, 2)), x.max(axis=(1, 2))  # (K,), (K,)
    step = np.where(high > low, (high - low) / LEVELS, 1.0).astype(np.float32)  # (K,)
    codes = np.rint((x - low[:, None, None]) / step[:, None, None])  # (K, H, W) in [0, 255]
    return codes.astype(np.uint8), np.stack([low, high], axis=1).astype(np.float32)


def dequantize_maps(codes: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The float32 (K, H, W) maps of :func:`quantize_maps`' uint8 codes and (K, 2) ``[low, high]`` bounds."""
    low, high = bounds[:, 0].astype(np.float32), bounds[:, 1].astype(np.float32)  # (K,), (K,)
    step = (high - low) / LEVELS  # (K,)
    return low[:, None, None] + codes.astype(np.float32) * step[:, None, None]  # (K, H, W)


def shrink_maps(maps: np.ndarray, stride: int) -> np.ndarray:
    """Average-pool (K, H, W) maps to (K, ceil(H / stride), ceil(W / stride)) float32 (``stride`` 1: unchanged)."""
    if stride == 1:
        return maps
    h, w = maps.shape[1:]
    size = (-(-h // stride), -(-w // stride))
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(np.asarray(maps, dtype=np.float32))[None], size)  # (1, K, h', w')
    return pooled[0].numpy()


def grow_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (K, h, w) -> (K, H, W) float32 maps at ``size = (H, W)`` (the size :func:`shrink_maps` was given)."""
    grown = F.interpolate(torch.from_numpy(np.asarray(maps, dtype=np.float32))[None], size=size, mode="bilinear")
    return grown[0].numpy()  # (K, H, W)


class CamWriter:
    """Write per-image CAM arrays into ``.npz`` shards plus ``index.json``, replacing ``directory`` whole.

    Each image stores ``keys`` (class ids of the channels, background = 0 first) and one or more maps of shape
    (len(keys), H, W), e.g. ``cam`` and ``rcam``: float16, or with ``quantize`` 8-bit codes with each channel's
    range (:func:`quantize_maps`; ``benchmarks/cam_store.py`` measured a third of the bytes, faster writes,
    seed mIoU within 1e-3). With ``stride`` > 1 the maps are stored average-pooled to 1/stride of the image's
    side (1/stride² of the bytes) with the image's size, and :class:`CamStore` reads them back bilinearly at it.
    Shards are deflated at level 1 (as small as numpy's level 6 here, twice as fast),
    in a background thread (zlib releases the GIL), one shard at a time while the next one fills: the caller
    (``cams``' main loop) does not wait for compression, and at most two shards are held in memory. A failed
    write is raised by the next flush or at the end.

    A context manager: the shards go into a staging directory (:func:`~pipeline.outputs.replaced_dir`) that
    replaces ``directory`` when the block ends without an exception; otherwise ``directory`` keeps its old content.
    """

    def __init__(self, directory: Path | str, shard_size: int, quantize: bool = False, stride: int = 1) -> None:
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.quantize = quantize
        self.stride = stride
        self._pending: dict[str, np.ndarray] = {}
        self._pending_ids: list[str] = []
        self._index: dict[str, str] = {}
        self._shards = 0
        self._stack = contextlib.ExitStack()
        self._staging = self.directory
        self._writer: ThreadPoolExecutor | None = None
        self._in_flight: Future | None = None

    def __enter__(self) -> CamWriter:
        self._staging = self._stack.enter_context(replaced_dir(self.directory))
        self._writer = self._stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="cam-shards"))
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, trace: Any) -> None:
        if kind is None:
            try:
                self._flush()
                self._wait()
                write_json(self._staging / "index.json", {"format": CAM_FORMAT, "images": self._index})
            except BaseException as exc:  # a failed write: the staging directory goes, the old store stays
                self._stack.__exit__(type(exc), exc, exc.__traceback__)
                raise
        self._stack.__exit__(kind, value, trace)  # the writer thread finishes before the staging directory goes

    def add(self, image_id: str, keys: np.ndarray, maps: dict[str, np.ndarray]) -> None:
        """Queue one image's arrays; a shard is flushed every ``shard_size`` images."""
        if "/" in image_id or image_id in self._index or image_id in self._pending_ids:
            raise ValueError(f"invalid or duplicate image id {image_id!r}")
        self._pending[f"{image_id}/keys"] = np.asarray(keys, dtype=np.int16)
        if self.stride > 1 and maps:
            self._pending[f"{image_id}/{SIZE}"] = np.array(next(iter(maps.values())).shape[1:], dtype=np.int32)
        for name, array in maps.items():
            array = shrink_maps(array, self.stride)
            if self.quantize:
                self._pending[f"{image_id}/{name}"], self._pending[f"{image_id}/{name}{RANGE}"] = quantize_maps(array)
            else:
                self._pending[f"{image_id}/{name}"] = np.asarray(array, dtype=np.float16)
        self._pending_ids.append(image_id)
        if len(self._pending_ids) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        """Hand the pending images to the writer thread as the next shard (after the shard in flight is written)."""
        if not self._pending_ids:
            return
        name = f"shard-{self._shards:05d}.npz"
        arrays, ids = self._pending, self._pending_ids
        self._pending, self._pending_ids = {}, []
        self._wait()
        if self._writer is None:
            raise RuntimeError("CamWriter writes inside its `with` block only")
        self._in_flight = self._writer.submit(_write_shard, self._staging / name, arrays)
        self._index.update(dict.fromkeys(ids, name))
        self._shards += 1

    def _wait(self) -> None:
        """Wait for the shard in flight; its write error is raised here."""
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()


def _write_shard(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        write_npz(tmp, arrays, compresslevel=1)


def write_npz(path: Path | str, arrays: dict[str, np.ndarray], compresslevel: int) -> None:
    """``np.savez_compressed`` with a chosen deflate level (numpy's is zlib's default, 6): ``np.load`` reads it."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


class CamStore:
    """Read-only access to a directory written by :class:`CamWriter`.

    A store that is missing, not written by :class:`CamWriter`, or damaged (a truncated or garbage shard, an
    ``index.json`` that names a missing shard) raises :class:`DatasetError` naming the file and the stage to re-run.
    """

    AGAIN = "run the 'cams' stage again: `wsss cams` or `dvc repro cams`"

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found (run the 'cams' stage first)")
        try:
            index = read_json(index_path)
        except ValueError as exc:  # JSON syntax or encoding
            raise DatasetError(f"cannot read the CAM index {index_path}: {exc} ({self.AGAIN})") from None
        images = index.get("images") if isinstance(index, dict) else None
        if not isinstance(images, dict) or not all(isinstance(v, str) and "/" not in v for v in images.values()):
            raise DatasetError(
                f"{index_path} is not a CAM index (no 'images' mapping of image ids to shard names; {self.AGAIN})"
            )
        self._index: dict[str, str] = images
        self._open: tuple[str, Any] | None = None

    @property
    def ids(self) -> list[str]:
        """Image ids in the order they were written."""
        return list(self._index)

    def load(self, image_id: str) -> dict[str, np.ndarray]:
        """Return ``{"keys": ..., <map name>: ...}`` for one image, maps at the image's size.

        float16 maps come as stored; 8-bit or lower-resolution ones as float32.

        Raises:
            DatasetError: If the image is not in the store, or its shard is missing or damaged.
        """
        if image_id not in self._index:
            raise DatasetError(f"image {image_id!r} is not in {self.directory / 'index.json'} ({self.AGAIN})")
        shard = self.directory / self._index[image_id]
        prefix = f"{image_id}/"
        try:
            if self._open is None or self._open[0] != shard.name:
                self._open = (shard.name, np.load(shard, allow_pickle=False))
            archive = self._open[1]
            maps = {name[len(prefix) :]: archive[name] for name in archive.files if name.startswith(prefix)}
        except FileNotFoundError:
            raise DatasetError(f"CAM shard {shard} is missing, but index.json lists it ({self.AGAIN})") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            self._open = None
            reason = "not a CAM shard" if "pickled" in str(exc) else one_line(exc)
            raise DatasetError(
                f"cannot read CAM shard {shard}: {reason} (truncated or corrupt; {self.AGAIN})"
            ) from None
        if "keys" not in maps:
            raise DatasetError(f"CAM shard {shard} holds no arrays of image {image_id!r} ({self.AGAIN})")
        for name in [n for n in maps if n + RANGE in maps]:
            maps[name] = dequantize_maps(maps[name], maps.pop(name + RANGE))
        if SIZE in maps:
            size = tuple(int(v) for v in maps.pop(SIZE))
            maps |= {name: grow_maps(array, size) for name, array in maps.items() if name != "keys"}
        return maps
