"""The ``dvc plots show`` page in a real browser: a cheap page to render, and headless Chromium with no network.

The page is built from the committed results tracked by git (curves, sweeps, comparison) plus galleries drawn
by :mod:`pipeline.viz` from small synthetic arrays, in a throw-away DVC project holding this repository's
``dvc.yaml`` and ``.dvc/`` page template. Chromium runs with every host unresolvable and a dead proxy, and a
check script appended to a copy of the page reports, after the page settled, for every vega plot whether a
canvas or svg was drawn with coloured (curve) pixels, and for every image whether it loaded.
Used by tests/test_plots_page.py and docs/render_plots_page.py.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.viz import Picks, cam_gallery_row, label_gallery_row, pick_galleries

REPO = Path(__file__).resolve().parents[1]
DVC = Path(sys.executable).parent / "dvc"
NAMES = ["background", "disc", "square", "triangle"]
PALETTE = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
OFFLINE = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves: the network is off for this browser
    "--proxy-server=127.0.0.1:9",  # and anything that slips through goes to a closed port
]
CATCH = """<script>
var wsssErrors = [];
window.addEventListener("error", function (e) {
  wsssErrors.push(e.message ? e.message + " @" + e.lineno + ":" + e.colno : "failed: " + (e.target.src || e.target));
}, true);
window.addEventListener("unhandledrejection", function (e) { wsssErrors.push(String(e.reason)); });
</script>
"""
CHECK = """
<script>
(function () {
  function coloured(canvas) {  // pixels of a saturated colour: curves, not the grey axes and text
    var pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data, n = 0;
    for (var i = 0; i < pixels.length; i += 4) {
      var r = pixels[i], g = pixels[i + 1], b = pixels[i + 2];
      if (pixels[i + 3] > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 60) n++;
    }
    return n;
  }
  window.addEventListener("load", function () {
    setTimeout(function () {
      var plots = [], images = [];
      PLOT_IDS.forEach(function (id) {
        var div = document.getElementById(id);
        var canvas = div && div.querySelector("canvas"), svg = div && div.querySelector("svg");
        var ink = canvas ? coloured(canvas) : (svg ? svg.querySelectorAll("path,line,rect,circle").length : 0);
        plots.push({id: id, canvas: !!canvas, svg: !!svg, ink: ink});
      });
      document.querySelectorAll("img").forEach(function (img) {
        images.push({src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0,
                     width: img.naturalWidth, height: img.naturalHeight});
      });
      var out = document.createElement("pre");
      out.id = "wsss-check";
      out.textContent = JSON.stringify({plots: plots, images: images, errors: wsssErrors});
      document.body.appendChild(out);
    }, 3000);
  });
})();
</script>
"""


def chromium() -> str | None:
    """The Chromium binary (``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH), None if absent."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Chromium offline, headless, with a fresh profile, on ``args`` (e.g. ``--dump-dom URL``)."""
    with tempfile.TemporaryDirectory(prefix="wsss-chromium-") as profile:
        command = [chromium(), *OFFLINE, f"--user-data-dir={profile}", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def plot_ids(html: str) -> list[str]:
    """The ids of the page's plots that have data (DVC writes ``var spec = {};`` for one whose files hold no row)."""
    body = html.split("<body>", 1)[1]
    return [i for spec, i in re.findall(r"var spec = (.*?);\s*vegaEmbed\('#([^']+)'", body, re.S) if spec != "{}"]


def check_page(page: Path, budget_ms: int = 20000) -> dict:
    """Load a copy of ``page`` with the check script appended; return its report.

    Returns:
        ``{"plots": [{id, canvas, svg, ink}], "images": [{src, loaded, width, height}], "errors": [...]}``.
    """
    probe = page.with_name("check_" + page.name)
    text = page.read_text()
    ids = plot_ids(text)  # vega-embed empties these divs
    head, body = text.split("<head>", 1)
    body, end, tail = body.rpartition("</body>")  # the last one: vega-embed's code holds the string too
    check = CHECK.replace("PLOT_IDS", json.dumps(ids))
    probe.write_text(head + "<head>" + CATCH + body + check + end + tail)
    result = run_chromium([f"--virtual-time-budget={budget_ms}", "--dump-dom", probe.as_uri()])
    found = re.search(r'<pre id="wsss-check">(.*?)</pre>', result.stdout, re.S)
    if found is None:
        raise AssertionError(f"no report from the page (rc {result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, out: Path, size: tuple[int, int] = (1280, 1600), budget_ms: int = 20000) -> None:
    """Save a PNG of the top of ``page`` as Chromium draws it offline."""
    args = [f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}", "--hide-scrollbars"]
    result = run_chromium([*args, f"--screenshot={out.resolve()}", page.as_uri()])
    if not out.is_file():
        raise AssertionError(f"no screenshot (rc {result.returncode}):\n{result.stderr[-2000:]}")


def _synthetic_sample(rng: np.random.Generator, classes: list[int], size: int = 32):
    """A (size, size, 3) uint8 image with one square blob per class, its label map and per-class score maps."""
    image = rng.integers(60, 120, (size, size, 3), dtype=np.uint8)
    label = np.zeros((size, size), np.uint8)
    maps = np.zeros((1 + len(classes), size, size), np.float32)
    for channel, class_id in enumerate(classes, start=1):
        y, x = rng.integers(0, size // 2, 2)
        label[y : y + size // 2, x : x + size // 2] = class_id
        image[y : y + size // 2, x : x + size // 2] = PALETTE[class_id]
        maps[channel, y : y + size // 2, x : x + size // 2] = rng.uniform(0.3, 1.0)
    label[0, :] = 255  # an ignore band, as VOC's boundaries
    return image, label, maps


def write_galleries(results: Path, seed: int = 0) -> None:
    """Galleries of every stage, drawn from synthetic arrays, where the stages write them."""
    rng = np.random.default_rng(seed)
    samples = [_synthetic_sample(rng, classes) for classes in ([1], [2, 3], [1, 3], [2])]
    cams, labels = Picks(2), Picks(2)
    for index, (image, label, maps) in enumerate(samples):
        keys = np.array([0, *sorted(set(np.unique(label)) - {0, 255})])
        iou = float(rng.uniform())
        cams.add(iou, (f"img{index}", image, {"cam": maps, "rcam": maps}, keys, label))
        labels.add(iou, (f"img{index}", image, label))

    def cam_row(iou, item):
        image_id, image, maps, keys, label = item
        return cam_gallery_row(f"{image_id} IoU {iou:.2f}", image, maps, keys, label, NAMES, PALETTE)

    def label_row(iou, item):
        image_id, image, label = item
        stages = {"seeds": label, "pseudo label": label, "DeepLab": label, "ground truth": label}
        return label_gallery_row(f"{image_id} IoU {iou:.2f}", image, stages, PALETTE)

    pictures = {
        "cams": pick_galleries(cams, cam_row, "CAM and R-CAM per present class", NAMES, PALETTE),
        "refine": pick_galleries(labels, label_row, "seeds and pseudo labels", NAMES, PALETTE),
        "evaluate": pick_galleries(labels, label_row, "train images through the stages", NAMES, PALETTE, "ladder_"),
    }
    for stage, files in pictures.items():
        folder = results / stage / "plots" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for name, picture in files.items():
            Image.fromarray(picture).save(folder / name)


def build_project(root: Path, drop: tuple[str, ...] = ()) -> Path:
    """A DVC project in ``root`` with this repository's DAG, page template, committed results and galleries.

    Args:
        root: An empty directory.
        drop: Result files (repository paths) to leave out, e.g. the R-CAM sweep a V1 run does not write.

    Returns:
        ``root``.
    """
    subprocess.run([str(DVC), "init", "--no-scm", "-q"], cwd=root, check=True, capture_output=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copytree(REPO / ".dvc" / "html", root / ".dvc" / "html")
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True, check=True)
    for path in tracked.stdout.split():
        if path not in drop:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / path, root / path)
    write_galleries(root / "results")
    return root


def plots_show(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``dvc plots show [args]`` in ``root`` (by default it writes ``dvc_plots/index.html``)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    command = [str(DVC), "plots", "show", *args]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, env=env, check=False)
