"""cli/display.py: display names, tables fitted to a width (columns dropped, numbers never cut), percent rounding."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console, RenderableType

from builders import adapter_analysis, layer_metrics, make_analysis
from spectra_cli import display
from spectra_cli.display import Col, display_names, fit_table

LLAMA = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")),
    "lm_head.weight",
]
T5 = [
    f"{tower}.block.{i}.layer.{j}.{m}.weight"
    for tower in ("encoder", "decoder")
    for i in range(2)
    for j, m in ((0, "SelfAttention.q"), (1, "DenseReluDense.wi"))
]


def render(renderable: RenderableType, width: int) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None, soft_wrap=False)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined,no-any-return]


def metrics(names: list[str]) -> list:  # type: ignore[type-arg]
    return [layer_metrics(n, (64, 48), [1.0, 0.5]) for n in names]


def test_llama_names_elide_the_block_prefix_once() -> None:
    names = display_names(metrics(LLAMA))
    assert names.caption == "names: model.layers.<layer>.<module>.weight"
    assert names.layer["model.layers.1.mlp.down_proj.weight"] == "1"
    assert names.module["model.layers.1.mlp.down_proj.weight"] == "mlp.down_proj"
    assert names.module["model.embed_tokens.weight"] == "model.embed_tokens" and names.layer["lm_head.weight"] == ""
    assert names.kind is not None and names.kind["model.layers.0.self_attn.q_proj.weight"] == "q_proj"


def test_two_towers_keep_their_prefix_and_stay_distinct() -> None:
    names = display_names(metrics(T5))
    shown = {(names.layer[n], names.module[n]) for n in T5}
    assert len(shown) == len(T5)  # every key still tells apart
    assert names.layer[T5[0]] == "encoder.block.0" and names.module[T5[0]] == "layer.0.SelfAttention.q"
    assert names.caption == "names without .weight"


def test_kind_names_are_dropped_when_they_would_collide() -> None:
    layers = [
        layer_metrics("a.0.q.weight", (8, 8), [1.0], kind="q"),
        layer_metrics("a.0.x.q.weight", (8, 8), [1.0], kind="q"),
    ]
    assert display_names(layers).kind is None


def test_names_with_control_characters_are_escaped() -> None:
    names = display_names(metrics(["model.layers.0.evil\x1b[2J.weight"]))
    assert names.module["model.layers.0.evil\x1b[2J.weight"] == "evil\\x1b[2J"


def columns() -> list[Col]:
    return [
        Col("name", ["a.long.module.name", "b"], left=True, name=True),
        Col("rank", ["12345", "6"]),
        Col("E(8)", ["99.9%", "1.0%"], drop=1),
        Col("stable", ["123.4", "5.6"], drop=5),
        Col("effective", ["1234.5", "6.7"], drop=6),
    ]


@pytest.mark.parametrize("width", [30, 40, 55, 80])
def test_fit_table_drops_columns_and_never_cuts_a_number(width: int) -> None:
    text = render(fit_table([(columns(), 1)], width), width)
    lines = text.splitlines()
    header = lines[0].split()
    assert all(len(line) <= width for line in lines)
    assert header[:2] == ["name", "rank"]  # never dropped
    if "effective" in header:
        assert "stable" in header and "E(8)" in header  # dropped in order: effective, stable, E(8)
    for row in lines[2:]:
        for cell in row.split()[1:]:
            assert cell in {"12345", "6", "99.9%", "1.0%", "123.4", "5.6", "1234.5", "6.7"}, (width, row)
    assert ("effective" in header) == (width >= 55)


def test_fit_table_prefers_an_earlier_variant() -> None:
    short = [Col("name", ["q", "b"], left=True, name=True), *columns()[1:]]
    wide = render(fit_table([(columns(), 4), (short, 1)], 200), 200)
    assert "a.long.module.name" in wide and "effective" in wide
    narrow = render(fit_table([(columns(), 4), (short, 1)], 28), 28)
    assert "a.long" not in narrow and "rank" in narrow


def test_e_of_r_is_rounded_down() -> None:
    assert display._pct0(0.99996) == "99.9%" and display._pct0(1.0) == "100%"
    assert display._pct0(0.1234) == "12.3%" and display._pct0(None) == "-"


@pytest.mark.parametrize("width", [60, 80, 120, 200])
def test_rank_report_fits_wide_shapes(width: int) -> None:
    """Llama-7B shapes (4096×11008) and long keys: every table line fits, every rank is shown whole."""
    names = {(i, k): f"model.layers.{i}.mlp.{k}.weight" for i in range(3) for k in ("q_proj", "v_proj", "down_proj")}
    a = make_analysis(n_layers=3, shape=(4096, 11008), length=64, names=names)
    text = render(display.rank_report(a, width), width)
    table = [line for line in text.splitlines() if re.match(r"^\s+\d+\s+\S", line)]
    assert len(table) == 9 and all(len(line) <= width for line in table)
    for lm, line in zip(a.layers, table, strict=True):
        assert re.search(rf"\s{lm.rank}\*?(\s|$)", line), line


def test_adapter_view_shows_r_against_the_rank_used() -> None:
    a = adapter_analysis(r=12)
    text = render(display.rank_report(a, 100), 100)
    assert "adapter: configured rank r against the rank its updates use" in text
    assert "This adapter has r = 12" in text and "spectra resize" in text
    assert "(adapter alone)" in text and "‖ΔW‖/‖W‖" not in text  # no base: no relative change column
