"""A bar chart drawn on the server as SVG: no script, so it reads without JavaScript and under
the strictest Content-Security-Policy.

Why not a vendored chart library: the console's one chart is bars over at most
30 buckets, which is a few dozen lines of geometry here, while any library adds
a script to audit, to update and to allow in the CSP, and a page that shows
nothing without JavaScript. Each bar carries its series, bucket and value as
``data-`` attributes and a ``<title>``: what the tests and screen readers read.
"""

from __future__ import annotations

from dataclasses import dataclass

WIDTH = 720
HEIGHT = 220
_MARGIN_LEFT = 48
_MARGIN_BOTTOM = 28
_MARGIN_TOP = 8


@dataclass(frozen=True)
class Bar:
    series: str
    bucket: str
    value: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Tick:
    label: str
    x: float


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    ticks: list[Tick]
    top_value: int
    baseline: float
    left: float


def bar_chart(buckets: list[str], series: dict[str, list[int]], labels: list[str]) -> Chart:
    """Bars of each series side by side per bucket, scaled to the largest value (at least 1)."""
    top = max([1, *(v for values in series.values() for v in values)])
    plot_width = WIDTH - _MARGIN_LEFT
    plot_height = HEIGHT - _MARGIN_BOTTOM - _MARGIN_TOP
    slot = plot_width / max(1, len(buckets))
    bar_width = slot * 0.8 / max(1, len(series))
    baseline = HEIGHT - _MARGIN_BOTTOM
    bars = []
    for s, (name, values) in enumerate(series.items()):
        for i, value in enumerate(values):
            height = plot_height * value / top
            bars.append(
                Bar(
                    series=name,
                    bucket=buckets[i],
                    value=value,
                    x=round(_MARGIN_LEFT + i * slot + slot * 0.1 + s * bar_width, 2),
                    y=round(baseline - height, 2),
                    width=round(bar_width, 2),
                    height=round(height, 2),
                )
            )
    step = max(1, len(buckets) // 6)
    ticks = [
        Tick(labels[i], round(_MARGIN_LEFT + i * slot + slot / 2, 2)) for i in range(0, len(buckets), step)
    ]
    return Chart(WIDTH, HEIGHT, bars, ticks, top, baseline, _MARGIN_LEFT)
