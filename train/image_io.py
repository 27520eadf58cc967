"""Reading image files into uint8 arrays, with or without Pillow.

`read_image(path)` returns a uint8 array [H, W, C], C being 1 (grayscale),
2 (grayscale + alpha), 3 (RGB) or 4 (RGBA). If Pillow is importable it decodes the file;
otherwise this module decodes, with the standard library and NumPy only:

- PNG: 8-bit grayscale, grayscale + alpha, RGB, RGBA; grayscale at 1, 2 or 4 bits (scaled
  to 0..255); palette at 1, 2, 4 or 8 bits (RGB, or RGBA when a tRNS chunk gives
  transparency); non-interlaced; all five row filters; chunk CRCs checked.
- Netpbm: PGM and PPM, ASCII (P2, P3) and binary (P5, P6), maxval up to 255 (values are
  scaled to 0..255 when maxval < 255).

Anything else (JPEG, GIF, BMP, WebP, 16-bit or interlaced PNG, 16-bit PGM/PPM, ...)
raises ValueError naming the file and saying that Pillow would be needed.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np

try:  # Optional: used when present, never required.
  from PIL import Image as _PILImage
except ImportError:  # pragma: no cover - depends on the environment
  _PILImage = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Known signatures of formats only Pillow reads: (prefix, name).
_OTHER_FORMATS = (
  (b"\xff\xd8\xff", "JPEG"),
  (b"GIF87a", "GIF"),
  (b"GIF89a", "GIF"),
  (b"BM", "BMP"),
  (b"II*\x00", "TIFF"),
  (b"MM\x00*", "TIFF"),
  (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
  (b"P1", "PBM (ASCII bitmap)"),
  (b"P4", "PBM (binary bitmap)"),
  (b"P7", "PAM"),
)


def read_image(path: str | os.PathLike) -> np.ndarray:
  """Reads an image file.

  Args:
    path: a PNG, PGM or PPM file (any format Pillow reads if Pillow is installed).

  Returns:
    uint8 [H, W, C] with C = 1 (gray), 2 (gray + alpha), 3 (RGB) or 4 (RGBA).

  Raises:
    ValueError: naming the file, if it cannot be read or decoded.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"read_image: cannot read {path!r}: {e.strerror or e}.") from e
  if _PILImage is not None:
    return _decode_with_pillow(data, path)
  return decode_image(data, path)


def decode_image(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes PNG / PGM / PPM bytes without Pillow (see the module docstring).

  Args:
    data: the file's contents.
    name: the file name to put in error messages.

  Returns:
    uint8 [H, W, C].
  """
  if data.startswith(PNG_SIGNATURE):
    return _decode_png(data, name)
  if data[:2] in (b"P2", b"P3", b"P5", b"P6"):
    return _decode_pnm(data, name)
  fmt = _sniff_other(data)
  if fmt is not None:
    raise ValueError(f"read_image: {name!r} is a {fmt} file; reading it needs Pillow ({_HINT}).")
  raise ValueError(
    f"read_image: {name!r} is not a PNG, PGM or PPM image (unknown format; other formats "
    f"need Pillow: {_HINT})."
  )


_HINT = "pip install Pillow, or convert the images to PNG"


def _sniff_other(data: bytes) -> str | None:
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "WebP"
  for prefix, fmt in _OTHER_FORMATS:
    if data.startswith(prefix):
      return fmt
  return None


def _decode_with_pillow(data: bytes, path: str) -> np.ndarray:  # pragma: no cover
  try:
    with _PILImage.open(io.BytesIO(data)) as img:
      img.load()
      mode = img.mode
      if mode in ("L", "LA", "RGB", "RGBA"):
        pass
      elif mode in ("P", "PA"):
        img = img.convert("RGBA" if ("transparency" in img.info or mode == "PA") else "RGB")
      elif mode == "1":
        img = img.convert("L")
      elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
      else:
        raise ValueError(
          f"read_image: {path!r} has Pillow mode {mode!r} (16-bit or float pixels); "
          "only 8-bit images are supported."
        )
      arr = np.asarray(img, dtype=np.uint8)
  except ValueError:
    raise
  except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, ...
    raise ValueError(
      f"read_image: {path!r} is not an image Pillow can decode ({type(e).__name__})."
    ) from e
  if arr.ndim == 2:
    arr = arr[:, :, None]
  return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------------------
# PNG

# color type -> (name, samples per pixel, allowed bit depths)
_PNG_COLOR_TYPES = {
  0: ("grayscale", 1, (1, 2, 4, 8)),
  2: ("RGB", 3, (8,)),
  3: ("palette", 1, (1, 2, 4, 8)),
  4: ("grayscale+alpha", 2, (8,)),
  6: ("RGBA", 4, (8,)),
}


def _decode_png(data: bytes, name: str) -> np.ndarray:
  pos = len(PNG_SIGNATURE)
  header = None
  palette = None
  trns = None
  idat = []
  while True:
    if pos + 8 > len(data):
      raise ValueError(f"read_image: {name!r}: truncated PNG (no IEND chunk).")
    (length,) = struct.unpack(">I", data[pos : pos + 4])
    ctype = data[pos + 4 : pos + 8]
    end = pos + 12 + length
    if end > len(data):
      raise ValueError(f"read_image: {name!r}: truncated PNG chunk {ctype!r}.")
    body = data[pos + 8 : pos + 8 + length]
    (crc,) = struct.unpack(">I", data[pos + 8 + length : end])
    if zlib.crc32(ctype + body) != crc:
      raise ValueError(f"read_image: {name!r}: corrupted PNG (bad CRC in chunk {ctype!r}).")
    pos = end
    if header is None and ctype != b"IHDR":
      raise ValueError(f"read_image: {name!r}: invalid PNG (first chunk is not IHDR).")
    if ctype == b"IHDR":
      if length != 13:
        raise ValueError(f"read_image: {name!r}: invalid PNG IHDR chunk.")
      header = struct.unpack(">IIBBBBB", body)
    elif ctype == b"PLTE":
      if length % 3:
        raise ValueError(f"read_image: {name!r}: invalid PNG palette.")
      palette = np.frombuffer(body, np.uint8).reshape(-1, 3)
    elif ctype == b"tRNS":
      trns = body
    elif ctype == b"IDAT":
      idat.append(body)
    elif ctype == b"IEND":
      break
  width, height, depth, color, compression, filter_method, interlace = header
  if color not in _PNG_COLOR_TYPES:
    raise ValueError(f"read_image: {name!r}: invalid PNG color type {color}.")
  cname, samples, depths = _PNG_COLOR_TYPES[color]
  if depth == 16 and color != 3:
    raise ValueError(
      f"read_image: {name!r} is a 16-bit {cname} PNG; only 8-bit PNGs are decoded without "
      f"Pillow ({_HINT})."
    )
  if depth not in depths:
    raise ValueError(f"read_image: {name!r}: invalid PNG bit depth {depth} for {cname}.")
  if interlace != 0:
    raise ValueError(
      f"read_image: {name!r} is an interlaced (Adam7) PNG; decoding it needs Pillow ({_HINT})."
    )
  if compression != 0 or filter_method != 0:
    raise ValueError(f"read_image: {name!r}: unknown PNG compression or filter method.")
  if width == 0 or height == 0:
    raise ValueError(f"read_image: {name!r}: empty PNG ({width}x{height}).")
  try:
    raw = zlib.decompress(b"".join(idat))
  except zlib.error as e:
    raise ValueError(f"read_image: {name!r}: corrupted PNG image data ({e}).") from e
  bits_per_pixel = depth * samples
  row_bytes = (width * bits_per_pixel + 7) // 8
  if len(raw) < height * (row_bytes + 1):
    raise ValueError(
      f"read_image: {name!r}: PNG image data too short ({len(raw)} bytes for {height} rows of "
      f"{row_bytes + 1})."
    )
  bpp = max(1, bits_per_pixel // 8)  # bytes per complete pixel, for the filters
  rows = _unfilter(raw, height, row_bytes, bpp, name)  # uint8 [H, row_bytes]

  if depth == 8:
    pixels = rows.reshape(height, width, samples)
  else:  # 1, 2 or 4 bits, one sample per pixel
    bits = np.unpackbits(rows, axis=1)  # [H, row_bytes * 8]
    bits = bits[:, : width * depth].reshape(height, width, depth)
    weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint8)
    pixels = (bits * weights).sum(axis=-1, dtype=np.uint8)[:, :, None]  # [H, W, 1]
  if color == 3:
    if palette is None:
      raise ValueError(f"read_image: {name!r}: palette PNG without a PLTE chunk.")
    index = pixels[:, :, 0]
    if int(index.max()) >= len(palette):
      raise ValueError(f"read_image: {name!r}: PNG palette index out of range.")
    if trns is not None:
      alpha = np.full(len(palette), 255, np.uint8)
      t = np.frombuffer(trns, np.uint8)[: len(palette)]
      alpha[: len(t)] = t
      return np.concatenate([palette, alpha[:, None]], axis=1)[index]  # [H, W, 4]
    return palette[index]  # [H, W, 3]
  if color == 0 and depth < 8:
    pixels = pixels * np.uint8(255 // ((1 << depth) - 1))
  return np.ascontiguousarray(pixels)


def _unfilter(raw: bytes, height: int, row_bytes: int, bpp: int, name: str) -> np.ndarray:
  """Undoes the PNG row filters; returns uint8 [height, row_bytes]."""
  stride = row_bytes + 1
  filtered = np.frombuffer(raw, np.uint8, count=height * stride).reshape(height, stride)
  kinds = filtered[:, 0]
  if int(kinds.max()) > 4:
    raise ValueError(f"read_image: {name!r}: invalid PNG filter type {int(kinds.max())}.")
  out = np.empty((height, row_bytes), np.uint8)
  prior = np.zeros(row_bytes, np.uint8)
  for y in range(height):
    line = filtered[y, 1:]
    kind = kinds[y]
    if kind == 0:  # None
      cur = line.copy()
    elif kind == 1:  # Sub: cumulative sum modulo 256 along each byte lane.
      n = -(-row_bytes // bpp) * bpp
      lanes = np.zeros(n, np.uint8)
      lanes[:row_bytes] = line
      cur = np.cumsum(lanes.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)[:row_bytes]
    elif kind == 2:  # Up
      cur = line + prior
    else:  # Average (3) and Paeth (4) depend on the byte just decoded: a Python loop.
      cur = _unfilter_sequential(line.tobytes(), prior.tobytes(), bpp, kind == 4)
    out[y] = cur
    prior = out[y]
  return out


def _unfilter_sequential(line: bytes, prior: bytes, bpp: int, paeth: bool) -> np.ndarray:
  cur = bytearray(line)
  n = len(cur)
  if not paeth:
    for i in range(bpp):
      cur[i] = (cur[i] + (prior[i] >> 1)) & 0xFF
    for i in range(bpp, n):
      cur[i] = (cur[i] + ((cur[i - bpp] + prior[i]) >> 1)) & 0xFF
  else:
    for i in range(bpp):  # a = c = 0: the predictor is b.
      cur[i] = (cur[i] + prior[i]) & 0xFF
    for i in range(bpp, n):
      a = cur[i - bpp]
      b = prior[i]
      c = prior[i - bpp]
      pa = abs(b - c)
      pb = abs(a - c)
      pc = abs(a + b - 2 * c)
      if pa <= pb and pa <= pc:
        pred = a
      elif pb <= pc:
        pred = b
      else:
        pred = c
      cur[i] = (cur[i] + pred) & 0xFF
  return np.frombuffer(bytes(cur), np.uint8)


# ---------------------------------------------------------------------------------------
# PGM / PPM


def _decode_pnm(data: bytes, name: str) -> np.ndarray:
  magic = data[:2]
  channels = 1 if magic in (b"P2", b"P5") else 3
  # Header: magic, width, height, maxval, separated by whitespace and '#' comments; for
  # binary files exactly one whitespace byte follows maxval.
  fields = []
  pos = 2
  while len(fields) < 3:
    while pos < len(data) and (data[pos : pos + 1].isspace() or data[pos : pos + 1] == b"#"):
      if data[pos : pos + 1] == b"#":
        while pos < len(data) and data[pos : pos + 1] not in (b"\n", b"\r"):
          pos += 1
      else:
        pos += 1
    start = pos
    while pos < len(data) and not data[pos : pos + 1].isspace() and data[pos : pos + 1] != b"#":
      pos += 1
    token = data[start:pos]
    if not token.isdigit():
      raise ValueError(f"read_image: {name!r}: invalid {magic.decode()} header.")
    fields.append(int(token))
  width, height, maxval = fields
  if width == 0 or height == 0 or not 0 < maxval < 65536:
    raise ValueError(f"read_image: {name!r}: invalid {magic.decode()} header {fields}.")
  if maxval > 255:
    raise ValueError(
      f"read_image: {name!r} is a 16-bit {magic.decode()} file (maxval {maxval}); only 8-bit "
      f"PGM/PPM are decoded without Pillow ({_HINT})."
    )
  count = width * height * channels
  if magic in (b"P5", b"P6"):
    pos += 1  # the single whitespace byte after maxval
    body = data[pos : pos + count]
    if len(body) < count:
      raise ValueError(
        f"read_image: {name!r}: truncated {magic.decode()} data ({len(body)} of {count} bytes)."
      )
    values = np.frombuffer(body, np.uint8)
  else:
    text = _strip_comments(data[pos:])
    tokens = text.split()
    if len(tokens) < count:
      raise ValueError(
        f"read_image: {name!r}: truncated {magic.decode()} data ({len(tokens)} of {count} values)."
      )
    try:
      values = np.array([int(t) for t in tokens[:count]], np.int64)
    except ValueError as e:
      raise ValueError(f"read_image: {name!r}: invalid {magic.decode()} pixel value.") from e
  if int(values.max()) > maxval:
    raise ValueError(f"read_image: {name!r}: pixel value above maxval {maxval}.")
  values = values.astype(np.int64)
  if maxval != 255:
    values = (values * 255 + maxval // 2) // maxval
  return values.astype(np.uint8).reshape(height, width, channels)


def _strip_comments(text: bytes) -> bytes:
  """Removes '#' comments (to the end of the line) from ASCII Netpbm data."""
  return b"\n".join(line.split(b"#", 1)[0] for line in text.splitlines())
