"""Small figures drawn with PIL (already a dependency; no matplotlib): a labelled heat map."""
from __future__ import annotations

import io

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
