"""The panels' look in one place: layouts, spacing, colours (JupyterLab theme variables, so dark themes work),
and the frame every panel shares (a scoped `<style>` block, a title, an error label, tables).

Nothing else in `widgets/` sets a size or a colour: panels ask this module for a layout or a piece of HTML.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable, Iterable

import ipywidgets as w

from kernel_ext.service_api import InferenceError

PANEL_CLASS = "jhi-panel"
GAP = "6px"
LABEL_WIDTH = "9em"
CHART_WIDTH, CHART_HEIGHT = 640, 160
# A chart's series, in the theme's own colours; the last one is for "everything else".
SERIES_COLOURS = ("--jp-brand-color1", "--jp-warn-color1", "--jp-accent-color1", "--jp-error-color1",
                  "--jp-info-color1", "--jp-brand-color3", "--jp-warn-color3")
OTHER_COLOUR = "--jp-layout-color4"
OTHERS = "(others)"  # the name of a chart's merged rest

CSS = f"""
<style>
.{PANEL_CLASS} {{
  color: var(--jp-ui-font-color1);
  background: var(--jp-layout-color1);
  border: 1px solid var(--jp-border-color2);
  border-radius: 4px;
  padding: 8px 12px;
  font-family: var(--jp-ui-font-family);
}}
.{PANEL_CLASS} h3 {{ margin: 4px 0; color: var(--jp-ui-font-color0); }}
.{PANEL_CLASS} h4 {{ margin: 8px 0 2px; color: var(--jp-brand-color1); }}
.{PANEL_CLASS} .jhi-note {{ color: var(--jp-ui-font-color2); }}
.{PANEL_CLASS} .jhi-error {{ color: var(--jp-error-color1); font-weight: bold; }}
.{PANEL_CLASS} .jhi-ok {{ color: var(--jp-success-color1); }}
.{PANEL_CLASS} .jhi-deny {{ color: var(--jp-error-color1); }}
.{PANEL_CLASS} table {{ border-collapse: collapse; margin: 2px 0 6px; }}
.{PANEL_CLASS} th, .{PANEL_CLASS} td {{
  border-bottom: 1px solid var(--jp-border-color2); padding: 2px 10px 2px 0; text-align: left;
}}
.{PANEL_CLASS} th {{ color: var(--jp-ui-font-color2); font-weight: normal; }}
.{PANEL_CLASS} .jhi-chart {{ display: block; max-width: {CHART_WIDTH}px; font-size: 10px; }}
.{PANEL_CLASS} .jhi-chart text {{ fill: var(--jp-ui-font-color2); }}
.{PANEL_CLASS} .jhi-chart .jhi-grid {{ stroke: var(--jp-border-color2); }}
.{PANEL_CLASS} .jhi-secret {{
  font-family: var(--jp-code-font-family); background: var(--jp-layout-color2);
  border: 1px solid var(--jp-brand-color1); padding: 4px; width: 40em;
}}
</style>
"""


def column() -> w.Layout:
    return w.Layout(display="flex", flex_flow="column", grid_gap=GAP, width="100%")


def row() -> w.Layout:
    return w.Layout(display="flex", flex_flow="row wrap", align_items="center", grid_gap=GAP)


def field() -> w.Layout:
    return w.Layout(width="auto", min_width="14em")


def button() -> w.Layout:
    return w.Layout(width="auto")


def choices() -> w.Layout:
    """A multiple-choice list (features, models)."""
    return w.Layout(width="14em", height="7em")


def hidden() -> w.Layout:
    return w.Layout(display="none")


def describe() -> dict:
    """Form fields' `style`: their labels in one width, so the forms line up."""
    return {"description_width": LABEL_WIDTH}


def heading(text: str, level: int = 4) -> str:
    return f"<h{level}>{html.escape(text)}</h{level}>"


def note(text: str) -> str:
    return f'<span class="jhi-note">{html.escape(text)}</span>'


def allowed(value: bool) -> str:
    return '<span class="jhi-ok">allowed</span>' if value else '<span class="jhi-deny">denied</span>'


def table(headers: Iterable[str], rows: Iterable[Iterable], raw: Iterable[int] = ()) -> str:
    """An HTML table; cells are escaped except the columns in `raw` (markup this module made)."""
    raw = set(raw)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw else html.escape('' if c is None else str(c))}</td>"
                         for i, c in enumerate(cells)) + "</tr>"
        for cells in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>" if body else note("(none)")


def short_number(value: float) -> str:
    """1234 -> '1.2k', 5_000_000 -> '5M': axis labels that fit."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:g}"


def stacked_bars(columns: list[str], series: dict[str, list[int]], *, unit: str, caption: str) -> str:
    """An inline SVG bar per column, stacked by series (in order, each its own colour), with a y axis, the first,
    middle and last column's label, a legend and a tooltip per piece. Plain SVG: the kernel needs no plotting
    library and the theme's variables colour it."""
    left, bottom, top, legend_row = 44, 18, 6, 16
    n = max(len(columns), 1)
    totals = [sum(values[i] for values in series.values()) for i in range(len(columns))]
    peak = max(totals, default=0) or 1
    plot_w, plot_h = CHART_WIDTH - left - 4, CHART_HEIGHT - top - bottom
    step = plot_w / n
    legend_h = legend_row * ((len(series) + 3) // 4)
    parts = []
    for fraction in (0, 0.5, 1):
        y = top + plot_h * (1 - fraction)
        parts.append(f'<line class="jhi-grid" x1="{left}" x2="{CHART_WIDTH - 4}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{short_number(peak * fraction)}</text>')
    for i in sorted({0, (len(columns) - 1) // 2, len(columns) - 1} if columns else ()):
        x = left + step * (i + 0.5)
        parts.append(f'<text x="{x:.1f}" y="{CHART_HEIGHT - 4}" text-anchor="middle">{html.escape(columns[i])}</text>')
    colours = {name: colour for name, colour in zip(series, _series_colours(list(series)), strict=True)}
    for i, column in enumerate(columns):
        y = top + plot_h
        for name, values in series.items():
            if not values[i]:
                continue
            h = plot_h * values[i] / peak
            y -= h
            tip = html.escape(f"{column} · {name}: {values[i]:,} {unit}")
            parts.append(
                f'<rect x="{left + step * i + step * 0.1:.1f}" y="{y:.1f}" width="{step * 0.8:.1f}" height="{h:.1f}" '
                f'style="fill: var({colours[name]})" data-column="{html.escape(column, quote=True)}" '
                f'data-series="{html.escape(name, quote=True)}" data-value="{values[i]}"><title>{tip}</title></rect>'
            )
    for k, name in enumerate(series):
        x, y = left + (k % 4) * (plot_w / 4), CHART_HEIGHT + legend_row * (k // 4) + 4
        parts.append(f'<rect x="{x:.1f}" y="{y}" width="10" height="10" style="fill: var({colours[name]})"/>'
                     f'<text x="{x + 14:.1f}" y="{y + 9}">{html.escape(name[:40])}</text>')
    return (f'<svg class="jhi-chart" role="img" aria-label="{html.escape(caption, quote=True)}" '
            f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT + legend_h + 4}" xmlns="http://www.w3.org/2000/svg">'
            + "".join(parts) + "</svg>")


def _series_colours(names: list[str]) -> list[str]:
    """The theme's colours in order; the merged rest (`OTHERS`) gets the neutral one."""
    palette = iter(SERIES_COLOURS)
    return [OTHER_COLOUR if name == OTHERS else next(palette, OTHER_COLOUR) for name in names]


# The browser's clipboard API exists only on https and localhost; on a Hub served over plain http elsewhere the
# selected text is copied the older way.
COPY_SCRIPT = (
    "const field = this.previousElementSibling; field.select();"
    " if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(field.value); }"
    " else { document.execCommand('copy'); }"
)


def secret_html(secret: str) -> str:
    """The secret once, selectable, with a copy button (the browser's clipboard; nothing leaves the page)."""
    value = html.escape(secret, quote=True)
    return (
        f'<input class="jhi-secret" readonly value="{value}" onclick="this.select()"> '
        f'<button class="jhi-copy" onclick="{html.escape(COPY_SCRIPT, quote=True)}">Copy</button><br>'
        + note("Copy it now: it is shown only this once.")
    )


class Panel(w.VBox):
    """A panel's frame: the scoped style, a title, an error label; `guard` runs an action and shows its error."""

    def __init__(self, title: str, children: list, **kwargs):
        self.error = w.HTML(layout=hidden())
        self.error.add_class("jhi-error")
        super().__init__([w.HTML(CSS + heading(title, 3)), self.error, *children], layout=column(), **kwargs)
        self.add_class(PANEL_CLASS)

    def show_error(self, message: str | None) -> None:
        self.error.value = f'<span class="jhi-error">{html.escape(message)}</span>' if message else ""
        self.error.layout.display = None if message else "none"

    def guard(self, action: Callable, *args) -> bool:
        """Run `action`; an InferenceError (or a bad form value) shows in the error label, never a traceback."""
        try:
            action(*args)
        except (InferenceError, ValueError) as e:
            self.show_error(str(e))
            return False
        self.show_error(None)
        return True


def action(method: Callable) -> Callable:
    """A panel method that a button calls: it answers True when done, or shows why not in the error label."""
    @functools.wraps(method)
    def run(self: Panel, *args) -> bool:
        return self.guard(method, self, *args)

    return run
