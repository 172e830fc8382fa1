"""Where the real datasets come from: archive URLs and pinned checksums (used by ``wsss download``).

Checksums: the VOC 2012 and COCO 2014 SHA-256 values and sizes are the ones TensorFlow Datasets pins for the same
files (``tensorflow_datasets/url_checksums/voc.txt`` and ``coco2014.txt``); the VOC file also matches the MD5
torchvision pins (``6cd6e144f989b92b3379bac3b3de84fd``). No publisher or widely used tool pins a checksum of
``SegmentationClassAug.zip`` (the SBD-derived masks distributed with DeepLab ports), so it has none here: the
download asks for one (``--sha256``) or records the hash of the first download (``--trust-unpinned``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.data.download import Archive, download_archives
from pipeline.errors import DownloadError

TFDS = "TensorFlow Datasets url_checksums"

VOC = (
    Archive(
        name="VOCtrainval_11-May-2012.tar",
        urls=(
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "http://pjreddie.com/media/files/VOCtrainval_11-May-2012.tar",
        ),
        sha256="e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb",
        size=1999639040,
        extract_to=".",
        checksum_source=f"{TFDS}/voc.txt",
    ),
    Archive(
        name="SegmentationClassAug.zip",
        urls=(
            "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
            "http://cs.jhu.edu/~cxliu/data/SegmentationClassAug.zip",
        ),
        sha256=None,
        extract_to="VOCdevkit/VOC2012",
        checksum_source="none published",
    ),
)

COCO = (
    Archive(
        name="annotations_trainval2014.zip",
        urls=("http://images.cocodataset.org/annotations/annotations_trainval2014.zip",),
        sha256="031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
        size=252872794,
        checksum_source=f"{TFDS}/coco2014.txt",
    ),
    Archive(
        name="val2014.zip",
        urls=("http://images.cocodataset.org/zips/val2014.zip",),
        sha256="fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
        size=6645013297,
        checksum_source=f"{TFDS}/coco2014.txt",
    ),
    Archive(
        name="train2014.zip",
        urls=("http://images.cocodataset.org/zips/train2014.zip",),
        sha256="ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
        size=13510573713,
        checksum_source=f"{TFDS}/coco2014.txt",
    ),
)

DATASETS: dict[str, tuple[Archive, ...]] = {"voc": VOC, "coco": COCO}


def parse_checksums(pairs: list[str]) -> dict[str, str]:
    """``["NAME=HEX", ...]`` -> ``{NAME: hex}``.

    Raises:
        DownloadError: If a pair is malformed or the value is not a 64-digit hex SHA-256.
    """
    checksums = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        value = value.strip().lower()
        if not name or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise DownloadError(f"--sha256 {pair!r}: expected ARCHIVE=<64 hex digits>")
        checksums[name.strip()] = value
    return checksums


def download_dataset(
    dataset: str,
    root: Path | str,
    sha256: list[str] | None = None,
    trust_unpinned: bool = False,
    keep_archives: bool = False,
) -> list[str]:
    """Download, verify and extract the archives of ``dataset`` into ``root`` (see :mod:`pipeline.data.download`).

    Args:
        dataset: ``voc`` or ``coco``.
        root: The dataset root (``data.root``).
        sha256: ``ARCHIVE=HEX`` checksums from the user (override or complete the pinned ones).
        trust_unpinned: Record the hash of archives that have no checksum instead of refusing them.
        keep_archives: Keep the archives after extraction.

    Returns:
        The names of the archives extracted by this call.

    Raises:
        DownloadError: For an unknown dataset, an unknown archive in ``sha256``, or a failed download.
    """
    if dataset not in DATASETS:
        raise DownloadError(f"data.dataset = {dataset!r}: nothing to download (downloadable: {', '.join(DATASETS)})")
    archives = DATASETS[dataset]
    checksums = parse_checksums(sha256 or [])
    unknown = set(checksums) - {a.name for a in archives}
    if unknown:
        names = ", ".join(a.name for a in archives)
        raise DownloadError(f"--sha256 for unknown archive {sorted(unknown)[0]!r} (archives of {dataset}: {names})")
    return download_archives(archives, root, checksums, trust_unpinned, keep_archives)
