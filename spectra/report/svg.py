"""matplotlib Figure -> SVG markup to inline in an HTML page: hover titles, unique ids, small and deterministic.

The SVG keeps text as text (the browser's fonts, selectable, sharp on any screen), drops metadata, rounds
coordinates to 0.1 pt, prefixes every referenced id with the plot's own prefix (so several SVGs live in one page)
and turns the gids set by `plots.tip` into `<title>` elements, which browsers show on hover. No script needed.
"""

from __future__ import annotations

import html
import io
import re
from contextlib import AbstractContextManager
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure

from spectra.report.plots import tip_text

SVG_RC: dict[Any, Any] = {
    "svg.fonttype": "none",  # <text>, not glyph paths: a fraction of the size, crisp at any zoom
    "svg.hashsalt": "spectra",  # deterministic clip-path ids: the same analysis gives the same file
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
    "path.simplify": True,
}
_NUMBER = re.compile(r"-?\d+\.\d{2,}")
_GEOMETRY = re.compile(r'(\s(?:d|x|y|x1|x2|y1|y2|width|height|transform|viewBox)=")([^"]*)"')  # not text, titles
_ID = re.compile(r'\sid="([^"]+)"')
_REF = re.compile(r'(url\(#|href="#)([^")]+)')


def svg_style() -> AbstractContextManager[None]:
    """The matplotlib settings the report draws and saves under (scoped: rcParams are restored on exit)."""
    return rc_context(SVG_RC)


def _round(match: re.Match[str]) -> str:
    text = f"{float(match.group()):.1f}"
    return text[:-2] if text.endswith(".0") else text


def _shorten(markup: str) -> str:
    """Coordinates to 0.1 pt, path data on one line, no indentation, no bare `<g>` wrappers, no null rotations,
    fonts left to the page's CSS."""
    markup = re.sub(r'd="([^"]*)"', lambda m: 'd="' + " ".join(m.group(1).split()) + '"', markup)
    markup = _GEOMETRY.sub(lambda m: m.group(1) + _NUMBER.sub(_round, m.group(2)) + '"', markup)
    markup = re.sub(r' transform="rotate\(-?0 [^)]*\)"', "", markup)
    markup = re.sub(r"font-family: [^;\"]*;? ?", "", markup)
    kept, stack = [], []
    for line in markup.splitlines():
        line = line.strip()
        if line == "<g>":
            stack.append(False)
        elif line == "</g>":
            if stack.pop():
                kept.append(line)
        else:
            if line.startswith("<g "):
                stack.append(True)
            kept.append(line)
    return "\n".join(kept)


def figure_svg(fig: Figure, prefix: str, label: str = "") -> str:
    """`fig` as an inline `<svg>` element that scales to its container (viewBox kept, width and height dropped).

    Args:
        fig: the figure; artists given a tip by `plots.tip` get a `<title>` (a hover text).
        prefix: unique in the page (e.g. the plot's anchor): prefixes the SVG's ids.
        label: the accessible name (aria-label) of the image.
    """
    buffer = io.StringIO()
    with svg_style():
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    markup = buffer.getvalue()
    markup = markup[markup.index("<svg") :]
    markup = re.sub(r"\s*<metadata>.*?</metadata>", "", markup, flags=re.S)
    referenced = {m.group(2) for m in _REF.finditer(markup)}

    def rename(match: re.Match[str]) -> str:
        gid = match.group(1)
        if gid in referenced:
            return f' id="{prefix}-{gid}"'
        return ""

    def open_group(match: re.Match[str]) -> str:
        text = tip_text(match.group(1))
        return f'<g class="tip"><title>{html.escape(text)}</title>' if text is not None else match.group()

    markup = re.sub(r'<g id="([^"]+)">', open_group, markup)
    markup = _ID.sub(rename, markup)
    markup = _REF.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", markup)
    width = re.search(r'width="([\d.]+)pt"', markup)
    natural = round(float(width.group(1)) * 4 / 3) if width else 0  # CSS px at 100% zoom
    markup = re.sub(
        r'<svg ([^>]*?)width="[\d.]+pt" height="[\d.]+pt" ([^>]*)>',
        lambda m: f'<svg {m.group(1)}{m.group(2)} role="img" aria-label="{html.escape(label)}" data-width="{natural}">',
        markup,
        count=1,
    )
    markup = markup.replace(' xmlns:xlink="http://www.w3.org/1999/xlink"', "").replace("xlink:href=", "href=")
    markup = markup.replace(' xmlns="http://www.w3.org/2000/svg"', "")
    return _shorten(markup).strip()


def natural_width(svg: str) -> int:
    """CSS px the SVG from `figure_svg` is drawn at when shown at its natural size."""
    found = re.search(r'data-width="(\d+)"', svg)
    return int(found.group(1)) if found else 0
