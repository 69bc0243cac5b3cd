"""A run's pictures, drawn with PIL (no plotting library needed): line charts of metrics.jsonl and labelled
image grids.

    plot_metrics("runs/tiny/mllm/metrics.jsonl", "loss_curves.png", ["loss", "loss_generation"], ylabel="loss")
    labelled_grid([[Cell(img, "a red circle", ok=True), ...]], row_labels=["sample"], title="...").save("grid.png")

Every drawing function returns a Figure: the picture and where each part of it went (the plot area, the
legend, every text with its box), so tests can check the layout rather than the pixels. A series `k` with
`k_lo` and `k_hi` in the same rows gets a shaded band (e.g. a 95% interval). The legend sits beside the plot
area, never over the data.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
BLACK, GREY, WHITE = (0, 0, 0), (90, 90, 90), (255, 255, 255)
PASS, FAIL, NEUTRAL = (40, 170, 60), (220, 40, 40), (200, 200, 200)
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


@functools.cache
def font(size: int = 13) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's bundled font at `size` px (its bitmap font where PIL was built without FreeType)."""
    return ImageFont.load_default(size=size)


@dataclass
class Figure:
    image: Image.Image
    boxes: dict[str, Box] = field(default_factory=dict)  # named parts: plot, legend, title, cell r,c, ...
    texts: list[tuple[str, Box]] = field(default_factory=list)  # every text drawn, with its box

    def text(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, size: int = 13, fill=BLACK,
             anchor: str = "la") -> Box:
        box = tuple(round(v) for v in draw.textbbox(xy, text, font=font(size), anchor=anchor))
        draw.text(xy, text, fill=fill, font=font(size), anchor=anchor)
        self.texts.append((text, box))
        return box

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.image.save(out)
        return out


def text_width(text: str, size: int = 13) -> int:
    return math.ceil(font(size).getlength(text))


# -- line charts ----------------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round ticks (steps of 1, 2 or 5 x 10^k) covering [lo, hi]; the first <= lo, the last >= hi."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def tick_label(value: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{abs(value) if value == 0 else value:,.{decimals}f}"  # no "-0.0"


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


def line_chart(series: dict[str, list[tuple[float, float]]], bands: dict[str, tuple[list, list]] | None = None, *,
               title: str = "", ylabel: str = "", xlabel: str = "step", zero_line: str | None = None,
               band_label: str = "shaded: 95% interval", size: tuple[int, int] = (960, 480)) -> Figure:
    """Lines (with optional lo/hi bands) over x, round ticks on both axes, axis labels, the legend to the right
    of the plot area; zero_line: a dashed line at y = 0 (always in view), explained by this text in the legend."""
    bands = bands or {}
    points = [p for v in series.values() for p in v] + [p for lo, hi in bands.values() for p in lo + hi]
    ys = [p[1] for p in points]
    if zero_line is not None:  # 0 inside the plot area, clear of its frame
        margin = 0.05 * ((max(ys + [0.0]) - min(ys + [0.0])) or 1.0)
        ys += [0.0, -margin if min(ys) >= 0 else 0.0, margin if max(ys) <= 0 else 0.0]
    xs = [p[0] for p in points]
    xticks = nice_ticks(min(xs), max(xs), 6)
    x1 = max(xs) if max(xs) > xticks[0] else xticks[-1]  # the x axis ends at the last step logged
    xticks = [t for t in xticks if t <= x1 + 1e-9]
    yticks = nice_ticks(min(ys), max(ys), 6)
    x0, y0, y1 = xticks[0], yticks[0], yticks[-1]

    legend = [(key, COLOURS[n % len(COLOURS)]) for n, key in enumerate(series)]
    extras = [(band_label, "band")] * bool(bands) + [(zero_line, "zero")] * (zero_line is not None)
    legend_w = max(text_width(k) for k, _ in legend + extras) + 44
    ylabels = [tick_label(v, yticks) for v in yticks]
    left = 24 + max(text_width(t) for t in ylabels) + 10
    top, bottom, right = 40, 50, legend_w + 20
    w, h = size[0] - left - right, size[1] - top - bottom

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * w, top + (1 - (y - y0) / (y1 - y0)) * h

    fig = Figure(Image.new("RGB", size, WHITE), {"plot": (left, top, left + w, top + h)})
    draw = ImageDraw.Draw(fig.image, "RGBA")
    for value, text in zip(yticks, ylabels):  # horizontal grid lines at the y ticks
        y = xy(x0, value)[1]
        draw.line([left, y, left + w, y], fill=(235, 235, 235))
        draw.line([left - 4, y, left, y], fill=BLACK)
        fig.text(draw, (left - 7, y), text, anchor="rm")
    for value in xticks:
        x = xy(value, y0)[0]
        draw.line([x, top + h, x, top + h + 4], fill=BLACK)
        fig.text(draw, (x, top + h + 7), tick_label(value, xticks), anchor="ma")
    fig.boxes["xlabel"] = fig.text(draw, (left + w / 2, size[1] - 6), xlabel, anchor="md")
    if ylabel:  # written sideways, left of the tick labels
        strip = Image.new("RGB", (text_width(ylabel) + 4, 18), WHITE)
        ImageDraw.Draw(strip).text((2, 1), ylabel, fill=BLACK, font=font())
        strip = strip.rotate(90, expand=True)
        at = (4, round(top + h / 2 - strip.height / 2))
        fig.image.paste(strip, at)
        fig.boxes["ylabel"] = (*at, at[0] + strip.width, at[1] + strip.height)
        fig.texts.append((ylabel, fig.boxes["ylabel"]))
    if title:
        fig.boxes["title"] = fig.text(draw, (left + w / 2, 12), title, size=15, anchor="ma")

    for (key, colour) in legend:
        lo, hi = bands.get(key, ([], []))
        if lo and len(lo) == len(hi) and len(lo) > 1:
            draw.polygon([xy(*p) for p in lo] + [xy(*p) for p in reversed(hi)], fill=colour + (45,))
    if zero_line is not None:
        y = xy(x0, 0.0)[1]
        for x in range(left, left + w, 10):
            draw.line([x, y, min(x + 6, left + w), y], fill=GREY, width=2)
        fig.boxes["zero_line"] = (left, round(y), left + w, round(y))
    for key, colour in legend:
        values = series[key]
        if len(values) > 1:
            draw.line([xy(*p) for p in values], fill=colour, width=2)
        for p in values[-1:] if len(values) > 1 else values:
            cx, cy = xy(*p)
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
    draw.rectangle(fig.boxes["plot"], outline=BLACK)

    lx, ly = left + w + 16, top
    entries = legend + extras
    fig.boxes["legend"] = (lx, ly, lx + legend_w, ly + 20 * len(entries) + 8)
    draw.rectangle(fig.boxes["legend"], outline=(190, 190, 190))
    for n, (key, colour) in enumerate(entries):
        y = ly + 14 + 20 * n
        if colour == "band":
            draw.rectangle([lx + 8, y - 5, lx + 28, y + 5], fill=(120, 120, 120, 60))
        elif colour == "zero":
            for x in (lx + 8, lx + 20):
                draw.line([x, y, x + 6, y], fill=GREY, width=2)
        else:
            draw.line([lx + 8, y, lx + 28, y], fill=colour, width=3)
        fig.text(draw, (lx + 34, y), key, anchor="lm")
    return fig


def plot_metrics(metrics_jsonl: str | Path, out: str | Path, keys: list[str], title: str = "", ylabel: str = "",
                 zero_line: str | None = None) -> Path | None:
    """Draw the given metrics over steps into `out` (PNG, line_chart); None when none of them was logged."""
    series = {k: read_series(metrics_jsonl, k) for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    bands = {k: (read_series(metrics_jsonl, f"{k}_lo"), read_series(metrics_jsonl, f"{k}_hi")) for k in series}
    bands = {k: v for k, v in bands.items() if v[0] and v[1]}
    return line_chart(series, bands, title=title, ylabel=ylabel, zero_line=zero_line).save(out)


# -- image grids ----------------------------------------------------------------------------------------
@dataclass
class Cell:
    image: Image.Image
    caption: str | list[str] = ""  # lines of text under the image, wrapped to its width
    ok: bool | None = None  # a verdict: framed green (True) or red (False); None: a thin grey frame


def wrap(text: str, width: int, size: int = 12) -> list[str]:
    """text -> lines no wider than `width` px (a word wider than that is cut)."""
    fits = lambda t: text_width(t, size) <= width  # noqa: E731
    out = []
    for part in text.splitlines() or [""]:
        line = ""
        for word in part.split(" "):
            while not fits(word):
                cut = max([k for k in range(1, len(word) + 1) if fits(word[:k])] or [1])
                out += [line] if line else []
                out.append(word[:cut])
                word, line = word[cut:], ""
            trial = f"{line} {word}".strip()
            if line and not fits(trial):
                out.append(line)
                line = word
            else:
                line = trial
        out.append(line)
    return out


def labelled_grid(rows: list[list[Cell]], row_labels: list[str] | None = None, title: str = "", cell: int = 128,
                  verdict_note: str = "") -> Figure:
    """Rows of cells -> one picture: each image scaled to `cell` px (nearest: pixel art stays crisp), framed by
    its verdict, its caption wrapped beneath; a label left of each row, a title (and, when any cell has a
    verdict, `verdict_note` or a default saying what the frame colours mean) above. Rows never wrap: a row is
    as wide as its cells."""
    border, pad, size, line_h = 4, 8, 12, 15
    width = cell + 2 * border
    label_w = min(max(text_width(t) for t in row_labels) + 4, 150) if row_labels else 0
    labels = [wrap(t, label_w, 13) for t in row_labels] if row_labels else []
    captions = [[[w for text in ([c.caption] if isinstance(c.caption, str) else c.caption) for w in wrap(text, width - 2, size) if text]
                 for c in row] for row in rows]
    text_h = [max((len(lines) for lines in row), default=0) * line_h for row in captions]
    judged = any(c.ok is not None for row in rows for c in row)
    head = [t for t in (title, (verdict_note or "frame: green = passes the prompt checker, red = fails") if judged else "") if t]
    head_h = 20 * len(head) + (pad if head else 0)
    cols = max(map(len, rows))
    x_cells = pad + (label_w + pad if label_w else 0)
    canvas_w = max(x_cells + cols * (width + pad), max((text_width(t, 15) + 2 * pad for t in head), default=0))
    canvas_h = pad + head_h + sum(width + h + pad for h in text_h)
    fig = Figure(Image.new("RGB", (canvas_w, canvas_h), WHITE))
    draw = ImageDraw.Draw(fig.image)
    for n, text in enumerate(head):
        fig.boxes["title" if n == 0 and title else "verdict_note"] = fig.text(draw, (pad, pad + 20 * n), text, size=15 if n == 0 and title else 13)
    y = pad + head_h
    for r, row in enumerate(rows):
        for k, line in enumerate(labels[r] if labels else []):
            box = fig.text(draw, (pad, y + width / 2 + (k - (len(labels[r]) - 1) / 2) * 16), line, anchor="lm")
            fig.boxes[f"label {r}"] = box if k == 0 else (*fig.boxes[f"label {r}"][:2], max(fig.boxes[f"label {r}"][2], box[2]), box[3])
        for c, item in enumerate(row):
            x = x_cells + c * (width + pad)
            frame = NEUTRAL if item.ok is None else PASS if item.ok else FAIL
            draw.rectangle((x, y, x + width - 1, y + width - 1), fill=frame if item.ok is not None else WHITE,
                           outline=frame)
            fig.image.paste(item.image.convert("RGB").resize((cell, cell), Image.NEAREST), (x + border, y + border))
            fig.boxes[f"cell {r},{c}"] = (x, y, x + width, y + width)
            for k, line in enumerate(captions[r][c]):
                fig.text(draw, (x + 1, y + width + 2 + k * line_h), line, size=size)
        y += width + text_h[r] + pad
    return fig


def reconstruction_grid(inputs: list[Image.Image], reconstructions: list[Image.Image], names: list[str] | None = None,
                        title: str = "held-out images (top) and the tokenizer's reconstructions (bottom)") -> Figure:
    """Inputs over their reconstructions, rows labelled; names (e.g. file stems) under the reconstructions."""
    names = names or [""] * len(inputs)
    return labelled_grid([[Cell(i) for i in inputs], [Cell(r, n) for r, n in zip(reconstructions, names)]],
                         ["input", "reconstruction"], title)


def code_map_grid(inputs: list[Image.Image], id_maps: list[Image.Image], title: str = "") -> Figure:
    """Inputs over their semantic-id maps (id_map_image: one fixed pseudo-colour per codebook id)."""
    return labelled_grid([[Cell(i) for i in inputs], [Cell(m) for m in id_maps]], ["input", "semantic ids"],
                         title or "semantic code map: each cell is the codebook id of one patch, one colour per id "
                                  "(the same colour = the same id)")


def sample_grid(images: list[Image.Image], prompts: list[str], verdicts: list[bool | None] | None = None,
                per_prompt: int = 1, cols: int = 8, title: str = "") -> Figure:
    """Generated images with their prompts. One sample per prompt: rows of `cols` cells, each prompt under its
    own image (and framed by the checker's verdict where there is one); several: a row per prompt, labelled
    with it. images/prompts/verdicts: one entry per image, the samples of a prompt together."""
    verdicts = verdicts or [None] * len(images)
    cells = [Cell(i, p, v) for i, p, v in zip(images, prompts, verdicts)]
    judged = [v for v in verdicts if v is not None]
    note = f"frame: green = passes the prompt checker ({sum(judged)} of {len(judged)} shown), red = fails" if judged else ""
    if per_prompt > 1:
        rows = [cells[k : k + per_prompt] for k in range(0, len(cells), per_prompt)]
        return labelled_grid([[Cell(c.image, "", c.ok) for c in row] for row in rows], [row[0].caption for row in rows],
                             title or f"{per_prompt} samples per prompt", verdict_note=note)
    return labelled_grid([cells[k : k + cols] for k in range(0, len(cells), cols)], None,
                         title or "generated images, each above its prompt", verdict_note=note)
