"""Line charts of metrics.jsonl as PNG files, drawn with PIL (no plotting library needed).

    plot_metrics("runs/tiny/mllm/metrics.jsonl", "loss_curves.png", ["loss", "loss_generation"])

A series `k` with `k_lo` and `k_hi` in the same rows gets a shaded band (e.g. a 95% interval).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
SIZE, MARGIN = (800, 450), (70, 20, 20, 50)  # left, top, right, bottom


def read_series(metrics_jsonl: str | Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that has `key` with a finite number."""
    out = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.append((int(row["step"]), float(value)))
    return out


def plot_metrics(metrics_jsonl: str | Path, out: str | Path, keys: list[str], title: str = "", zero_line: bool = False) -> Path | None:
    """Draw the given metrics over steps into `out` (PNG); None when none of them was logged."""
    series = {k: read_series(metrics_jsonl, k) for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    bands = {k: (read_series(metrics_jsonl, f"{k}_lo"), read_series(metrics_jsonl, f"{k}_hi")) for k in series}
    points = [p for v in series.values() for p in v] + [p for lo, hi in bands.values() for p in lo + hi]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    if zero_line:
        y0, y1 = min(y0, 0.0), max(y1, 0.0)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)
    left, top, right, bottom = MARGIN
    w, h = SIZE[0] - left - right, SIZE[1] - top - bottom

    def xy(step: float, value: float) -> tuple[float, float]:
        return left + (step - x0) / (x1 - x0) * w, top + (1 - (value - y0) / (y1 - y0)) * h

    img = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(img, "RGBA")
    draw.rectangle([left, top, left + w, top + h], outline=(0, 0, 0))
    for i in range(5):  # axis ticks: 5 values on each axis
        yv, xv = y0 + (y1 - y0) * i / 4, x0 + (x1 - x0) * i / 4
        draw.line([left - 4, xy(x0, yv)[1], left, xy(x0, yv)[1]], fill=(0, 0, 0))
        draw.text((4, xy(x0, yv)[1] - 6), f"{yv:.3g}", fill=(0, 0, 0))
        draw.line([xy(xv, y0)[0], top + h, xy(xv, y0)[0], top + h + 4], fill=(0, 0, 0))
        draw.text((xy(xv, y0)[0] - 10, top + h + 8), f"{xv:.0f}", fill=(0, 0, 0))
    draw.text((left + w // 2 - 12, SIZE[1] - 18), "step", fill=(0, 0, 0))
    if zero_line:
        draw.line([xy(x0, 0), xy(x1, 0)], fill=(128, 128, 128))
    for n, (key, values) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        lo, hi = bands[key]
        if lo and len(lo) == len(hi) and len(lo) > 1:
            draw.polygon([xy(*p) for p in lo] + [xy(*p) for p in reversed(hi)], fill=colour + (50,))
        if len(values) > 1:
            draw.line([xy(*p) for p in values], fill=colour, width=2)
        for p in values[-1:] if len(values) > 1 else values:
            cx, cy = xy(*p)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.text((left + 8, top + 6 + 14 * n), key, fill=colour)
    if title:
        draw.text((left + w - 8 * len(title), top + 6), title, fill=(0, 0, 0))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out
