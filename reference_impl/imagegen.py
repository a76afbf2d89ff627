"""Synthetic dental images: radiographs and intraoral photos made with Pillow.

Each kind a clinic keeps has its real dimensions and format: a panoramic is a
~2900 px wide grayscale JPEG of 1-3 MB, an intraoral photo a colour JPEG.
An image is drawn as a structure (jaw arch, teeth, bone, soft tissue), then
given low-frequency mottle and per-pixel grain from a ``random.Random``
stream, so it encodes to a realistic size instead of a flat grey that
compresses to nothing. The same generator state gives the same bytes.

The drawings are plausible at a glance, not anatomy: they exist to give the
benchmarks files of the right weight and texture.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageChops, ImageDraw, ImageFilter

#: Smallest side an image is drawn at, whatever the scale.
MIN_SIDE_PX = 32


@dataclass(frozen=True)
class Kind:
    """One kind of clinical image at full scale."""

    name: str
    width_px: int
    height_px: int
    mode: str
    format: str
    quality: int
    #: Half-range of the per-pixel grain added to the drawing (0-255 scale).
    grain: int
    #: Half-range of the low-frequency mottle (bone texture, exposure).
    mottle: int
    label: str

    @property
    def mime_type(self) -> str:
        return "image/png" if self.format == "PNG" else "image/jpeg"

    @property
    def extension(self) -> str:
        return ".png" if self.format == "PNG" else ".jpg"


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("panoramic", 2880, 1440, "L", "JPEG", 92, 18, 14, "panoramic radiograph"),
        Kind("bitewing", 1640, 1256, "L", "JPEG", 93, 10, 12, "bitewing radiograph"),
        Kind("periapical", 1256, 1640, "L", "PNG", 0, 5, 16, "periapical radiograph"),
        Kind(
            "cephalometric", 2700, 2200, "L", "JPEG", 92, 16, 14, "lateral cephalogram"
        ),
        Kind(
            "intraoral-photo", 3000, 2000, "RGB", "JPEG", 90, 8, 10, "intraoral photo"
        ),
    )
}


@dataclass(frozen=True)
class GeneratedImage:
    """An encoded image file and what a database row says about it."""

    kind: str
    data: bytes
    width_px: int
    height_px: int
    mime_type: str
    extension: str

    @property
    def size_bytes(self) -> int:
        return len(self.data)


def kind_of(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        known = ", ".join(KINDS)
        raise ValueError(f"unknown image kind {name!r} (known: {known})") from None


# -- texture ---------------------------------------------------------------


def _noise(rng: random.Random, mode: str, size: tuple[int, int]) -> Image.Image:
    bands = len(mode)
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * bands))


def _add_centred(
    image: Image.Image, noise: Image.Image, half_range: int
) -> Image.Image:
    """``image + noise`` where noise bytes 0..255 map to -half_range..+half_range."""
    if half_range <= 0:
        return image
    scaled = noise.point(
        [round(v * 2 * half_range / 255) for v in range(256)] * len(noise.mode)
    )
    return ImageChops.add(image, scaled, scale=1.0, offset=-half_range)


def _texture(image: Image.Image, rng: random.Random, kind: Kind) -> Image.Image:
    """Mottle (coarse, smooth) and grain (per pixel) on top of a drawing."""
    w, h = image.size
    cell = max(8, w // 120)
    coarse = _noise(rng, image.mode, (max(2, w // cell), max(2, h // cell)))
    mottle = coarse.resize((w, h), Image.Resampling.BICUBIC)
    image = _add_centred(image, mottle, kind.mottle)
    # Grain is luminance only, in colour too: a camera at low ISO shows
    # little chroma noise, and one band of noise is a third of the work.
    grain = _noise(rng, "L", (w, h)).filter(ImageFilter.GaussianBlur(0.6))
    if image.mode != "L":
        grain = Image.merge(image.mode, [grain] * len(image.mode))
    # Exposure differs from one shot to the next, and so does the file size.
    dose = rng.uniform(0.8, 1.2)
    return _add_centred(image, grain, round(kind.grain * 3 * dose))


# -- drawings --------------------------------------------------------------

# Mesio-distal widths of the teeth of a quadrant, central incisor to third
# molar, relative to a first molar.
TOOTH_WIDTHS = (0.78, 0.62, 0.7, 0.66, 0.66, 1.0, 0.95, 0.88)

# Half-width of a crown (as a fraction of half the tooth's width) at depths
# from the biting edge (as a fraction of the crown's height).
CROWN_PROFILE = ((0.0, 0.72), (0.12, 0.92), (0.45, 1.0), (0.8, 0.9), (1.0, 0.78))

Point = tuple[float, float]


def _outline(x: float, y: Callable[[float], float], profile) -> list[Point]:
    """A closed outline symmetric about ``x`` from (depth, half-width) pairs."""
    left = [(x - hw, y(d)) for d, hw in profile]
    right = [(x + hw, y(d)) for d, hw in reversed(profile)]
    return left + right


def _tooth(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    x: float,
    y_edge: float,
    direction: int,
    width: float,
    crown: float,
    root: float,
    roots: int,
    pdl: float = 0.0,
) -> None:
    """One tooth whose biting edge is at ``y_edge``; ``direction`` +1 grows down.

    Enamel cap over dentin, a pulp chamber and a canal per root; ``pdl`` > 0
    draws the periodontal ligament (dark) and lamina dura (bright) around
    the roots, as a periapical shows them.
    """

    def y(depth: float) -> float:
        return y_edge + direction * depth

    half = width / 2
    dentin = rng.randint(160, 182)
    root_shapes = []
    for i in range(roots):
        spread = (i - (roots - 1) / 2) * 0.9 * half
        rx = x + spread
        top = half * (0.72 if roots == 1 else 0.4)
        length = root * rng.uniform(0.88, 1.04)
        bend = rng.uniform(-0.15, 0.15) * half + spread * 0.25
        shape = [
            (0.0, top),
            (0.35 * length, top * 0.82),
            (0.75 * length, top * 0.5),
            (length, top * 0.14),
        ]
        root_shapes.append((rx, bend, shape, length))
    for margin, fill in ((2 * pdl, 128), (pdl, 62)) if pdl else ():
        for rx, bend, shape, _ in root_shapes:
            grown = [(d, hw + margin) for d, hw in shape[:-1]]
            grown.append((shape[-1][0] + margin, shape[-1][1] + margin))
            draw.polygon(
                _bent(
                    _outline(rx, lambda d: y(crown + d), grown),
                    x,
                    y(crown),
                    bend,
                    direction,
                    root,
                ),
                fill=fill,
            )
    for rx, bend, shape, length in root_shapes:
        draw.polygon(
            _bent(
                _outline(rx, lambda d: y(crown + d), shape),
                x,
                y(crown),
                bend,
                direction,
                root,
            ),
            fill=dentin,
        )
        canal = [(0.0, half * 0.09), (0.95 * length, half * 0.03)]
        draw.polygon(
            _bent(
                _outline(rx, lambda d: y(crown + d), canal),
                x,
                y(crown),
                bend,
                direction,
                root,
            ),
            fill=dentin - rng.randint(38, 52),
        )
    profile = [(d * crown, hw * half) for d, hw in CROWN_PROFILE]
    draw.polygon(_outline(x, y, profile), fill=rng.randint(214, 232))
    core = [
        (crown * 0.32, half * 0.55),
        (crown * 0.7, half * 0.66),
        (crown, half * 0.7),
    ]
    draw.polygon(_outline(x, y, core), fill=dentin)
    chamber_top, chamber_bottom = sorted((y(crown * 0.55), y(crown * 1.08)))
    draw.ellipse(
        (x - half * 0.3, chamber_top, x + half * 0.3, chamber_bottom),
        fill=dentin - rng.randint(36, 50),
    )
    roll = rng.random()
    if roll < 0.16:  # a filling on the biting surface
        top, bottom = sorted((y(crown * 0.02), y(crown * rng.uniform(0.3, 0.5))))
        spread = half * rng.uniform(0.35, 0.7)
        draw.rounded_rectangle(
            (x - spread, top, x + spread, bottom), radius=spread * 0.4, fill=252
        )
    elif roll < 0.24:  # caries: a dark notch under a contact
        side = rng.choice((-1, 1))
        cy = y(crown * rng.uniform(0.25, 0.55))
        r = width * rng.uniform(0.06, 0.12)
        cx = x + side * half * 0.85
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rng.randint(80, 110))


def _bent(
    points: list[Point], x0: float, y0: float, bend: float, direction: int, span: float
) -> list[Point]:
    """Shift points sideways in proportion to their depth below ``y0``."""
    return [(px + bend * abs(py - y0) / max(span, 1.0), py) for px, py in points]


def _arch_row(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    x0: float,
    x1: float,
    edge: Callable[[float], float],
    direction: int,
    scale: float,
) -> None:
    """Sixteen teeth of one jaw side by side from x0 to x1 (third molars outside)."""
    widths = [*reversed(TOOTH_WIDTHS), *TOOTH_WIDTHS]
    unit = (x1 - x0) / sum(widths)
    x = x0
    for i, rel in enumerate(widths):
        w = rel * unit
        position = min(i, 15 - i)  # 0 = third molar ... 7 = central incisor
        missing = rng.random() < (0.45 if position == 0 else 0.04)
        if not missing:
            molar = position <= 2
            roots = 2 if molar else 1
            _tooth(
                draw,
                rng,
                x + w / 2,
                edge(x + w / 2),
                direction,
                w * 0.97,
                scale * (0.095 if molar else 0.105),
                scale * (0.16 if molar else 0.2),
                roots,
            )
        x += w


def _mirrored(points: list[Point], w: int, h: int) -> tuple[list[Point], list[Point]]:
    left = [(u * w, v * h) for u, v in points]
    right = [((1 - u) * w, v * h) for u, v in points]
    return left, right


# Half a mandible in a panoramic, (x, y) as fractions of the image: the lower
# border from the chin to the condyle, then back along the ramus and the
# alveolar crest.
MANDIBLE_HALF = (
    (0.5, 0.97),
    (0.38, 0.955),
    (0.26, 0.91),
    (0.17, 0.84),
    (0.115, 0.75),
    (0.1, 0.58),
    (0.11, 0.36),
    (0.125, 0.17),
    (0.155, 0.15),
    (0.165, 0.24),
    (0.19, 0.2),
    (0.205, 0.22),
    (0.215, 0.36),
    (0.24, 0.5),
    (0.3, 0.57),
    (0.5, 0.6),
)


def _panoramic(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("L", size, 22)
    d = ImageDraw.Draw(img)
    d.ellipse((0.05 * w, -0.2 * h, 0.95 * w, 0.78 * h), fill=58)
    d.ellipse((0.17 * w, 0.2 * h, 0.83 * w, 0.62 * h), fill=92)  # maxilla
    for x in (0.31, 0.69):  # maxillary sinuses
        d.ellipse(((x - 0.1) * w, 0.12 * h, (x + 0.1) * w, 0.3 * h), fill=46)
    d.ellipse((0.42 * w, 0.08 * h, 0.58 * w, 0.3 * h), fill=34)  # nasal cavity
    d.line([(0.5 * w, 0.08 * h), (0.5 * w, 0.3 * h)], fill=96, width=max(1, w // 300))
    for half in _mirrored(list(MANDIBLE_HALF), w, h):
        d.polygon(half, fill=rng.randint(106, 116))
    for u in (0.14, 0.86):  # condyles
        d.ellipse(((u - 0.022) * w, 0.1 * h, (u + 0.022) * w, 0.19 * h), fill=120)
    # Airway and tongue shadow across the rami.
    d.arc(
        (0.12 * w, 0.12 * h, 0.88 * w, 0.7 * h),
        200,
        340,
        fill=72,
        width=max(1, int(0.025 * h)),
    )
    for box in ((0.13, 0.5), (0.5, 0.87)):  # mandibular canals
        d.arc(
            (box[0] * w, 0.3 * h, box[1] * w, 0.86 * h),
            15,
            165,
            fill=82,
            width=max(1, int(0.01 * h)),
        )

    def occlusal(x: float) -> float:
        u = (x - w / 2) / (0.32 * w)
        return h * (0.52 + 0.05 * (1 - u * u))

    gap = 0.01 * h
    _arch_row(d, rng, 0.2 * w, 0.8 * w, lambda x: occlusal(x) - gap, -1, h)
    _arch_row(d, rng, 0.215 * w, 0.785 * w, lambda x: occlusal(x) + gap, 1, h)
    img = img.filter(ImageFilter.GaussianBlur(max(1.0, 0.0018 * w)))
    # The spine's ghost: a soft lighter band down the middle.
    ghost = Image.new("L", size, 0)
    ImageDraw.Draw(ghost).rectangle((0.45 * w, 0, 0.55 * w, h), fill=30)
    ghost = ghost.filter(ImageFilter.GaussianBlur(0.03 * w))
    return ImageChops.add(img, ghost)


def _bitewing(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("L", size, 44)
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, w, 0.22 * h), fill=94)  # alveolar bone above and below
    d.rectangle((0, 0.78 * h, w, h), fill=98)
    tilt = rng.uniform(-0.04, 0.04) * h
    widths = [rng.choice((0.66, 0.7)), 0.66, 1.0, 0.95, 0.88]
    unit = 1.05 * w / sum(widths)
    for direction in (-1, 1):
        x = -0.06 * w + rng.uniform(-0.03, 0.03) * w
        for rel in widths:
            tw = rel * unit
            cx = x + tw / 2
            edge = h / 2 + tilt * (cx / w - 0.5) + direction * 0.01 * h
            roots = 2 if rel > 0.8 else 1
            _tooth(d, rng, cx, edge, direction, tw * 0.97, 0.26 * h, 0.34 * h, roots)
            x += tw
    img = img.filter(ImageFilter.GaussianBlur(max(1.0, 0.0025 * w)))
    return _sensor_corners(img, 0.06)


def _periapical(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("L", size, 98)
    d = ImageDraw.Draw(img)
    direction = rng.choice((-1, 1))
    edge = 0.03 * h if direction == 1 else 0.97 * h
    soft = (0, 0, w, 0.2 * h) if direction == 1 else (0, 0.8 * h, w, h)
    d.rectangle(soft, fill=42)
    count = rng.choice((2, 3, 3))
    tw = w / (count + 0.3)
    for i in range(count):
        cx = (i + 0.65) * tw + rng.uniform(-0.03, 0.03) * w
        _tooth(
            d,
            rng,
            cx,
            edge,
            direction,
            tw * 0.9,
            0.28 * h,
            0.55 * h,
            rng.choice((1, 1, 2)),
            pdl=max(1.0, 0.006 * w),
        )
    img = img.filter(ImageFilter.GaussianBlur(max(1.0, 0.0018 * w)))
    return _sensor_corners(img, 0.07)


def _sensor_corners(img: Image.Image, fraction: float) -> Image.Image:
    """Dark rounded corners, as a digital intraoral sensor leaves them."""
    w, h = img.size
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).rounded_rectangle(
        (0, 0, w - 1, h - 1), radius=int(min(w, h) * fraction), fill=255
    )
    return Image.composite(img, Image.new("L", img.size, 8), mask)


def _cephalometric(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("L", size, 20)
    d = ImageDraw.Draw(img)
    nose = rng.uniform(0.9, 0.95)
    # Soft-tissue profile: forehead, nose, lips, chin.
    d.polygon(
        [
            (0.35 * w, 0),
            (0.8 * w, 0),
            (0.82 * w, 0.3 * h),
            (nose * w, 0.48 * h),
            (0.83 * w, 0.55 * h),
            (0.86 * w, 0.63 * h),
            (0.82 * w, 0.7 * h),
            (0.84 * w, 0.78 * h),
            (0.78 * w, 0.9 * h),
            (0.55 * w, 0.95 * h),
            (0.35 * w, h),
            (0.1 * w, h),
            (0.05 * w, 0.5 * h),
        ],
        fill=52,
    )
    # Cranial vault: a bright cortical ring; orbit; sella turcica.
    d.ellipse((0.05 * w, -0.25 * h, 0.78 * w, 0.55 * h), fill=128)
    d.ellipse((0.08 * w, -0.21 * h, 0.75 * w, 0.51 * h), fill=84)
    d.ellipse(
        (0.58 * w, 0.22 * h, 0.7 * w, 0.36 * h),
        outline=140,
        width=max(1, int(0.008 * w)),
    )
    d.chord(
        (0.36 * w, 0.35 * h, 0.42 * w, 0.43 * h),
        0,
        180,
        fill=46,
        outline=150,
        width=max(1, int(0.005 * w)),
    )
    # Maxilla and mandible.
    d.polygon(
        [
            (0.5 * w, 0.5 * h),
            (0.78 * w, 0.5 * h),
            (0.76 * w, 0.62 * h),
            (0.55 * w, 0.6 * h),
        ],
        fill=118,
    )
    d.polygon(
        [
            (0.4 * w, 0.46 * h),
            (0.45 * w, 0.47 * h),
            (0.47 * w, 0.66 * h),
            (0.7 * w, 0.68 * h),
            (0.75 * w, 0.8 * h),
            (0.7 * w, 0.86 * h),
            (0.5 * w, 0.82 * h),
            (0.42 * w, 0.75 * h),
        ],
        fill=122,
    )
    for i in range(5):  # upper and lower teeth, side on
        x = 0.58 * w + i * 0.035 * w
        _tooth(d, rng, x, 0.635 * h, -1, 0.034 * w, 0.05 * h, 0.07 * h, 1)
        _tooth(d, rng, x - 0.01 * w, 0.655 * h, 1, 0.034 * w, 0.05 * h, 0.08 * h, 1)
    for i in range(5):  # cervical vertebrae
        top = (0.55 + i * 0.09) * h
        d.rounded_rectangle(
            (0.26 * w, top, 0.36 * w, top + 0.07 * h),
            radius=int(0.01 * w),
            fill=rng.randint(112, 130),
        )
    # The nasion relator's ruler, with millimetre ticks.
    d.rectangle((0.86 * w, 0.05 * h, 0.88 * w, 0.4 * h), fill=170)
    step = max(2, int(0.0075 * h))
    for i, y in enumerate(range(int(0.05 * h), int(0.4 * h), step)):
        length = 0.02 if i % 10 == 0 else 0.01
        d.line([(0.86 * w, y), ((0.86 - length) * w, y)], fill=210)
    return img.filter(ImageFilter.GaussianBlur(max(1.0, 0.0018 * w)))


def _intraoral_photo(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, (196, 138, 124))  # skin and retractors
    d = ImageDraw.Draw(img)
    d.ellipse((0.03 * w, 0.06 * h, 0.97 * w, 0.94 * h), fill=(150, 58, 62))  # lips
    d.ellipse((0.07 * w, 0.12 * h, 0.93 * w, 0.88 * h), fill=(64, 20, 26))
    gum = (rng.randint(200, 222), rng.randint(102, 122), rng.randint(112, 128))
    d.ellipse((0.1 * w, 0.13 * h, 0.9 * w, 0.56 * h), fill=gum)
    d.ellipse((0.14 * w, 0.5 * h, 0.86 * w, 0.86 * h), fill=gum)
    d.rectangle((0.12 * w, 0.475 * h, 0.88 * w, 0.525 * h), fill=(58, 16, 22))
    for row, (top, bottom, span) in enumerate(((0.22, 0.5, 0.78), (0.5, 0.75, 0.66))):
        widths = [1.0 - abs(i - 4.5) * 0.13 for i in range(10)]
        unit = span * w / sum(widths)
        x = (1 - span) / 2 * w
        for rel in widths:
            tw = rel * unit
            sag = (1 - rel) * 0.08 * h
            t, b = (
                (top * h + sag, bottom * h) if row == 0 else (top * h, bottom * h - sag)
            )
            if row == 1:
                b -= 0.03 * h * rel
            shade = rng.randint(-14, 8) - round((1 - rel) * 40)
            base = (226 + shade, 214 + shade, 186 + shade)
            d.rounded_rectangle(
                (x + tw * 0.03, t, x + tw * 0.97, b), radius=int(tw * 0.28), fill=base
            )
            inset = tw * 0.16
            d.rounded_rectangle(
                (x + inset, t + (b - t) * 0.08, x + tw - inset, b - (b - t) * 0.1),
                radius=int(tw * 0.22),
                fill=tuple(min(255, c + 14) for c in base),
            )
            gum_line = t if row == 0 else b
            d.ellipse(
                (x + tw * 0.1, gum_line - 0.02 * h, x + tw * 0.9, gum_line + 0.02 * h),
                fill=gum,
            )  # gingival margin
            hx = x + tw * rng.uniform(0.3, 0.55)
            hy = t + (b - t) * rng.uniform(0.3, 0.5)
            d.ellipse(
                (hx, hy, hx + tw * 0.1, hy + (b - t) * 0.08), fill=(252, 250, 245)
            )
            x += tw
    return img.filter(ImageFilter.GaussianBlur(max(1.0, 0.002 * w)))


DRAWINGS: dict[str, Callable[[tuple[int, int], random.Random], Image.Image]] = {
    "panoramic": _panoramic,
    "bitewing": _bitewing,
    "periapical": _periapical,
    "cephalometric": _cephalometric,
    "intraoral-photo": _intraoral_photo,
}


# -- public API ------------------------------------------------------------


def scaled_size(kind: str, scale: float) -> tuple[int, int]:
    spec = kind_of(kind)
    if scale <= 0:
        raise ValueError(f"scale={scale} must be greater than 0")
    return (
        max(MIN_SIDE_PX, round(spec.width_px * scale)),
        max(MIN_SIDE_PX, round(spec.height_px * scale)),
    )


def encode(image: Image.Image, spec: Kind) -> bytes:
    out = io.BytesIO()
    if spec.format == "PNG":
        image.save(out, format="PNG", compress_level=6)
    else:
        image.save(out, format="JPEG", quality=spec.quality, optimize=True)
    return out.getvalue()


def generate(kind: str, rng: random.Random, scale: float = 1.0) -> GeneratedImage:
    """Draw, texture and encode one image of ``kind`` at ``scale`` of full size."""
    spec = kind_of(kind)
    size = scaled_size(kind, scale)
    # The drawing is smooth (blurred), so it is drawn at half size and scaled
    # up: a quarter of the pixels to draw and blur, the same look.
    half = (max(MIN_SIDE_PX, size[0] // 2), max(MIN_SIDE_PX, size[1] // 2))
    drawing = DRAWINGS[kind](half, rng).resize(size, Image.Resampling.BICUBIC)
    image = _texture(drawing, rng, spec)
    return GeneratedImage(
        kind=kind,
        data=encode(image, spec),
        width_px=size[0],
        height_px=size[1],
        mime_type=spec.mime_type,
        extension=spec.extension,
    )


def make_image(kind: str, rng: random.Random, scale: float = 1.0) -> bytes:
    """The encoded file bytes of one image of ``kind`` (see :data:`KINDS`)."""
    return generate(kind, rng, scale).data


def generate_of_size(
    target_bytes: int, rng: random.Random, kind: str = "panoramic"
) -> GeneratedImage:
    """An image of ``kind`` whose encoded size is within ~10% of ``target_bytes``.

    The kind's aspect ratio and texture are kept and its dimensions scaled:
    the encoded size grows with the pixel count, so a probe at full scale
    gives the scale to draw at, and up to three corrections refine it. A
    target below what a ``MIN_SIDE_PX`` image encodes to cannot be reached;
    the smallest image is returned then.
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes={target_bytes} must be greater than 0")
    seed = rng.getrandbits(64)
    scale = 1.0
    best: GeneratedImage | None = None
    probe = generate(kind, random.Random(seed), 0.25)
    scale = 0.25 * math.sqrt(target_bytes / probe.size_bytes)
    for _ in range(4):
        image = generate(kind, random.Random(seed), scale)
        if best is None or abs(image.size_bytes - target_bytes) < abs(
            best.size_bytes - target_bytes
        ):
            best = image
        if abs(image.size_bytes - target_bytes) <= 0.04 * target_bytes:
            break
        scale *= math.sqrt(target_bytes / image.size_bytes)
    assert best is not None
    return best


def make_image_of_size(
    target_bytes: int, rng: random.Random, kind: str = "panoramic"
) -> bytes:
    """Encoded bytes of a real, decodable image of about ``target_bytes``."""
    return generate_of_size(target_bytes, rng, kind).data
