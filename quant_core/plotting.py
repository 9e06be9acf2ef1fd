"""Small figures drawn with PIL (already a dependency; no matplotlib): a labelled heat map, box plots
and stacked bar charts."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

# viridis at 5 stops: perceptually ordered and readable in grey
_STOPS = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))


def colour(v: float) -> tuple[int, int, int]:
    """Colour of ``v`` in [0, 1] (clamped) on the viridis ramp."""
    v = min(max(v, 0.0), 1.0) * (len(_STOPS) - 1)
    i = min(int(v), len(_STOPS) - 2)
    f = v - i
    return tuple(round(a + (b - a) * f) for a, b in zip(_STOPS[i], _STOPS[i + 1]))


def heatmap_png(values: list[list[float | None]], row_labels: list[str], col_labels: list[str],
                text: list[list[str]] | None = None, *, title: str = "", cell: tuple[int, int] = (96, 22)) -> bytes:
    """PNG bytes of a heat map: ``values[r][c]`` in [0, 1] (None: grey, not measured), row and
    column labels, optional per-cell text, a title and a colour bar."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width(s: str) -> int:
        return int(probe.textlength(s, font=font))

    cw, ch = max(cell[0], *(width(c) + 8 for c in col_labels)), cell[1]
    left = max([width(r) for r in row_labels] + [0]) + 12
    top, bar = 40, 30
    w = left + cw * len(col_labels) + 10
    h = top + ch * len(row_labels) + bar + 20
    img = Image.new("RGB", (max(w, width(title) + 20), h), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        d.text((left + c * cw + 4, top - 16), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        y = top + r * ch
        d.text((6, y + 5), label, fill="black", font=font)
        for c, v in enumerate(values[r]):
            x = left + c * cw
            fill = (200, 200, 200) if v is None else colour(v)
            d.rectangle([x, y, x + cw - 2, y + ch - 2], fill=fill)
            if text and text[r][c]:
                ink = "black" if v is not None and v > 0.6 else "white"
                d.text((x + 4, y + 5), text[r][c], fill=ink, font=font)
    y = top + ch * len(row_labels) + 10
    for i in range(cw * len(col_labels)):
        d.line([left + i, y, left + i, y + 10], fill=colour(i / max(cw * len(col_labels) - 1, 1)))
    d.text((left, y + 12), "0", fill="black", font=font)
    d.text((left + cw * len(col_labels) - 10, y + 12), "1", fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- charts (Qua²SeDiMo insight figures) ---------------------------------------------------------
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120))


def _frame(n: int, title: str, lo: float, hi: float, ylabel: str):
    from PIL import Image, ImageDraw

    w, h, left, bottom, top = max(480, 60 + 38 * n), 360, 60, 90, 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    d.text((4, top - 14), ylabel, fill="black")
    d.line([(left, top), (left, h - bottom), (w - 10, h - bottom)], fill="black")
    span = (hi - lo) or 1.0
    y_of = lambda v: top + (hi - v) / span * (h - bottom - top)  # noqa: E731
    for k in range(5):
        v = lo + span * k / 4
        d.line([(left - 4, y_of(v)), (left, y_of(v))], fill="black")
        d.text((2, y_of(v) - 6), f"{v:.3g}", fill="black")
    x_of = lambda i: left + 24 + i * (w - left - 40) / max(n, 1)  # noqa: E731
    return img, d, x_of, y_of, h - bottom


def _label(d, x, base, text):
    for k, part in enumerate(text.split("-")[:3]):
        d.text((x - 12, base + 6 + 12 * k), part, fill="black")


def box_plot(groups: dict[str, Sequence[float]], title: str, path: str | Path, ylabel: str = "score") -> None:
    """One box (quartiles, median, whiskers at min/max) per group."""
    import torch

    vals = {k: torch.as_tensor(list(v), dtype=torch.float64) for k, v in groups.items() if len(v)}
    lo = min(v.min().item() for v in vals.values())
    hi = max(v.max().item() for v in vals.values())
    img, d, x_of, y_of, base = _frame(len(vals), title, lo, hi, ylabel)
    for i, (name, v) in enumerate(vals.items()):
        q1, med, q3 = (torch.quantile(v, q).item() for q in (0.25, 0.5, 0.75))
        x = x_of(i)
        d.line([(x, y_of(v.min().item())), (x, y_of(v.max().item()))], fill="gray")
        d.rectangle([x - 10, y_of(q3), x + 10, y_of(q1)], outline="black", fill=PALETTE[i % len(PALETTE)])
        d.line([(x - 10, y_of(med)), (x + 10, y_of(med))], fill="black", width=2)
        _label(d, x, base, name)
    img.save(path)


def stacked_bars(categories: Sequence[str], series: dict[str, Sequence[float]], title: str, path: str | Path,
                 ylabel: str = "count") -> None:
    """One bar per category, stacked by series (legend on the right of the title)."""
    hi = max(sum(s[i] for s in series.values()) for i in range(len(categories))) or 1.0
    img, d, x_of, y_of, base = _frame(len(categories), title, 0.0, hi, ylabel)
    for k, name in enumerate(series):
        x = 60 + 70 * k
        d.rectangle([x, base + 52, x + 10, base + 62], fill=PALETTE[k % len(PALETTE)])
        d.text((x + 14, base + 51), name, fill="black")
    for i, cat in enumerate(categories):
        x, acc = x_of(i), 0.0
        for k, values in enumerate(series.values()):
            if values[i]:
                d.rectangle([x - 10, y_of(acc + values[i]), x + 10, y_of(acc)], fill=PALETTE[k % len(PALETTE)],
                            outline="black")
                acc += values[i]
        _label(d, x, base, cat)
    img.save(path)
