"""report: the HTML parses, has one row per matrix and every plot, loads nothing external, escapes names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from builders import KINDS, adapter_analysis, empty_analysis, make_analysis
from spectra.errors import SpectraError
from spectra.names import CAVEAT
from spectra.records import Analysis, ModelConfig, RankOption, Recommendation, Skipped
from spectra.report.html import (
    _pct,
    model_name,
    render_comparison_html,
    render_html,
    report_title,
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


@pytest.fixture(scope="module")
def html_with_rec(analysis: Analysis) -> str:
    return render_html(replace(analysis, recommendation=recommendation()))


def test_parses_with_one_row_per_matrix(analysis: Analysis, html: str) -> None:
    page = Page(html)
    assert len(page.with_class("tr", "matrix")) == len(analysis.layers) == 6
    assert len(page.with_class("tr", "noisy")) == 1
    assert len(page.with_class("tr", "skipped")) == 2
    text = "".join(page.text)
    for lm in analysis.layers:
        assert lm.name in text


def test_every_plot_is_inline_svg_with_hover_titles(analysis: Analysis, html: str) -> None:
    page = Page(html)
    figures = page.find("figure")
    assert {f["data-plot"] for f in figures} == PLOTS and len(figures) == len(PLOTS)
    assert not page.find("img")
    svgs = page.find("svg")
    assert len(svgs) == len(KINDS) + 4 + 1  # a spectrum panel per kind, two heatmaps, energy, captured, depth
    assert all(s.get("viewbox") and s.get("role") == "img" and s.get("aria-label") for s in svgs)
    titles = re.findall(r"<title>([^<]*)</title>", html)
    for lm in analysis.layers:  # each matrix's spectrum line, heatmap cell and depth point say what they are
        name = escape(lm.name)
        assert any(t.startswith(f"{name}: rank@90% {lm.rank}") for t in titles), lm.name
        assert f"layer {lm.layer}, {escape(lm.kind)}: rank@90% {lm.rank}" in titles
    ids = [a["id"] for _, a in page.tags if a.get("id")]
    assert len(ids) == len(set(ids))  # several SVGs in one page: every id unique


def test_no_external_resources(html: str) -> None:
    page = Page(html)
    for _, attrs in page.tags:
        for key in ("src", "href", "action", "srcset", "poster", "data"):
            value = attrs.get(key)
            assert value is None or value.startswith(("#", "data:")), f"{key}={value!r}"
    assert not re.search(r"https?://|//cdn|@import|url\((?!#)", html)  # url(#clip) inside an SVG is local
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
    assert len(lines) <= 3 and all(len(line) < 200 for line in lines)
    random = analysis.layers[0].random_rank  # one shape: one Marchenko–Pastur rank (28 for 64×48 at 0.9)
    assert "median matrix needs 8 directions for 90% of its energy (max 11)" in lines[0]
    assert f"{np.median([r / random for r in ranks]):.0%} of what a random matrix" in lines[0]
    assert lines[1] == "down_proj needs the most rank (median 10.5), q_proj the least (5)."
    assert lines[2].startswith("1 of 6 matrices are at the storage rounding-noise floor")
    assert verdict(empty_analysis())[0].startswith("No matrix was analysed")


def test_headline_numbers_come_first(analysis: Analysis, html_with_rec: str) -> None:
    rec = recommendation()
    page = Page(html_with_rec)
    text = " ".join(" ".join(page.text).split())
    o = analysis.summary.overall
    for expected in (
        "recommended LoRA r = 16 captures 94.3% with 4.2% of the targeted weights' parameters",
        f"median rank@90% {o.median_rank:g} max {o.max_rank} over 6 matrices",
        f"E(r = 16) {_pct(o.captured[16])}",  # rounded down: 99.97% is not shown as 100.0%
        f"rank / random {o.median_rank_ratio:.2f}",
    ):
        assert expected in text, expected
    assert len(page.with_class("div", "stat")) == 4
    assert text.index("recommended LoRA") < text.index(verdict(analysis)[0]) < text.index(rec.reason)


def test_recommendation_and_caveat_appear_once(html: str, html_with_rec: str) -> None:
    rec = recommendation()
    text = " ".join("".join(Page(html_with_rec).text).split())
    assert text.count(rec.reason) == 1 and text.count(rec.caveat) == 1
    assert text.count("Biderman") == 0  # the builder's caveat replaces the library's; no second copy
    empty = " ".join("".join(Page(html).text).split())
    assert "no LoRA recommendation was made" in empty.replace("No LoRA", "no LoRA")
    assert empty.count(CAVEAT) == 1


def test_title_is_the_model_name(analysis: Analysis) -> None:
    a = analysis
    assert report_title(replace(a, tuned="runs/llama-ft/model.safetensors")) == "llama-ft"
    assert report_title(replace(a, tuned="runs/llama-ft")) == "llama-ft"
    with_config = replace(a.base_info, model=ModelConfig(name_or_path="meta-llama/Llama-3.2-1B"))  # type: ignore[arg-type]
    assert report_title(replace(a, base_info=with_config)) == "meta-llama/Llama-3.2-1B fine-tune"
    tuned_config = replace(a.tuned_info, model=ModelConfig(name_or_path="/home/me/runs/llama-sft"))
    assert report_title(replace(a, base_info=with_config, tuned_info=tuned_config)) == "llama-sft"
    assert report_title(adapter_analysis()) == "my-adapter"
    assert model_name("org/name@v1.0") == "name" and model_name("pair/tuned.safetensors") == "pair/tuned"
    assert model_name("out/model-00001-of-00002.safetensors") == "out" and model_name(None) == "—"
    small = make_analysis(n_layers=1, kinds=("q_proj",))
    page = render_html(replace(small, base_info=with_config, tuned="runs/llama-ft/model.safetensors"))
    assert (
        "<h1>meta-llama/Llama-3.2-1B fine-tune</h1>" in page
        and "<title>meta-llama/Llama-3.2-1B fine-tune · spectra" in page
    )
    assert "fine-tune of meta-llama/Llama-3.2-1B" in page


def test_adapter_report_shows_r_against_the_rank_used() -> None:
    a = adapter_analysis(r=12)
    page = Page(render_html(a))
    text = " ".join(" ".join(page.text).split())
    assert "Adapter rank use" in text and "This adapter has r = 12" in text
    rows = page.with_class("tr", "use")
    assert len(rows) == len(KINDS)
    assert "adapter rank r 12" in text and "2 of 6 modules saturate r, 2 use at most half" in text
    assert "spectra resize" in text
    assert "PEFT adapter" in text and "analysed alone" in text


def test_layout_reflows_and_keeps_names_in_view(html: str) -> None:
    """Plots two per row, one per row below 1180 px; panels never below 85% of their natural width; the first
    column of a scrolling table is sticky."""
    assert re.search(r"@media \(max-width: 1180px\) \{ \.plots", html)
    assert re.search(r"\.scroll th:first-child, \.scroll td:first-child \{ position: sticky; left: 0", html)
    panels = re.findall(r'class="panels" style="--min: (\d+)px">(.*?)</div></div>', html, re.S)
    assert panels
    for minimum, svg in panels:
        natural = int(re.search(r'data-width="(\d+)"', svg).group(1))  # type: ignore[union-attr]
        assert int(minimum) == round(0.85 * natural)


def test_recommendation_slot(html_with_rec: str) -> None:
    page = Page(html_with_rec)
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
    assert not page.with_class("tr", "matrix") and len(page.find("figure")) == len(PLOTS)


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


def test_write_report_creates_missing_folders(
    analysis: Analysis, html: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("spectra.report.html.render_html", lambda a: html)
    assert write_report(analysis, tmp_path / "new" / "report.html").is_file()


def test_write_report_unwritable_target(
    analysis: Analysis, html: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("spectra.report.html.render_html", lambda a: html)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpectraError, match="cannot write"):
        write_report(analysis, tmp_path / "file" / "report.html")


def test_comparison_page(analysis: Analysis, tmp_path: Path) -> None:
    other = make_analysis(n_layers=3, kinds=("q_proj", "o_proj"), recommendation=recommendation())
    html = render_comparison_html([("full fine-tune", analysis), ("LoRA <r=8>", other)], "Full & LoRA", "intro <i>")
    page = Page(html)
    text = " ".join("".join(page.text).split())
    assert "LoRA <r=8>" in text and "<r=8>" not in html and "intro <i>" in text and "Full & LoRA" in text
    figures = page.find("figure")  # one set of plots, both analyses overlaid on each
    assert [f["data-plot"] for f in figures] == ["spectra", "energy", "depth"]
    assert len(page.find("svg")) == 4 + 2  # a spectrum panel per kind of either analysis, energy, depth
    assert len({a["id"] for _, a in page.tags if a.get("id")}) == len([a for _, a in page.tags if a.get("id")])
    titles = re.findall(r"<title>([^<]*)</title>", html)
    assert any(t.startswith("full fine-tune: ") for t in titles)
    assert any(t.startswith("LoRA &lt;r=8&gt;: ") for t in titles)
    assert text.count("Caveat: an upper bound <not> a prediction.") == 0 and text.count(CAVEAT) == 1
    headline = text[text.index("Headline") : text.index("Captured energy at LoRA ranks")]
    for kind in (*KINDS, "o_proj"):
        assert kind in headline
    assert "Advice not derived from the spectrum" in text and "No LoRA recommendation was made" in text
    assert not re.search(r"https?://", html)
    out = write_comparison_report([("a", analysis)], tmp_path / "demo.html", "Demo")
    assert Page(out.read_text(encoding="utf-8")).find("svg")


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
