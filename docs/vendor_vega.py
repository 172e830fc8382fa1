"""Write .dvc/html/page.html: DVC's plots page with vega, vega-lite and vega-embed inlined, so it draws offline.

``dvc plots show`` fills an HTML template; DVC's own loads the three libraries from a CDN (its ``{scripts}``
placeholder), so an offline machine shows no curve. ``.dvc/config`` points ``plots.html_template`` at the page
written here, which inlines the libraries (the versions dvc-render's page asks the CDN for) and leaves
``{scripts}`` out. Their licences (BSD-3-Clause) go to .dvc/html/LICENSES/.

Usage: python docs/vendor_vega.py [--from DIR]  (DIR: the three npm tarballs already downloaded, e.g. by
``npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2``; default: fetch them from registry.npmjs.org).
Each tarball is checked against the registry's sha512 integrity below.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "html"
# name, version, file in the tarball, npm's dist.integrity
PACKAGES = [
    ("vega", "5.20.2", "package/build/vega.min.js",
     "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    ("vega-lite", "5.2.0", "package/build/vega-lite.min.js",
     "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    ("vega-embed", "6.18.2", "package/build/vega-embed.min.js",
     "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
]  # fmt: skip

HEAD = """<!DOCTYPE html>
<html>
<head>
{refresh_tag}
<meta charset="utf-8">
<title>WSSS pipeline: curves and galleries</title>
<!-- Written by docs/vendor_vega.py. Inlined below: {versions} (BSD-3-Clause, University of Washington
     Interactive Data Lab; licences in .dvc/html/LICENSES/). -->
"""

TAIL = """<script>
/* DVC writes `var spec = {}` for a plot whose files hold no row (train_aff's curves when refine.method does not
   read the AffinityNet): its box is left out instead of failing in vega-embed */
var wsssVegaEmbed = vegaEmbed;
vegaEmbed = function (target, spec, options) {
  if (spec && Object.keys(spec).length) return wsssVegaEmbed(target, spec, options);
  var box = document.querySelector(target);
  if (box) box.remove();
  return Promise.resolve(null);
};
</script>
<style>
body { font-family: sans-serif; margin: 16px; }
table { border-spacing: 15px; }
img { max-width: 100%; image-rendering: pixelated; }
</style>
</head>
<body>
<h1>WSSS pipeline: curves and galleries</h1>
<p>Curves first, then per stage a gallery of the first images and one of the lowest-IoU images (failure cases).
The comparison across seeds (<code>wsss compare</code>) is in <code>results/compare/</code> beside this page
(<a href="../results/compare/">results/compare/</a>: table <code>.md</code>, plot <code>.png</code>).</p>
{plot_divs}
</body>
</html>
"""


def tarball(name: str, version: str, integrity: str, source: Path | None) -> bytes:
    """The package's npm tarball, from ``source`` or the registry, checked against its sha512 integrity."""
    filename = f"{name}-{version}.tgz"
    if source is not None:
        data = (source / filename).read_bytes()
    else:
        with urllib.request.urlopen(f"https://registry.npmjs.org/{name}/-/{filename}", timeout=60) as response:
            data = response.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != integrity:
        raise SystemExit(f"{filename}: integrity {digest} differs from the registry's {integrity}")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, default=None, help="directory of the npm tarballs")
    args = parser.parse_args()
    scripts, versions = [], []
    (OUT / "LICENSES").mkdir(parents=True, exist_ok=True)
    for name, version, member, integrity in PACKAGES:
        with tarfile.open(fileobj=io.BytesIO(tarball(name, version, integrity, args.source))) as tar:
            code = tar.extractfile(member).read().decode()
            licence = tar.extractfile("package/LICENSE").read().decode()
        if "</script" in code or "{plot_divs}" in code or "{scripts}" in code:
            raise SystemExit(f"{name}: the code holds a string that breaks the inlined page")
        (OUT / "LICENSES" / f"{name}.txt").write_text(f"{name} {version}\n\n{licence}")
        scripts.append(f"<script>/* {name} {version} */\n{code.strip()}\n</script>\n")
        versions.append(f"{name} {version}")
    page = HEAD.replace("{versions}", ", ".join(versions)) + "".join(scripts) + TAIL
    (OUT / "page.html").write_text(page)
    print(f"wrote {OUT / 'page.html'} ({len(page) // 1024} KiB)")


if __name__ == "__main__":
    main()
