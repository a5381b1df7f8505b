"""The documentation site: it builds with warnings as errors (its tutorial executed), the API
reference covers the facade, every internal link and figure resolves, and the pages render in
headless Chromium (Debian's package, installed by ``make install``; skipped where absent)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import histoprism as hp

pytestmark = pytest.mark.docs  # make docs-test (CI), not make test: the tutorials take minutes

ROOT = Path(__file__).resolve().parents[1]
# page -> figures it draws at least
TUTORIALS = {
    "tutorials/quickstart": 4,
    "tutorials/own-data": 1,
    "tutorials/unsequenced": 1,
    "tutorials/visium-hd": 1,
    "tutorials/compare": 3,
    "tutorials/trust": 3,
}
NAMESPACES = {"pl", "io", "models"}  # modules in the facade, not functions


class _Links(HTMLParser):
    """href/src of a page, and the ids it defines."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(a[key])
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])


def _parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("myst_nb")
    out = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    result = subprocess.run(
        [*cmd, str(ROOT / "docs"), str(out)], capture_output=True, text=True, timeout=900
    )
    errors = "\n".join(ln for ln in result.stderr.splitlines() if "IPKernelApp" not in ln)
    assert result.returncode == 0, errors[-4000:]
    return out


def test_api_reference_covers_every_name_of_the_facade(site):
    ids = _parse(site / "api.html").ids
    names = [n for n in hp.__all__ if n != "__version__" and n not in NAMESPACES]
    missing = [n for n in names if f"histoprism.{n}" not in ids]
    assert not missing, f"api.html documents no {missing}"
    figures = [n for n in hp.pl.__all__ if not n.startswith("_")]
    assert all(f"histoprism.plotting.figures.{n}" in ids for n in figures)


def test_every_internal_link_and_figure_resolves(site):
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.parts)
    assert len(pages) > 15
    parsed = {p: _parse(p) for p in pages}
    bad = []
    for page, links in parsed.items():
        for link in links.links:
            url = urlsplit(link)
            if url.scheme or link.startswith(("//", "mailto:", "javascript:")):
                continue
            target = (page.parent / unquote(url.path)).resolve() if url.path else page
            if not target.exists():
                bad.append(f"{page.relative_to(site)}: {link}")
            elif url.fragment and target.suffix == ".html" and target in parsed:
                if url.fragment not in parsed[target].ids:
                    bad.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.parametrize("tutorial", TUTORIALS)
def test_tutorials_ran_and_show_figures(site, tutorial):
    page = site / f"{tutorial}.html"
    text = page.read_text(encoding="utf-8")
    assert "Traceback" not in text and "Error" not in re.sub(r"<[^>]+>", "", text).split("\n")[0]
    images = [page.parent / unquote(src) for src in _parse(page).images]
    pngs = [p for p in images if p.suffix == ".png"]
    assert len(pngs) >= TUTORIALS[tutorial], f"{tutorial}: {len(pngs)} figures"
    assert all(p.stat().st_size > 5_000 for p in pngs)  # drawn figures, not empty canvases


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


WRAPPER = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="frame" src="{src}" width="1200" height="900"></iframe>
<script>
const frame = document.getElementById("frame");
frame.onload = () => {{
  const d = frame.contentDocument;
  const imgs = Array.from(d.images);
  document.getElementById("result").textContent = JSON.stringify({{
    title: d.title,
    h1: (d.querySelector("h1") || {{textContent: ""}}).textContent,
    nav: d.querySelectorAll("nav a").length,
    search: !!d.querySelector("form[action*='search'], .search-button, #search-input"),
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
  }});
}};
</script></body></html>"""


@pytest.mark.parametrize("page", ["index", *TUTORIALS])
def test_pages_render_in_a_browser(site, page, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium (make install puts Debian's package where apt-get can)")
    wrapper = tmp_path / "wrapper.html"
    wrapper.write_text(WRAPPER.format(src=(site / f"{page}.html").as_uri()))
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
        "--virtual-time-budget=20000", "--dump-dom", wrapper.as_uri(),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="result">(.*?)</pre>', result.stdout, re.S)
    assert match and match.group(1) != "pending", result.stderr[-2000:]
    seen = json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert seen["h1"].strip() and "histoprism" in seen["title"]
    assert seen["nav"] >= 10 and seen["search"], seen
    assert seen["broken"] == [], seen["broken"]
    if page in TUTORIALS:
        assert seen["images"] >= TUTORIALS[page]
