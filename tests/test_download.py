"""Dataset download against a loopback HTTP server: checksum pass / mismatch, resume, unsafe archives."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import default_params_dict, write_params
from typer.testing import CliRunner

from pipeline.data.download import Archive, download_archives, fetch, safe_extract
from pipeline.data.sources import DATASETS, download_dataset, parse_checksums
from pipeline.errors import DownloadError
from stages.cli import app


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# 300 kB of incompressible-ish content, so a truncated response really is partial
PAYLOAD = {
    "VOCdevkit/VOC2012/JPEGImages/a.jpg": bytes(range(256)) * 1200,
    "VOCdevkit/VOC2012/readme.txt": b"hello",
}
TAR = tar_bytes(PAYLOAD)
ZIP = zip_bytes({"SegmentationClassAug/x.png": b"png", "__MACOSX/SegmentationClassAug/._x.png": b"junk"})


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files``; honours ``Range`` unless ``server.ranges`` is off; can cut a response short once."""

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and server.ranges:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in server.cut_once:
            server.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 3])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files = {"/voc.tar": TAR, "/aug.zip": ZIP}
    httpd.requests = []
    httpd.ranges = True
    httpd.cut_once = set()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def url(server: ThreadingHTTPServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def voc_archive(server, checksum: str | None = sha256(TAR), name: str = "voc.tar") -> Archive:
    return Archive(name=name, urls=(url(server, "/voc.tar"),), sha256=checksum, size=len(TAR))


def test_checksum_pass_extracts_and_cleans_up(server, tmp_path):
    root = tmp_path / "raw"
    assert download_archives((voc_archive(server),), root) == ["voc.tar"]
    for name, data in PAYLOAD.items():
        assert (root / name).read_bytes() == data
    assert not (root / "archives" / "voc.tar").exists(), "the archive is deleted after extraction by default"
    assert json.loads((root / "archives" / "voc.tar.extracted").read_text())["sha256"] == sha256(TAR)
    # a second run finds the marker and makes no request
    before = len(server.requests)
    assert download_archives((voc_archive(server),), root) == []
    assert len(server.requests) == before


def test_checksum_mismatch_extracts_nothing_and_keeps_the_file_aside(server, tmp_path):
    root = tmp_path / "raw"
    with pytest.raises(DownloadError) as info:
        download_archives((voc_archive(server, checksum="0" * 64),), root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checksum mismatch for voc.tar: expected sha256 {'0' * 64}, got {sha256(TAR)}")
    assert not (root / "VOCdevkit").exists(), "nothing extracted"
    assert (root / "archives" / "voc.tar.corrupt").read_bytes() == TAR
    assert not (root / "archives" / "voc.tar").exists()
    assert not (root / "archives" / "voc.tar.extracted").exists()


def test_interrupted_download_is_resumed_with_a_range_request(server, tmp_path):
    server.cut_once.add("/voc.tar")
    root = tmp_path / "raw"
    assert download_archives((voc_archive(server),), root) == ["voc.tar"]
    assert (root / "VOCdevkit/VOC2012/readme.txt").read_bytes() == b"hello"
    (first, first_range), (second, second_range) = server.requests
    assert first == second == "/voc.tar" and first_range is None
    assert second_range == f"bytes={len(TAR) // 3}-", "the second request asks only for the missing bytes"


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    store = tmp_path / "raw" / "archives"
    store.mkdir(parents=True)
    (store / "voc.tar.part").write_bytes(TAR[:1000])
    download_archives((voc_archive(server),), tmp_path / "raw")
    assert server.requests == [("/voc.tar", "bytes=1000-")]
    assert (tmp_path / "raw" / "VOCdevkit/VOC2012/readme.txt").is_file()


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.ranges = False
    dest = tmp_path / "voc.tar"
    dest.with_name("voc.tar.part").write_bytes(b"stale bytes that are not the file's start")
    fetch([url(server, "/voc.tar")], dest, size=len(TAR))
    assert dest.read_bytes() == TAR


def test_mirrors_are_tried_in_order(server, tmp_path):
    dest = tmp_path / "voc.tar"
    fetch([url(server, "/missing.tar"), url(server, "/voc.tar")], dest, size=len(TAR))
    assert dest.read_bytes() == TAR
    assert [path for path, _ in server.requests] == ["/missing.tar", "/voc.tar"], "a 404 mirror is not retried"


def test_unreachable_server_is_a_one_line_error(tmp_path):
    with pytest.raises(DownloadError, match=r"cannot download x\.tar") as info:
        fetch(["http://127.0.0.1:9/x.tar"], tmp_path / "x.tar", timeout=2, attempts=1)
    assert "\n" not in str(info.value)


def test_existing_archive_is_verified_without_downloading(server, tmp_path):
    store = tmp_path / "raw" / "archives"
    store.mkdir(parents=True)
    (store / "voc.tar").write_bytes(TAR)
    download_archives((voc_archive(server),), tmp_path / "raw", keep_archives=True)
    assert server.requests == []
    assert (store / "voc.tar").is_file() and (tmp_path / "raw/VOCdevkit/VOC2012/readme.txt").is_file()


def test_unpinned_archive_needs_a_checksum_or_trust(server, tmp_path):
    archive = Archive(name="aug.zip", urls=(url(server, "/aug.zip"),), sha256=None, extract_to="VOCdevkit/VOC2012")
    with pytest.raises(DownloadError, match=r"aug\.zip has no published checksum; pass --sha256 aug\.zip=<hex>"):
        download_archives((voc_archive(server), archive), tmp_path / "raw")
    assert server.requests == [], "refused before anything is downloaded"
    download_archives((archive,), tmp_path / "raw", trust_unpinned=True)
    recorded = json.loads((tmp_path / "raw" / "archives" / "checksums.json").read_text())
    assert recorded == {"aug.zip": sha256(ZIP)}
    assert (tmp_path / "raw/VOCdevkit/VOC2012/SegmentationClassAug/x.png").read_bytes() == b"png"
    assert not (tmp_path / "raw/VOCdevkit/VOC2012/__MACOSX").exists(), "macOS metadata is skipped"
    # later runs verify against the record, without the flag
    assert download_archives((archive,), tmp_path / "raw") == []


def test_user_checksum_is_used_for_an_unpinned_archive(server, tmp_path):
    archive = Archive(name="aug.zip", urls=(url(server, "/aug.zip"),), sha256=None)
    with pytest.raises(DownloadError, match="checksum mismatch"):
        download_archives((archive,), tmp_path / "raw", sha256={"aug.zip": "f" * 64})


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt"])
def test_zip_member_escaping_the_target_extracts_nothing(tmp_path, member):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(zip_bytes({"good.txt": b"ok", member: b"evil"}))
    with pytest.raises(DownloadError, match="outside the target folder"):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_tar_symlink_pointing_outside_extracts_nothing(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        tf.addfile(tarfile.TarInfo("ok.txt"), io.BytesIO(b""))
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        tf.addfile(link)
    archive = tmp_path / "bad.tar"
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(DownloadError, match="outside the target folder"):
        safe_extract(archive, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_not_an_archive(tmp_path):
    path = tmp_path / "x.tar"
    path.write_bytes(b"plain text")
    with pytest.raises(DownloadError, match="cannot extract"):
        safe_extract(path, tmp_path / "out")


def test_registry_pins_every_archive_but_the_sbd_masks():
    for dataset, archives in DATASETS.items():
        for archive in archives:
            if archive.name == "SegmentationClassAug.zip":
                assert archive.sha256 is None
                continue
            assert len(archive.sha256) == 64 and archive.size > 0, (dataset, archive.name)
            assert archive.checksum_source


def test_checksum_arguments(tmp_path):
    assert parse_checksums(["a.zip=" + "AB" * 32]) == {"a.zip": "ab" * 32}
    with pytest.raises(DownloadError, match="expected ARCHIVE=<64 hex digits>"):
        parse_checksums(["a.zip=123"])
    with pytest.raises(DownloadError, match="unknown archive 'x.zip'"):
        download_dataset("voc", tmp_path, sha256=["x.zip=" + "0" * 64])


def test_cli_download_of_the_synthetic_dataset_exits_2(tmp_path):
    params = write_params(tmp_path / "params.yaml", default_params_dict(data={"dataset": "synthetic"}))
    result = CliRunner().invoke(app, ["download", "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "error: data.dataset = 'synthetic': nothing to download (downloadable: voc, coco)"


def test_cli_download_without_trust_refuses_the_unpinned_sbd_masks(tmp_path):
    params = write_params(
        tmp_path / "params.yaml", default_params_dict(data={"dataset": "voc", "root": str(tmp_path / "raw")})
    )
    result = CliRunner().invoke(app, ["download", "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert "SegmentationClassAug.zip has no published checksum" in result.stderr
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").rglob("*.part"))
