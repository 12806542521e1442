"""Records -> matplotlib Figures (plots.py) -> one self-contained HTML page per record type (html.py)."""

from spectra.report.html import render_comparison_html, render_html, write_comparison_report, write_report

__all__ = ["render_comparison_html", "render_html", "write_comparison_report", "write_report"]
