"""The panels' usage chart (inline SVG, `widgets.style.stacked_bars` fed by `widgets.account.usage_chart`), in
plain Python: the bars add up to the report, the biggest groups keep their own colour, names are escaped."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from widgets import style
from widgets.account import MAX_CHART_DAYS, usage_chart, usage_html

SVG = "{http://www.w3.org/2000/svg}"


def report(rows, since="2026-11-01", until="2026-11-03T12:00:00Z", group_by="model"):
    return {"since": since + "T00:00:00Z", "until": until, "bucket": "day", "group_by": group_by,
            "rows": [{"bucket": day, "group": group, "requests": 1, "errors": 0, "prompt_tokens": tokens,
                      "completion_tokens": 0, "total_tokens": tokens} for day, group, tokens in rows]}


def bars(svg: str) -> list[dict]:
    root = ET.fromstring(svg)  # well-formed XML, whatever the names
    return [dict(r.attrib, title=r.find(SVG + "title").text) for r in root.iter(SVG + "rect") if "data-value" in r.attrib]


def test_bars_stack_the_reports_tokens_per_day():
    svg = usage_chart(report([("2026-11-01", "tiny-chat", 100), ("2026-11-01", "minilm", 100),
                              ("2026-11-03", "tiny-chat", 50)]))
    found = bars(svg)
    assert sorted((b["data-column"], b["data-series"], int(b["data-value"])) for b in found) == [
        ("11-01", "minilm", 100), ("11-01", "tiny-chat", 100), ("11-03", "tiny-chat", 50)]
    height = {(b["data-column"], b["data-series"]): float(b["height"]) for b in found}
    assert abs(height[("11-01", "tiny-chat")] - 2 * height[("11-03", "tiny-chat")]) < 0.2  # one scale for all
    assert "11-03 · tiny-chat: 50 tokens" in [b["title"] for b in found]
    # Three days on the axis (the report's range, empty days included), the busiest day at the top of the scale.
    texts = [t.text for t in ET.fromstring(svg).iter(SVG + "text")]
    assert {"11-01", "11-02", "11-03", "200", "minilm", "tiny-chat"} <= set(texts)


def test_colours_are_the_themes_variables():
    svg = usage_chart(report([("2026-11-01", "a", 1), ("2026-11-02", "b", 2)]))
    fills = set(re.findall(r'style="fill: var\((--jp-[\w-]+)\)"', svg))
    assert fills == set(style.SERIES_COLOURS[:2]) and not re.search(r"#[0-9a-fA-F]{3,6}\b", svg)


def test_small_groups_are_merged_and_names_escaped():
    rows = [("2026-11-02", f"model-{i}", 10 * (i + 1)) for i in range(10)] + [("2026-11-02", "<b>&x</b>", 1000)]
    svg = usage_chart(report(rows), max_series=4)
    found = {b["data-series"]: int(b["data-value"]) for b in bars(svg)}
    assert found == {"<b>&x</b>": 1000, "model-9": 100, "model-8": 90, style.OTHERS: sum(10 * (i + 1) for i in range(8))}
    assert "<b>&x</b>" not in svg  # escaped in every attribute and text


def test_nothing_to_draw():
    assert usage_chart(report([])) == ""
    assert usage_chart(report([("2026-11-01", None, 0)])) == ""  # requests without tokens (/v1/models)
    assert "data-series=\"-\"" not in usage_chart(report([("2026-11-01", None, 0), ("2026-11-01", "m", 3)]))
    assert usage_chart(report([("2026-11-01T05:00:00Z", "m", 1)]) | {"bucket": "hour"}) == ""
    assert "<svg" not in usage_html(report([])) and "(none)" in usage_html(report([]))


def test_a_long_range_shows_its_last_days():
    svg = usage_chart(report([("2025-01-01", "m", 5), ("2026-11-03", "m", 7)], since="2025-01-01"))
    assert [b["data-column"] for b in bars(svg)] == ["11-03"]  # the oldest day is before the chart's window
    labels = [t.text for t in ET.fromstring(svg).iter(SVG + "text")]
    assert "11-03" in labels and MAX_CHART_DAYS == 92


def test_the_panel_html_has_chart_and_table():
    page = usage_html(report([("2026-11-01", "tiny-chat", 3)]))
    assert page.index("<svg") < page.index("<table>") and "by model" in page
