"""The PNG chart of `nodeagent bench mesh`, drawn here with zlib alone (no plotting
library to pin): for each placement, one row per figure with a bar per nodeagent set-up
(L4, L7, L7 at the server side only) of its ratio to the Envoy sidecar pair, whose
ratio 1 is the vertical line; then memory per node against sidecars at each pod count.
Text is a 5x7 bitmap font (upper case: lower case is drawn as upper case).

`Canvas` is an RGB raster with rectangles and text; `png` encodes it (8-bit RGB,
filter 0 on every row); `render(result)` lays the chart out from the bench's JSON.
"""

from __future__ import annotations

import struct
import zlib

from nodeagent.bench.meshreport import FIGURES, MESHES, PLACEMENTS

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
COLOURS = {"l4": (31, 119, 180), "l7": (255, 127, 14), "l7s": (214, 39, 40), "rss": (44, 160, 44)}
NAMES = {"l4": "nodeagent L4", "l7": "nodeagent L7 (one waypoint per request)", "l7s": "nodeagent L7, the server's waypoint only"}
LEGEND_GAP = 36  # between one legend entry and the next square
GLYPH_W, GLYPH_H = 5, 7

_FONT_ROWS = {
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#", "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.", "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####", "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####", "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.", "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#", "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#", "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.", "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#", "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.", "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.", "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.", "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..", "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.", "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####", "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.", "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.", "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.", "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    " ": ".....|.....|.....|.....|.....|.....|.....", ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...", ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....", "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...", "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....", "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    "=": ".....|.....|#####|.....|#####|.....|.....", "_": ".....|.....|.....|.....|.....|.....|#####",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...", "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..", "'": "..#..|..#..|.....|.....|.....|.....|.....",
    ";": ".....|.##..|.##..|.....|.##..|..#..|.#...",
}
FONT = {ch: [row for row in rows.split("|")] for ch, rows in _FONT_ROWS.items()}
# "x1.50" reads better with a small x
FONT["x"] = [".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"]


class Canvas:
    def __init__(self, width: int, height: int, background: tuple[int, int, int] = WHITE):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def crop(self, height: int) -> None:
        """Keep the top `height` rows."""
        self.height = min(self.height, height)
        del self.pixels[3 * self.width * self.height:]

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        i = 3 * (y * self.width + x)
        return tuple(self.pixels[i:i + 3])

    def rect(self, x: int, y: int, w: int, h: int, colour: tuple[int, int, int]) -> None:
        """Fill [x, x+w) x [y, y+h), clipped to the canvas."""
        x0, y0, x1, y1 = max(0, x), max(0, y), min(self.width, x + w), min(self.height, y + h)
        if x0 >= x1:
            return
        row = bytes(colour) * (x1 - x0)
        for yy in range(y0, y1):
            i = 3 * (yy * self.width + x0)
            self.pixels[i:i + len(row)] = row

    def text(self, x: int, y: int, text: str, colour: tuple[int, int, int] = BLACK, scale: int = 2) -> int:
        """Draw `text` with its top-left at (x, y); returns the x after it."""
        for ch in text:
            glyph = FONT.get(ch) or FONT.get(ch.upper()) or FONT["?"]
            for gy, row in enumerate(glyph):
                for gx, bit in enumerate(row):
                    if bit == "#":
                        self.rect(x + gx * scale, y + gy * scale, scale, scale, colour)
            x += (GLYPH_W + 1) * scale
        return x


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * (GLYPH_W + 1) * scale


def png(canvas: Canvas) -> bytes:
    stride = 3 * canvas.width
    raw = b"".join(b"\x00" + bytes(canvas.pixels[y * stride:(y + 1) * stride]) for y in range(canvas.height))
    header = struct.pack("!IIBBBBB", canvas.width, canvas.height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# --- layout ------------------------------------------------------------------------------
WIDTH, MARGIN, LABEL_W, BAR_W = 1200, 20, 640, 420
BAR_H, ROW_GAP, LINE_H = 14, 10, 24
AXIS_MAX = 4.0  # ratios beyond are drawn to the edge and labelled


def bar_length(ratio: float, axis_max: float = AXIS_MAX, width: int = BAR_W) -> int:
    return round(min(ratio, axis_max) / axis_max * width)


def _bars_row(c: Canvas, y: int, label: str, bars: list[tuple[str, float | None]]) -> int:
    c.text(MARGIN, y + 4, label)
    x0 = MARGIN + LABEL_W
    for key, ratio in bars:
        if ratio is not None:
            c.rect(x0, y, bar_length(ratio), BAR_H, COLOURS[key])
            c.text(x0 + bar_length(ratio) + 6, y, f"x{ratio:.2f}", scale=2)
        else:
            c.text(x0 + 6, y, "-")
        y += BAR_H + 4
    return y + ROW_GAP


def _axis(c: Canvas, top: int, bottom: int) -> None:
    x0 = MARGIN + LABEL_W
    c.rect(x0 - 1, top, 1, bottom - top, BLACK)  # left of the bars, which start at x0
    for y in range(top, bottom, 6):  # the anchor: ratio 1, dashed
        c.rect(x0 + bar_length(1.0), y, 2, 3, GREY)


def render(result: dict) -> bytes:
    rows = [(p, f) for p in result["placements"] for f in FIGURES]
    pods = result["rss"]["pods"]
    height = 140 + LINE_H + len(result["placements"]) * (LINE_H * 2) \
        + len(rows) * (len(MESHES) * (BAR_H + 4) + ROW_GAP) + LINE_H * 3 + len(pods) * (BAR_H + 4 + ROW_GAP) + MARGIN
    c = Canvas(WIDTH, height)
    y = MARGIN
    c.text(MARGIN, y, f"nodeagent bench mesh: ratio to an Envoy sidecar pair (= 1, dashed), "
                      f"median of {result['rounds']} rounds", scale=2)
    y += LINE_H
    c.text(MARGIN, y, "lower is better for latency, CPU, memory; higher for rates.", GREY)
    y += LINE_H
    x = MARGIN
    for key in MESHES:
        c.rect(x, y, 14, 14, COLOURS[key])
        x = c.text(x + 20, y, NAMES[key]) + LEGEND_GAP
    y += LINE_H * 2
    for placement, summary in result["placements"].items():
        c.text(MARGIN, y, PLACEMENTS[placement])
        y += LINE_H
        top = y
        for f in FIGURES:
            label = ("added " if f.added else "") + f.label
            y = _bars_row(c, y, label, [(m, summary["ratio"][m][f.key]) for m in MESHES])
        _axis(c, top - 4, y - ROW_GAP)
        y += LINE_H
    c.text(MARGIN, y, f"memory per node: agent + waypoint against one sidecar per pod "
                      f"({result['rss']['sidecar_mib']:.0f} MiB each)")
    y += LINE_H
    top = y
    for count, row in pods.items():
        c.text(MARGIN, y + 4, f"{count} meshed pods per node ({row['nodeagent_mib']:.0f} vs "
                              f"{row['sidecars_mib']:.0f} MiB)")
        c.rect(MARGIN + LABEL_W, y, bar_length(row["ratio"]), BAR_H, COLOURS["rss"])
        c.text(MARGIN + LABEL_W + bar_length(row["ratio"]) + 6, y, f"x{row['ratio']:.2f}")
        y += BAR_H + 4 + ROW_GAP
    _axis(c, top - 4, y - ROW_GAP)
    c.crop(y + MARGIN)
    return png(c)
