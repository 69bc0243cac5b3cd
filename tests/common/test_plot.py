"""The run's pictures read on their own: charts with axis labels, round ticks and a legend off the data;
grids whose rows, prompts and verdicts are written on them. Checked through each figure's layout."""

import json
import math

import pytest
from PIL import Image

from semhitok.common.plot import (FAIL, PASS, Cell, code_map_grid, labelled_grid, line_chart, nice_ticks, plot_metrics,
                                  read_series, reconstruction_grid, sample_grid)


def overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def texts(fig) -> dict:
    return {t: box for t, box in fig.texts}


def inside(box, outer) -> bool:
    return outer[0] <= box[0] and outer[1] <= box[1] and box[2] <= outer[2] and box[3] <= outer[3]


@pytest.mark.parametrize("lo,hi,expected", [
    (0.0882, 8.16, [0, 2, 4, 6, 8, 10]),  # run S16's losses (the old chart's ticks: 0.0882, 2.11, 4.12, 6.14, 8.16)
    (-0.144, 1.64, [-0.5, 0, 0.5, 1, 1.5, 2]),  # its gaps
    (10, 1600, [0, 500, 1000, 1500, 2000]),
    (3.78, 5.8, [3.5, 4, 4.5, 5, 5.5, 6]),
])
def test_ticks_are_round_numbers_covering_the_data(lo, hi, expected):
    assert nice_ticks(lo, hi, 6) == pytest.approx(expected)


def loss_rows(tmp_path):
    rows = [{"step": s, "loss": 8.16 * math.exp(-s / 200) + 0.9, "loss_understanding": 7 * math.exp(-s / 60) + 0.09,
             "loss_text": 8 * math.exp(-s / 150) + 0.1} for s in range(10, 1601, 10)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_loss_chart_keeps_its_legend_off_the_data_and_labels_both_axes(tmp_path):
    metrics = loss_rows(tmp_path)
    keys = ["loss", "loss_understanding", "loss_text"]
    fig = line_chart({k: read_series(metrics, k) for k in keys}, title="training loss", ylabel="cross-entropy (nats per token)")
    plot, legend = fig.boxes["plot"], fig.boxes["legend"]
    assert not overlaps(legend, plot)  # the old chart wrote its legend at the top left of the data, over the curves
    shown = texts(fig)
    assert all(inside(shown[k], legend) for k in keys)
    assert "cross-entropy (nats per token)" in shown and shown["cross-entropy (nats per token)"][2] <= plot[0]  # left of the plot
    assert "step" in shown and shown["step"][1] >= plot[3]
    yticks = [t for t, box in fig.texts if box[2] < plot[0] and t != "cross-entropy (nats per token)"]
    assert yticks == ["0", "2", "4", "6", "8", "10"]
    assert inside(shown["training loss"], (0, 0, fig.image.width, plot[1]))
    assert plot_metrics(metrics, tmp_path / "loss_curves.png", keys, "training loss", "nats").is_file()


def test_gaps_chart_draws_a_dashed_zero_line_explained_in_the_legend(tmp_path):
    rows = [{"step": s, "gap": 0.3 + s / 2000, "gap_lo": 0.1 + s / 2000, "gap_hi": 0.5 + s / 2000} for s in range(300, 1601, 300)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = {"gap": read_series(path, "gap")}
    fig = line_chart(series, {"gap": (read_series(path, "gap_lo"), read_series(path, "gap_hi"))},
                     ylabel="gap (nats/token)", zero_line="0: the condition is not used")
    x0, y, x1, _ = fig.boxes["zero_line"]
    plot = fig.boxes["plot"]
    assert plot[1] < y < plot[3]  # all data above 0, yet 0 is in view
    row = [fig.image.getpixel((x, y)) for x in range(x0 + 1, x1 - 1)]
    assert 0.3 < sum(p[0] < 130 and p[0] == p[1] == p[2] for p in row) / len(row) < 0.9  # grey dashes
    shown = texts(fig)
    assert inside(shown["0: the condition is not used"], fig.boxes["legend"]) and "shaded: 95% interval" in shown
    no_zero = line_chart(series)
    assert "zero_line" not in no_zero.boxes


def picture(colour, size=32):
    return Image.new("RGB", (size, size), colour)


def test_reconstruction_grid_labels_its_rows_and_names_its_images():
    fig = reconstruction_grid([picture((200, 0, 0))] * 3, [picture((0, 0, 200))] * 3, ["a", "b", "c"])
    shown = texts(fig)
    for r, label in enumerate(["input", "reconstruction"]):
        cell = fig.boxes[f"cell {r},0"]
        assert shown[label][2] <= cell[0] and cell[1] <= (shown[label][1] + shown[label][3]) / 2 <= cell[3]  # left of its row
    for c, name in enumerate("abc"):
        cell = fig.boxes[f"cell 1,{c}"]
        assert cell[0] <= shown[name][0] < cell[2] and shown[name][1] >= cell[3]  # under its reconstruction
    assert "reconstructions" in fig.texts[0][0]  # the title says what the rows are
    assert fig.image.getpixel((fig.boxes["cell 0,0"][0] + 10, fig.boxes["cell 0,0"][1] + 10)) == (200, 0, 0)


def test_sample_grid_writes_each_prompt_under_its_own_image_with_the_checkers_verdict():
    prompts = [f"prompt number {k}" for k in range(10)]
    verdicts = [k % 3 == 0 if k < 9 else None for k in range(10)]
    fig = sample_grid([picture((k * 20, 0, 0)) for k in range(10)], prompts, verdicts, cols=4)
    shown = texts(fig)
    for k, prompt in enumerate(prompts):
        first_line = next(t for t in shown if prompt.startswith(t) and t)
        cell = fig.boxes[f"cell {k // 4},{k % 4}"]
        assert cell[0] <= shown[first_line][0] < cell[2] and 0 <= shown[first_line][1] - cell[3] < 8, prompt
        assert fig.image.getpixel((cell[0] + 1, cell[1] + 1)) == (PASS if verdicts[k] else FAIL if verdicts[k] is False else (255, 255, 255))
    assert any("green" in t and "red" in t for t in shown)  # the frame colours are explained
    several = sample_grid([picture((0, 0, 0))] * 4, ["a cat", "a cat", "a dog", "a dog"], per_prompt=2)
    assert texts(several)["a dog"][2] <= several.boxes["cell 1,0"][0]  # one row per prompt, labelled with it
    assert "cell 0,2" not in several.boxes


def test_code_map_grid_says_what_the_colours_are():
    fig = code_map_grid([picture((0, 0, 0))] * 2, [picture((9, 99, 199))] * 2)
    shown = texts(fig)
    assert "semantic ids" in shown and shown["semantic ids"][2] <= fig.boxes["cell 1,0"][0]
    assert "codebook id" in fig.texts[0][0] and "one colour per id" in fig.texts[0][0]


def test_captions_wrap_and_cut_within_their_cell_whatever_the_text():
    blank = picture((235, 235, 235), 64)
    fig = labelled_grid([[Cell(blank, ["a" * 60, "红色 ✓ done"], True), Cell(blank, "x")]], ["row"])
    cell = fig.boxes["cell 0,0"]
    under = [box for t, box in fig.texts if box[1] >= cell[3] and box[0] < cell[2]]
    assert len(under) >= 3 and all(box[2] <= cell[2] + 1 for box in under)
