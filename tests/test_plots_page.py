"""``dvc plots show``: no error for a V1 run, and a page that draws every curve and image with no network.

The browser tests need Chromium (Debian: ``apt-get install chromium``); without it they skip, unless
``WSSS_REQUIRE_BROWSER=1`` (set by ``.ci/run``) makes a missing browser a failure.
"""

from __future__ import annotations

import os
import re

import pytest
from browser import build_project, check_page, chromium, plot_ids, plots_show, screenshot
from conftest import REPO
from dvc_render.html import PAGE_HTML
from PIL import Image

pytestmark = pytest.mark.slow
RCAM_SWEEP = "results/cams/plots/custom/sweep_rcam.json"
GALLERIES = 6  # cams, refine: gallery + failures; evaluate: ladder_gallery + ladder_failures


def _need_browser() -> None:
    if chromium() is None:
        if os.environ.get("WSSS_REQUIRE_BROWSER") == "1":
            pytest.fail("WSSS_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium); CI sets WSSS_REQUIRE_BROWSER=1")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = build_project(tmp_path_factory.mktemp("plots"))
    shown = plots_show(root)
    assert shown.returncode == 0 and not shown.stderr.strip(), shown.stderr
    return root / "dvc_plots" / "index.html"


def test_the_page_loads_nothing_from_the_network(page):
    html = page.read_text()
    assert not re.search(r"""<script[^>]+src=["']?(https?:)?//""", html), "a script from a CDN"
    assert "vegaEmbed(" in html and "vega-embed 6.18.2" in html, "the libraries are inlined"
    assert 'href="../results/compare/"' in html, "the comparison across seeds, beside the page"
    licences = sorted(p.name for p in (REPO / ".dvc/html/LICENSES").iterdir())
    assert licences == ["vega-embed.txt", "vega-lite.txt", "vega.txt"]


def test_a_v1_run_shows_its_plots_without_error(tmp_path):
    root = build_project(tmp_path, drop=(RCAM_SWEEP,))  # V1 writes no R-CAM sweep
    shown = plots_show(root)
    assert shown.returncode == 0 and not shown.stderr.strip(), shown.stderr
    html = (root / "dvc_plots/index.html").read_text()
    assert "sweep_cam_json" in html and "sweep_rcam_json" not in html


def test_a_run_that_trained_no_affinity_net_shows_its_plots_without_error(tmp_path):
    from pipeline.train_aff import skip_affinity_net

    (tmp_path / "project").mkdir()
    root = build_project(tmp_path / "project")
    skip_affinity_net("crf", tmp_path / "aff", root / "results/train_aff", tmp_path / "aff.pt")  # refine.method crf
    shown = plots_show(root)
    assert shown.returncode == 0 and not shown.stderr.strip(), shown.stderr
    html = (root / "dvc_plots/index.html").read_text()
    assert "Classification loss" in html and "Affinity loss" not in html, "no step, no curve"


def test_every_curve_and_image_draws_offline(page, tmp_path):
    _need_browser()
    report = check_page(page)
    assert report["errors"] == []
    vega_plots = len(plot_ids(page.read_text()))
    assert len(report["plots"]) == vega_plots >= 16  # the default run trains no AffinityNet: no affinity curves
    for plot in report["plots"]:
        assert plot["canvas"] and plot["ink"] > 100, plot  # curves are coloured pixels, axes and text grey
    assert len(report["images"]) == GALLERIES
    for image in report["images"]:
        assert image["loaded"] and image["width"] > 500, image
    shot = tmp_path / "page.png"
    screenshot(page, shot, size=(800, 600))
    assert Image.open(shot).size == (800, 600)


def test_the_browser_really_is_offline(page, tmp_path):
    # control: DVC's own page loads the libraries from a CDN; with this browser's network off, nothing draws
    _need_browser()
    template = tmp_path / "dvc_default.html"
    template.write_text(PAGE_HTML)
    shown = plots_show(page.parents[1], "-o", str(tmp_path / "cdn"), "--html-template", str(template))
    assert shown.returncode == 0, shown.stderr
    html = tmp_path / "cdn" / "index.html"
    assert "https://cdn.jsdelivr.net/npm/vega@5.20.2" in html.read_text()
    report = check_page(html, budget_ms=5000)
    assert report["plots"] and not any(plot["canvas"] for plot in report["plots"])
    assert len(report["images"]) == GALLERIES and all(image["loaded"] for image in report["images"])
