"""report: the HTML parses, has one row per matrix and every plot, loads nothing external, escapes names."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from builders import KINDS, empty_analysis, make_analysis
from spectra.errors import SpectraError
from spectra.records import Analysis, RankOption, Recommendation, Skipped
from spectra.report.html import (
    render_comparison_html,
    render_html,
    verdict,
    write_comparison_report,
    write_report,
)

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
PLOTS = {"spectra", "energy", "heatmap", "depth", "captured"}
EVIL = 'model.layers.1.a<b>&"x".weight'


class Page(HTMLParser):
    """Collects tags and attributes, and checks that every non-void element is closed in order."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)
        self.close()
        assert not self.stack, f"unclosed tags: {self.stack}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]

    def with_class(self, tag: str, cls: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and cls in (a.get("class") or "").split()]


def recommendation() -> Recommendation:
    return Recommendation(
        target=0.9,
        max_rank=256,
        uniform_rank=16,
        uniform_captured=0.943,
        cap_binds=True,
        tradeoff=(RankOption(8, 0.541, 2000, 0.021), RankOption(16, 0.943, 4000, 0.042)),
        budget=5000,
        allocation={EVIL: 8},
        allocation_captured=0.95,
        allocation_params=4800,
        target_modules=("q_proj", "v_proj", "down_proj"),
        config={"r": 16, "lora_alpha": 32},
        reason="Uniform rank 16 reaches the target <everywhere>.",
        advice=("Set lora_alpha = 2r.", "LoRA+: η_B/η_A = 16."),
        caveat="Caveat: an upper bound <not> a prediction.",
    )


@pytest.fixture(scope="module")
def analysis() -> Analysis:
    skipped = (Skipped("model.norm.weight", "not-2d"), Skipped("<script>alert(1)</script>", "shape-mismatch", "a<b"))
    return make_analysis(names={(1, "v_proj"): EVIL}, skipped=skipped)


@pytest.fixture(scope="module")
def html(analysis: Analysis) -> str:
    return render_html(analysis)


def test_parses_with_one_row_per_matrix(analysis: Analysis, html: str) -> None:
    page = Page(html)
    assert len(page.with_class("tr", "matrix")) == len(analysis.layers) == 6
    assert len(page.with_class("tr", "noisy")) == 1
    assert len(page.with_class("tr", "skipped")) == 2
    text = "".join(page.text)
    for lm in analysis.layers:
        assert lm.name in text


def test_every_plot_is_an_inline_png(html: str) -> None:
    images = Page(html).find("img")
    assert {img["data-plot"] for img in images} == PLOTS and len(images) == len(PLOTS)
    for img in images:
        src = img["src"] or ""
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert img["alt"]


def test_no_external_resources(html: str) -> None:
    page = Page(html)
    for _, attrs in page.tags:
        for key in ("src", "href", "action", "srcset", "poster", "data"):
            value = attrs.get(key)
            assert value is None or value.startswith(("#", "data:")), f"{key}={value!r}"
    assert not re.search(r"https?://|//cdn|@import|url\(", html)
    assert len(page.find("script")) == 1 and page.find("script")[0] == {}  # inline, no src
    assert page.find("link") == []


def test_names_and_paths_are_escaped(analysis: Analysis, html: str) -> None:
    page = Page(html)
    assert "<b>" not in html and "<script>alert" not in html
    assert "a&lt;b&gt;&amp;" in html
    assert not page.find("b")  # the key did not open a tag
    assert len(page.find("script")) == 1
    text = "".join(page.text)
    assert EVIL in text and "<script>alert(1)</script>" in text and analysis.base and analysis.base in text


def test_header_shows_inputs_options_and_counts(analysis: Analysis, html: str) -> None:
    text = " ".join("".join(Page(html).text).split())
    for expected in (
        "runs/base & co/base.safetensors",
        "runs/tuned.safetensors",
        "safetensors, 7 tensors, 123 kB",
        "dtypes bf16",
        "2025-01-02T03:04:05Z",
        "spectra 0.1.0",
        "1.2 s",
        "6 matrices (18,432 parameters)",
        "2 tensors skipped",
        "exact",
        "cpu",
        "4, 8, 16",
        "90%",
    ):
        assert expected in text, expected
    assert "relative change is not reported for adapters" in text  # notes are shown


def test_verdict_numbers_match_planted_ranks(analysis: Analysis) -> None:
    ranks = sorted(lm.rank for lm in analysis.layers)  # planted: ceil(0.9 · (4 + 3j + 2i))
    assert ranks == [4, 6, 7, 9, 10, 11]
    lines = verdict(analysis)
    assert lines[0].startswith("Across 6 matrices") and "median 8 and maximum 11" in lines[0]
    assert "0.50–0.69× LoRA r=16" in lines[0]
    random = analysis.layers[0].random_rank  # one shape: one Marchenko–Pastur rank (28 for 64×48 at 0.9)
    assert f"needs {random}" in lines[1] and f"{np.median([r / random for r in ranks]):.0%}" in lines[1]
    assert f"at most {analysis.summary.overall.captured[4]:.0%}" in lines[2]
    assert "1 of 6 matrices" in lines[3]
    assert verdict(empty_analysis())[0].startswith("No matrix was analysed")


def test_verdict_comes_first_with_caveat_and_empty_recommendation_slot(html: str) -> None:
    text = " ".join("".join(Page(html).text).split())
    assert text.index("Verdict") < text.index("Inputs and options") < text.index("Singular value spectra")
    assert "no recommendation was made" in text
    assert "rank a task needs can be much lower" in text


def test_recommendation_slot(analysis: Analysis) -> None:
    page = Page(render_html(replace(analysis, recommendation=recommendation())))
    text = " ".join("".join(page.text).split())
    for expected in (
        "Uniform rank 16 reaches the target <everywhere>.",
        "r = 16, capturing 94.3%",
        "Cap binds",
        "q_proj, v_proj, down_proj",
        "4,000",
        "4.2%",
        "Advice not derived from the spectrum",
        "LoRA+: η_B/η_A = 16.",
        '"lora_alpha": 32',
    ):
        assert expected in text, expected
    assert text.index("Advice not derived from the spectrum") < text.index("Set lora_alpha = 2r.")


def test_tables_are_sortable_and_glossary_defines_every_column(html: str) -> None:
    page = Page(html)
    matrices = page.find("table", id="matrices")
    assert matrices and "sortable" in (matrices[0]["class"] or "")
    assert "addEventListener" in html and "sort" in html
    glossary = " ".join("".join(page.text).split())
    glossary = glossary[glossary.index("Definitions", glossary.index("Skipped tensors")) :]
    for term in (
        "rank@90%",
        "random rank",
        "rank / random",
        "GD rank",
        "stable rank",
        "effective rank",
        "σ₁",
        "‖ΔW‖F",
        "relative change",
        "noise",
        "E(r)",
        "LoRA parameters",
    ):
        assert term in glossary, term


def test_empty_analysis_renders() -> None:
    page = Page(render_html(empty_analysis()))
    assert not page.with_class("tr", "matrix") and len(page.find("img")) == len(PLOTS)


def test_write_report_is_atomic(analysis: Analysis, html: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("spectra.report.html.render_html", lambda a: html)
    out = write_report(analysis, tmp_path / "report.html")
    assert out == tmp_path / "report.html" and out.read_text(encoding="utf-8") == html
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    before = out.read_bytes()

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("spectra.io.files.os.fsync", boom)
    with pytest.raises(SpectraError, match="disk full"):
        write_report(analysis, out)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_report_creates_missing_folders(analysis: Analysis, tmp_path: Path) -> None:
    assert write_report(analysis, tmp_path / "new" / "report.html").is_file()


def test_write_report_unwritable_target(analysis: Analysis, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpectraError, match="cannot write"):
        write_report(analysis, tmp_path / "file" / "report.html")


def test_comparison_page(analysis: Analysis, tmp_path: Path) -> None:
    other = make_analysis(n_layers=3, kinds=("q_proj", "o_proj"), recommendation=recommendation())
    html = render_comparison_html([("full fine-tune", analysis), ("LoRA <r=8>", other)], "Full & LoRA", "intro <i>")
    page = Page(html)
    text = " ".join("".join(page.text).split())
    assert "LoRA <r=8>" in text and "<r=8>" not in html and "intro <i>" in text and "Full & LoRA" in text
    images = page.find("img")
    assert len(images) == 6 and len({img["data-plot"] for img in images}) == 6  # 3 plots × 2, unique anchors
    assert len({a["id"] for _, a in page.tags if a.get("id")}) == len([a for _, a in page.tags if a.get("id")])
    headline = text[text.index("Headline") : text.index("Captured energy at LoRA ranks")]
    for kind in (*KINDS, "o_proj"):
        assert kind in headline
    assert "Advice not derived from the spectrum" in text and "no recommendation was made" in text
    assert not re.search(r"https?://", html)
    out = write_comparison_report([("a", analysis)], tmp_path / "demo.html", "Demo")
    assert Page(out.read_text(encoding="utf-8")).find("img")


@pytest.mark.slow
def test_large_analysis_stays_small(tmp_path: Path) -> None:
    """32 layers × 7 kinds of 4096-long spectra: a few MB at most."""
    big = make_analysis(n_layers=32, kinds=("q", "k", "v", "o", "gate", "up", "down"), shape=(4096, 4096))
    html = render_html(big)
    assert len(html.encode()) < 3_000_000
    assert len(Page(html).with_class("tr", "matrix")) == 224


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SORT_BY_RANK = """<script>
var th = Array.from(document.querySelectorAll("#matrices th")).find(function (h) {
  return h.textContent.startsWith("rank@"); });
th.click(); th.click();
document.title = Array.from(document.querySelectorAll("#matrices tbody tr")).map(function (r) {
  return r.cells[th.cellIndex].textContent; }).join(",");
</script>"""


def chromium(page: Path, *args: str) -> str:
    """Run headless Chromium with networking off on `page`; returns stdout."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                *args,
                page.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
    return done.stdout


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_report(analysis: Analysis, tmp_path: Path) -> None:
    """Headless Chromium renders a non-blank page (PNG left in tmp_path to look at) and the header sort works."""
    html = render_html(replace(analysis, recommendation=recommendation()))
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    shot = tmp_path / "report.png"
    chromium(page, f"--screenshot={shot}", "--window-size=1400,4000")
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (4000, 1400)
    assert float(pixels[..., :3].std()) > 0.05  # text, tables and plots, not a blank page
    assert (pixels[:1000, :, :3].mean(axis=2) < 0.5).mean() > 0.005  # the verdict and header are drawn at the top

    sorting = tmp_path / "sorted.html"
    sorting.write_text(html.replace("</body>", SORT_BY_RANK + "</body>"), encoding="utf-8")
    title = re.search(r"<title>(.*?)</title>", chromium(sorting, "--dump-dom"), re.S)
    assert title is not None
    assert [int(x) for x in title.group(1).split(",")] == sorted((lm.rank for lm in analysis.layers), reverse=True)
