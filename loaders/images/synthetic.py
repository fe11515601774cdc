"""Deterministic synthetic images for the offline demo: bar/line/pie charts, tables, text pages, shapes, scenes.

``synthetic_image(seed, index, size)`` returns encoded bytes; the same (seed, index, size) gives the same
picture on every machine with the same Pillow (and hence, in practice, the same ``image_id``). Kinds cycle
with the index so that any count >= 7 covers every kind; the content inside each image is drawn from a
``random.Random`` seeded with (seed, index). Charts, tables and text are PNG; scenes and shapes are JPEG, so
the demo also exercises both decoders.
"""

from __future__ import annotations

import io
import math
import random

from PIL import Image, ImageDraw, ImageFont

SYNTHETIC_VERSION = "1"  # bump when the pictures change: part of the images stage fingerprint

KINDS = ("bar_chart", "table", "scene", "line_chart", "text_page", "shapes", "pie_chart")
_WORDS = (
    "river market solar budget engine harbor orbit signal forest ledger quartz canyon pixel vector beacon "
    "meadow lantern summit cobalt falcon garden"
).split()
_PALETTE = [(231, 76, 60), (52, 152, 219), (46, 204, 113), (241, 196, 15), (155, 89, 182), (230, 126, 34)]


def synthetic_kind(index: int) -> str:
    return KINDS[index % len(KINDS)]


def synthetic_image(seed: int, index: int, size: tuple[int, int] = (512, 384)) -> bytes:
    """Encoded bytes (PNG or JPEG) of synthetic image ``index`` of the set ``seed``."""
    rng = random.Random(f"taskgalaxy-synthetic:{seed}:{index}")
    kind = synthetic_kind(index)
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    _DRAWERS[kind](draw, size, rng)
    out = io.BytesIO()
    if kind in ("scene", "shapes"):
        image.save(out, "JPEG", quality=90)
    else:
        image.save(out, "PNG", optimize=False)
    return out.getvalue()


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _title(draw: ImageDraw.ImageDraw, rng: random.Random, width: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(3)).title()
    draw.text((width // 2, 12), text, fill=(20, 20, 20), font=_font(18), anchor="mt")
    return text


def _bar_chart(draw, size, rng) -> None:
    width, height = size
    _title(draw, rng, width)
    n = rng.randint(3, 7)
    values = [rng.randint(5, 100) for _ in range(n)]
    left, bottom, top = 50, height - 40, 50
    draw.line([(left, top), (left, bottom), (width - 20, bottom)], fill=(0, 0, 0), width=2)
    slot = (width - 20 - left) / n
    for i, value in enumerate(values):
        x0 = left + i * slot + slot * 0.15
        y0 = bottom - (bottom - top) * value / 100
        draw.rectangle([x0, y0, x0 + slot * 0.7, bottom], fill=_PALETTE[i % len(_PALETTE)])
        draw.text((x0 + slot * 0.35, y0 - 4), str(value), fill=(0, 0, 0), font=_font(12), anchor="mb")
        draw.text((x0 + slot * 0.35, bottom + 6), rng.choice(_WORDS)[:6], fill=(0, 0, 0), font=_font(11), anchor="mt")


def _line_chart(draw, size, rng) -> None:
    width, height = size
    _title(draw, rng, width)
    left, bottom, top = 50, height - 40, 50
    draw.line([(left, top), (left, bottom), (width - 20, bottom)], fill=(0, 0, 0), width=2)
    for series in range(rng.randint(1, 3)):
        points, value = [], rng.uniform(0.2, 0.8)
        for i in range(12):
            value = min(1.0, max(0.0, value + rng.uniform(-0.15, 0.15)))
            points.append((left + 10 + i * (width - 40 - left) / 11, bottom - (bottom - top) * value))
        draw.line(points, fill=_PALETTE[series], width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=_PALETTE[series])


def _pie_chart(draw, size, rng) -> None:
    width, height = size
    _title(draw, rng, width)
    values = [rng.randint(5, 40) for _ in range(rng.randint(3, 6))]
    total, start = sum(values), 0.0
    radius = max(8, int(min(width * 0.6, height - 60) // 2))
    cx, cy = int(width * 0.33), height // 2 + 15
    legend = int(width * 0.68)
    for i, value in enumerate(values):
        end = start + 360 * value / total
        draw.pieslice([cx - radius, cy - radius, cx + radius, cy + radius], start, end, fill=_PALETTE[i % 6])
        draw.rectangle([legend, 60 + i * 22, legend + 14, 74 + i * 22], fill=_PALETTE[i % 6])
        label = f"{rng.choice(_WORDS)} {100 * value // total}%"
        draw.text((legend + 20, 60 + i * 22), label, fill=(0, 0, 0), font=_font(12))
        start = end


def _table(draw, size, rng) -> None:
    width, height = size
    _title(draw, rng, width)
    rows, cols = rng.randint(3, 7), rng.randint(2, 5)
    top, cell_h, cell_w = 45, min(40, (height - 60) // (rows + 1)), (width - 40) // cols
    for r in range(rows + 1):
        for c in range(cols):
            box = [20 + c * cell_w, top + r * cell_h, 20 + (c + 1) * cell_w, top + (r + 1) * cell_h]
            draw.rectangle(box, outline=(0, 0, 0), fill=(220, 230, 245) if r == 0 else None)
            text = rng.choice(_WORDS).title() if r == 0 or c == 0 else f"{rng.uniform(0, 999):.1f}"
            draw.text((box[0] + 6, box[1] + cell_h // 2), text, fill=(0, 0, 0), font=_font(13), anchor="lm")


def _text_page(draw, size, rng) -> None:
    width, height = size
    _title(draw, rng, width)
    y = 45
    while y < height - 30:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 8))).capitalize() + "."
        draw.text((24, y), line, fill=(30, 30, 30), font=_font(15))
        y += 24


def _shapes(draw, size, rng) -> None:
    width, height = size
    draw.rectangle([0, 0, width, height], fill=tuple(rng.randint(200, 255) for _ in range(3)))
    for _ in range(rng.randint(3, 9)):
        x, y, r = rng.randint(30, width - 30), rng.randint(30, height - 30), rng.randint(12, 70)
        color = rng.choice(_PALETTE)
        shape = rng.choice(("circle", "square", "triangle"))
        if shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(0, 0, 0))
        elif shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=color, outline=(0, 0, 0))
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=color, outline=(0, 0, 0))


def _scene(draw, size, rng) -> None:
    width, height = size
    horizon = int(height * rng.uniform(0.45, 0.65))
    sky = (rng.randint(90, 150), rng.randint(150, 200), 255)
    for y in range(horizon):
        shade = y / max(1, horizon)
        draw.line([(0, y), (width, y)], fill=tuple(int(c * (1 - 0.3 * shade)) for c in sky))
    draw.rectangle([0, horizon, width, height], fill=(60, rng.randint(120, 170), 60))
    sx, sy = rng.randint(40, width - 40), rng.randint(20, horizon // 2)
    draw.ellipse([sx - 25, sy - 25, sx + 25, sy + 25], fill=(255, 220, 60))
    for _ in range(rng.randint(2, 5)):  # houses
        x, w = rng.randint(0, width - 80), rng.randint(40, 80)
        h = rng.randint(30, 60)
        draw.rectangle([x, horizon - h // 3, x + w, horizon - h // 3 + h], fill=rng.choice(_PALETTE))
        draw.polygon([(x - 5, horizon - h // 3), (x + w // 2, horizon - h), (x + w + 5, horizon - h // 3)],
                     fill=(120, 60, 40))
    for _ in range(rng.randint(2, 6)):  # trees
        x = rng.randint(10, width - 10)
        y = rng.randint(horizon + 20, height - 10)
        draw.rectangle([x - 3, y - 25, x + 3, y], fill=(100, 70, 40))
        draw.ellipse([x - 15, y - 55, x + 15, y - 20], fill=(30, 110 + int(40 * math.sin(x)), 30))


_DRAWERS = {
    "bar_chart": _bar_chart,
    "line_chart": _line_chart,
    "pie_chart": _pie_chart,
    "table": _table,
    "text_page": _text_page,
    "shapes": _shapes,
    "scene": _scene,
}
