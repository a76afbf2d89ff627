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
        Kind("bitewing", 1640, 1256, "L", "JPEG", 95, 14, 12, "bitewing radiograph"),
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
    grain = _noise(rng, image.mode, (w, h)).filter(ImageFilter.GaussianBlur(0.6))
    return _add_centred(image, grain, kind.grain * 3)


# -- drawings --------------------------------------------------------------

# Mesio-distal widths of the teeth of a quadrant, central incisor to third
# molar, relative to a molar.
TOOTH_WIDTHS = (0.78, 0.62, 0.7, 0.66, 0.66, 1.0, 0.95, 0.88)


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
) -> None:
    """One tooth whose biting edge is at ``y_edge``; ``direction`` +1 grows down."""

    def y(depth: float) -> float:
        return y_edge + direction * depth

    cej = y(crown)
    half = width / 2
    for i in range(roots):
        offset = (i - (roots - 1) / 2) * width / max(roots, 1) * 0.8
        rx = x + offset
        rw = width / roots * 0.42
        tip = y(crown + root * rng.uniform(0.85, 1.05))
        bend = rng.uniform(-0.12, 0.12) * width
        draw.polygon(
            [
                (rx - rw, cej),
                (rx + rw, cej),
                (rx + rw * 0.25 + bend, tip),
                (rx - rw * 0.25 + bend, tip),
            ],
            fill=rng.randint(165, 185),
        )
        canal = rw * 0.22
        draw.polygon(
            [(rx - canal, cej), (rx + canal, cej), (rx + bend, tip)],
            fill=rng.randint(105, 125),
        )
    top, bottom = sorted((y_edge, cej))
    draw.rounded_rectangle(
        (x - half, top, x + half, bottom),
        radius=max(1, width * 0.3),
        fill=rng.randint(212, 232),
    )
    pulp_top, pulp_bottom = sorted((y(crown * 0.45), y(crown * 1.05)))
    draw.ellipse(
        (x - half * 0.35, pulp_top, x + half * 0.35, pulp_bottom),
        fill=rng.randint(120, 140),
    )
    roll = rng.random()
    if roll < 0.18:  # a filling on the biting surface
        fill_top, fill_bottom = sorted(
            (y(crown * 0.02), y(crown * rng.uniform(0.3, 0.5)))
        )
        draw.ellipse(
            (
                x - half * rng.uniform(0.4, 0.8),
                fill_top,
                x + half * rng.uniform(0.4, 0.8),
                fill_bottom,
            ),
            fill=252,
        )
    elif roll < 0.26:  # caries: a dark notch at a contact
        side = rng.choice((-1, 1))
        cy = y(crown * rng.uniform(0.25, 0.6))
        r = width * rng.uniform(0.08, 0.16)
        cx = x + side * half * 0.8
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rng.randint(70, 100))


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
            _tooth(
                draw,
                rng,
                x + w / 2,
                edge(x + w / 2),
                direction,
                w * 0.9,
                scale * (0.10 if molar else 0.11),
                scale * (0.17 if molar else 0.2),
                2 if molar else 1,
            )
        x += w


def _panoramic(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("L", size, 22)
    d = ImageDraw.Draw(img)
    d.ellipse((0.04 * w, -0.15 * h, 0.96 * w, 0.8 * h), fill=62)
    # Mandible: a thick U from one condyle to the other.
    d.arc(
        (0.09 * w, -0.45 * h, 0.91 * w, 0.95 * h), 0, 180, fill=112, width=int(0.3 * h)
    )
    for side in (0.13, 0.87):
        d.line(
            [(side * w, 0.62 * h), (side * w, 0.2 * h)], fill=105, width=int(0.09 * w)
        )
        d.ellipse(((side - 0.03) * w, 0.1 * h, (side + 0.03) * w, 0.22 * h), fill=118)
    # Airway and tongue shadow, sinuses, nasal cavity, palate.
    d.arc((0.2 * w, 0.05 * h, 0.8 * w, 0.75 * h), 20, 160, fill=40, width=int(0.04 * h))
    for x in (0.3, 0.7):
        d.ellipse(((x - 0.1) * w, 0.12 * h, (x + 0.1) * w, 0.36 * h), fill=38)
    d.ellipse((0.43 * w, 0.05 * h, 0.57 * w, 0.33 * h), fill=30)
    d.line([(0.26 * w, 0.39 * h), (0.74 * w, 0.39 * h)], fill=150, width=int(0.018 * h))
    # Mandibular canals.
    for box in ((0.12, 0.48), (0.52, 0.88)):
        d.arc(
            (box[0] * w, 0.25 * h, box[1] * w, 0.8 * h),
            10,
            170,
            fill=80,
            width=max(1, int(0.012 * h)),
        )

    def occlusal(x: float) -> float:
        u = (x - w / 2) / (0.32 * w)
        return h * (0.53 + 0.05 * (1 - u * u))

    gap = 0.012 * h
    _arch_row(d, rng, 0.18 * w, 0.82 * w, lambda x: occlusal(x) - gap, -1, h)
    _arch_row(d, rng, 0.2 * w, 0.8 * w, lambda x: occlusal(x) + gap, 1, h)
    img = img.filter(ImageFilter.GaussianBlur(max(1.0, 0.0022 * w)))
    # The spine's ghost: a soft lighter band down the middle.
    ghost = Image.new("L", size, 0)
    ImageDraw.Draw(ghost).rectangle((0.45 * w, 0, 0.55 * w, h), fill=34)
    ghost = ghost.filter(ImageFilter.GaussianBlur(0.03 * w))
    return ImageChops.add(img, ghost)


def _bitewing(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("L", size, 18)
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, w, 0.3 * h), fill=92)
    d.rectangle((0, 0.7 * h, w, h), fill=96)
    d.rectangle((0, 0.3 * h, w, 0.7 * h), fill=48)
    tilt = rng.uniform(-0.04, 0.04) * h
    widths = [rng.choice((0.66, 0.7)), 0.66, 1.0, 0.95, 0.88]
    unit = 1.05 * w / sum(widths)
    for direction in (-1, 1):
        x = -0.06 * w + rng.uniform(-0.03, 0.03) * w
        for rel in widths:
            tw = rel * unit
            cx = x + tw / 2
            edge = h / 2 + tilt * (cx / w - 0.5) + direction * 0.012 * h
            molar = rel > 0.8
            _tooth(
                d,
                rng,
                cx,
                edge,
                direction,
                tw * 0.92,
                0.26 * h,
                0.3 * h,
                2 if molar else 1,
            )
            x += tw
    img = img.filter(ImageFilter.GaussianBlur(max(1.0, 0.003 * w)))
    return _sensor_corners(img, 0.06)


def _periapical(size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    img = Image.new("L", size, 96)
    d = ImageDraw.Draw(img)
    direction = rng.choice((-1, 1))
    edge = 0.02 * h if direction == 1 else 0.98 * h
    soft = (0, 0, w, 0.12 * h) if direction == 1 else (0, 0.88 * h, w, h)
    d.rectangle(soft, fill=40)
    count = rng.choice((2, 3, 3))
    tw = w / (count + 0.4)
    for i in range(count):
        cx = (i + 0.7) * tw + rng.uniform(-0.04, 0.04) * w
        # Periodontal ligament: a dark rim around the root, drawn first.
        rim = tw * 0.34
        cej = edge + direction * 0.3 * h
        tip = edge + direction * 0.85 * h
        d.polygon(
            [
                (cx - rim, cej),
                (cx + rim, cej),
                (cx + rim * 0.3, tip),
                (cx - rim * 0.3, tip),
            ],
            fill=70,
        )
        _tooth(
            d,
            rng,
            cx,
            edge,
            direction,
            tw * 0.82,
            0.3 * h,
            0.52 * h,
            rng.choice((1, 1, 2)),
        )
    img = img.filter(ImageFilter.GaussianBlur(max(1.0, 0.002 * w)))
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
    # Cranial vault: a bright cortical ring.
    d.ellipse((0.05 * w, -0.25 * h, 0.78 * w, 0.55 * h), fill=128)
    d.ellipse((0.08 * w, -0.21 * h, 0.75 * w, 0.51 * h), fill=84)
    d.ellipse(
        (0.58 * w, 0.22 * h, 0.7 * w, 0.36 * h),
        outline=140,
        width=max(1, int(0.008 * w)),
    )  # orbit
    d.ellipse(
        (0.36 * w, 0.36 * h, 0.42 * w, 0.42 * h),
        fill=46,
        outline=150,
        width=max(1, int(0.005 * w)),
    )  # sella turcica
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
    for i in range(5):  # upper and lower incisors and molars, side on
        x = 0.58 * w + i * 0.035 * w
        _tooth(d, rng, x, 0.635 * h, -1, 0.03 * w, 0.05 * h, 0.07 * h, 1)
        _tooth(d, rng, x - 0.01 * w, 0.655 * h, 1, 0.03 * w, 0.05 * h, 0.08 * h, 1)
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
    img = Image.new("RGB", size, (198, 132, 120))
    d = ImageDraw.Draw(img)
    d.ellipse((0.04 * w, 0.08 * h, 0.96 * w, 0.92 * h), fill=(70, 22, 28))
    gum = (rng.randint(200, 225), rng.randint(100, 125), rng.randint(110, 130))
    d.ellipse((0.08 * w, 0.1 * h, 0.92 * w, 0.55 * h), fill=gum)
    d.ellipse((0.12 * w, 0.5 * h, 0.88 * w, 0.88 * h), fill=gum)
    d.rectangle((0.1 * w, 0.47 * h, 0.9 * w, 0.53 * h), fill=(60, 18, 24))
    for row, (top, bottom, span) in enumerate(((0.2, 0.5, 0.78), (0.5, 0.76, 0.66))):
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
                b -= 0.04 * h * rel
            shade = rng.randint(-14, 10)
            d.rounded_rectangle(
                (x + tw * 0.04, t, x + tw * 0.96, b),
                radius=int(tw * 0.25),
                fill=(232 + shade, 222 + shade, 196 + shade),
            )
            hx = x + tw * rng.uniform(0.3, 0.6)
            hy = t + (b - t) * rng.uniform(0.3, 0.6)
            d.ellipse(
                (hx, hy, hx + tw * 0.12, hy + (b - t) * 0.1), fill=(252, 250, 245)
            )
            x += tw
    return img.filter(ImageFilter.GaussianBlur(max(1.0, 0.0025 * w)))


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
    image = _texture(DRAWINGS[kind](size, rng), rng, spec)
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
