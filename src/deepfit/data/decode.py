"""Encoded image bytes -> uint8 (C, H, W): header checks (decompression bombs), batched
torchvision.io JPEG decoding, PIL for every other format, channel conversion and resizing."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from deepfit.errors import DataError

MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)  # PIL's bomb limit: width * height above this is refused
JPEG_BATCH = 512  # files per batched decode_jpeg call
SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}  # grey PNGs and TIFFs of 16 bits a pixel
GREY_MODES = {"1", "L", "LA", "I", "F", "La", *SIXTEEN_BIT}
# JPEG start-of-frame markers carry the dimensions (all 0xC0..0xCF except DHT, JPG, DAC)
SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class Header:
    """What an image file says about itself before it is decoded."""

    height: int
    width: int
    channels: int  # 1 for grey modes, 3 otherwise
    jpeg: bool


def is_jpeg(data: bytes | memoryview) -> bool:
    return bytes(data[:3]) == b"\xff\xd8\xff"


def jpeg_header(data: bytes | memoryview) -> Header | None:
    """Walk the JPEG marker segments to the start-of-frame; None when there is none."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in SOF_MARKERS:
            if i + 10 > n:
                return None
            height, width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            return Header(height, width, 1 if data[i + 9] == 1 else 3, jpeg=True)
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        else:
            i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def read_header(data: bytes | memoryview) -> Header:
    """Dimensions and channels from the header alone; refuses bombs and non-images (DataError)."""
    header = jpeg_header(data) if is_jpeg(data) else None
    if header is None:
        header = pil_header(data)
    if header.height * header.width > MAX_PIXELS:
        raise DataError(f"decompression bomb refused: {header.width}x{header.height} pixels is over the {MAX_PIXELS} limit")
    if header.height == 0 or header.width == 0:
        raise DataError("image has no pixels (0 width or height)")
    return header


def pil_header(data: bytes | memoryview) -> Header:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                mode = image.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"decompression bomb refused: {err}") from None
    except UnidentifiedImageError:
        raise DataError("not an image (format not recognised)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"unreadable image header ({err})") from None
    return Header(height, width, 1 if mode in GREY_MODES else 3, jpeg=False)


def decode_pil(data: bytes | memoryview, channels: int) -> torch.Tensor:
    """Any PIL format (GIF: first frame), any mode -> uint8 (channels, H, W); alpha over white."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.seek(0)
            opened.load()
            image: Image.Image = eight_bit(opened)
            if "A" in image.getbands() or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            converted = image.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataError(f"corrupt or truncated image ({err})") from None
    array = torch.frombuffer(bytearray(converted.tobytes()), dtype=torch.uint8)
    return array.view(converted.height, converted.width, channels).permute(2, 0, 1).contiguous()


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit grey (a scan, a microscope's PNG or TIFF) to 8 bits by its top byte, as torchvision
    and OpenCV read it; PIL's own convert("L") clips at 255, which turned such images white."""
    if image.mode not in SIXTEEN_BIT:
        return image
    pixels = np.asarray(image).astype(np.uint16)  # numbers, whatever the file's byte order
    return Image.fromarray((pixels >> 8).astype(np.uint8))  # mode L


def as_buffer(data: bytes | memoryview) -> torch.Tensor:
    """A uint8 tensor over the bytes (copied once into a writable buffer)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_one(data: bytes | memoryview, channels: int, header: Header) -> torch.Tensor:
    """One file, by torchvision.io when it is a JPEG (PIL if libjpeg refuses it, e.g. CMYK quirks)."""
    if header.jpeg:
        from torchvision.io import ImageReadMode, decode_jpeg  # torchvision loads its model zoo: only when decoding

        mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        try:
            return decode_jpeg(as_buffer(data), mode=mode)
        except RuntimeError as err:
            if "truncated" in str(err) or "incomplete" in str(err):
                raise DataError(f"corrupt or truncated image ({err.args[0].split(', ')[-1]})") from None
    return decode_pil(data, channels)


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, *size), bilinear with antialiasing; unchanged when it already fits."""
    if tuple(image.shape[1:]) == size:
        return image
    from torchvision.transforms.v2 import functional as tvf

    return tvf.resize(image, list(size), antialias=True)


def decode_image(source: str | Path | bytes | memoryview, *, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """An image file or its bytes -> uint8 (channels, H, W) resized to `size`, exactly as training
    decodes it; DataError with the reason for unreadable, corrupt or oversized files."""
    if isinstance(source, (str, Path)):
        try:
            data: bytes | memoryview = Path(source).read_bytes()
        except OSError as err:
            raise DataError(f"{source}: cannot read ({err.strerror})") from None
    else:
        data = source
    name = str(source) if isinstance(source, (str, Path)) else "image bytes"
    try:
        return resize(decode_one(data, channels, read_header(data)), size)
    except DataError as err:
        raise DataError(f"{name}: {err}") from None


def decode_many(
    blobs: Sequence[bytes | memoryview], headers: Sequence[Header], channels: int
) -> tuple[list[torch.Tensor | None], dict[int, str]]:
    """Decode files at their own size: JPEGs in batches through torchvision.io, others by PIL.
    Returns one tensor per file (None where it failed) and {index: reason} for the failures."""
    images: list[torch.Tensor | None] = [None] * len(blobs)
    failures: dict[int, str] = {}
    jpegs = [i for i, h in enumerate(headers) if h.jpeg]
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    for start in range(0, len(jpegs), JPEG_BATCH):
        chunk = jpegs[start : start + JPEG_BATCH]
        try:
            decoded = decode_jpeg([as_buffer(blobs[i]) for i in chunk], mode=mode)
        except RuntimeError:  # one bad file fails the batch: find it file by file
            decode_each(blobs, headers, chunk, channels, images, failures)
            continue
        for i, image in zip(chunk, decoded, strict=True):
            images[i] = image
    decode_each(blobs, headers, [i for i, h in enumerate(headers) if not h.jpeg], channels, images, failures)
    return images, failures


def decode_each(
    blobs: Sequence[bytes | memoryview],
    headers: Sequence[Header],
    indices: Sequence[int],
    channels: int,
    images: list[torch.Tensor | None],
    failures: dict[int, str],
) -> None:
    for i in indices:
        try:
            images[i] = decode_one(blobs[i], channels, headers[i])
        except DataError as err:
            failures[i] = str(err)
