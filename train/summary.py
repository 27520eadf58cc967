"""TensorBoard scalar summaries without TensorFlow: a writer and a checking reader.

Event files are TFRecord files: each record is

  uint64 length (little-endian) | uint32 masked crc32c(length) | data | uint32 masked crc32c(data)

holding one serialized `tensorflow.Event` protobuf, encoded here by hand:

  Event   { double wall_time = 1; int64 step = 2; string file_version = 3;
            Summary summary = 5; }
  Summary { repeated Value value = 1; }
  Value   { string tag = 1; float simple_value = 2; }

The first record carries file_version "brain.Event:2". TensorBoard reads the files
`SummaryWriter` writes; `read_scalars` reads them back (and scalars written by TensorFlow
or tensorboardX), checking both CRCs of every record.

In a multi-process job only process 0 should write:
`SummaryWriter(workdir, enabled=jax.process_index() == 0)`; a disabled writer creates no file
and ignores every call.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

FILE_VERSION = "brain.Event:2"

# ---------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), reflected polynomial 0x82F63B78.


def _make_table() -> tuple[int, ...]:
  table = []
  for n in range(256):
    c = n
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return tuple(table)


_CRC_TABLE = _make_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (as used by TFRecord); crc32c(b"123456789") == 0xE3069283."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord mask of crc32c(data): rotate right by 15 bits, add 0xA282EAD8."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: framed `data` with its length and both masked CRCs."""
  length = struct.pack("<Q", len(data))
  return (
    length
    + struct.pack("<I", masked_crc32c(length))
    + data
    + struct.pack("<I", masked_crc32c(data))
  )


# ---------------------------------------------------------------------------------------
# Protobuf encoding (only what Event needs).


def _varint(n: int) -> bytes:
  n &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement: negatives take 10 bytes
  out = bytearray()
  while True:
    bits = n & 0x7F
    n >>= 7
    if n:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
  return _key(field, 2) + _varint(len(data)) + data


def _event(wall_time: float, step: int, *, file_version: str | None = None, summary=b"") -> bytes:
  out = _key(1, 1) + struct.pack("<d", wall_time) + _key(2, 0) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if summary:
    out += _bytes_field(5, summary)
  return out


def _scalar_value(tag: str, value: float) -> bytes:
  return _bytes_field(1, tag.encode("utf-8")) + _key(2, 5) + struct.pack("<f", value)


# ---------------------------------------------------------------------------------------
# Writer


class SummaryWriter:
  """Writes scalar summaries to a TensorBoard event file in `logdir`.

  Records are buffered in memory and written whole (one `os.write` each flush), so a
  killed process leaves a file of complete records. The buffer is flushed by `flush()`,
  `close()`, when it exceeds 64 KiB, and on the first write `flush_secs` after the last
  flush.

  Example:
    with SummaryWriter(workdir, enabled=jax.process_index() == 0) as w:
      w.scalars({"train/loss": loss, "train/lr": lr}, step)
  """

  def __init__(self, logdir: str | os.PathLike, enabled: bool = True, *, flush_secs: float = 10.0):
    """Opens a new event file (when enabled).

    Args:
      logdir: folder for the event file; created if missing.
      enabled: False makes every method a no-op and creates nothing (processes other
        than 0 in a multi-process job).
      flush_secs: a write flushes the buffer when this long has passed since the last flush.
    """
    self.enabled = bool(enabled)
    self.logdir = os.fspath(logdir)
    self.path: str | None = None
    self._flush_secs = float(flush_secs)
    self._buffer = bytearray()
    self._fd: int | None = None
    if not self.enabled:
      return
    os.makedirs(self.logdir, exist_ok=True)
    now = time.time()
    base = os.path.join(self.logdir, f"events.out.tfevents.{int(now)}.{socket.gethostname()}")
    path, n = base, 0
    while True:  # a new file, never an existing one (two writers in the same second)
      try:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        break
      except FileExistsError:
        n += 1
        path = f"{base}.{n}"
    self.path = path
    self._last_flush = time.monotonic()
    self._buffer += tfrecord(_event(now, 0, file_version=FILE_VERSION))
    self.flush()

  def scalar(self, tag: str, value: Any, step: int) -> None:
    """Records one scalar (stored as float32) at `step`."""
    self.scalars({tag: value}, step)

  def scalars(self, values: Mapping[str, Any], step: int) -> None:
    """Records several scalars at `step`, in one event."""
    if not isinstance(values, Mapping):
      raise ValueError(
        f"SummaryWriter.scalars: values must be a mapping tag -> number, got "
        f"{type(values).__name__}."
      )
    step = _check_step(step)
    for tag in values:  # cheap checks on every process, so all fail alike
      _check_tag(tag)
    if not self.enabled or not values:
      return  # values are not touched: no device transfer on processes that do not write
    encoded = b"".join(
      _bytes_field(1, _scalar_value(*_check_scalar(t, v))) for t, v in values.items()
    )
    self._require_open()
    self._buffer += tfrecord(_event(time.time(), step, summary=encoded))
    if len(self._buffer) > 65536 or time.monotonic() - self._last_flush >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    """Writes the buffered records to the file."""
    if self._fd is None or not self._buffer:
      return
    data = bytes(self._buffer)
    written = os.write(self._fd, data)  # whole records: one write (regular files)
    while written < len(data):
      written += os.write(self._fd, data[written:])
    self._buffer.clear()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the file; later writes raise. Idempotent."""
    if self._fd is None:
      return
    try:
      self.flush()
    finally:
      os.close(self._fd)
      self._fd = None

  def _require_open(self):
    if self._fd is None:
      raise ValueError(f"SummaryWriter: {self.path!r} is closed.")

  def __enter__(self) -> SummaryWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


def _check_step(step: Any) -> int:
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    if hasattr(step, "shape") and getattr(step, "shape", None) == () and "int" in str(step.dtype):
      return int(step)  # a 0-d integer array (NumPy or JAX)
    raise ValueError(f"SummaryWriter: step must be an integer, got {step!r}.")
  step = int(step)
  if not -(2**63) <= step < 2**63:
    raise ValueError(f"SummaryWriter: step must fit in int64, got {step}.")
  return step


def _check_tag(tag: Any) -> None:
  if not isinstance(tag, str) or not tag:
    raise ValueError(f"SummaryWriter: tag must be a non-empty string, got {tag!r}.")


def _check_scalar(tag: str, value: Any) -> tuple[str, float]:
  if isinstance(value, (str, bytes)) or getattr(value, "size", 1) != 1:
    raise ValueError(
      f"SummaryWriter: value of {tag!r} must be a real scalar, got {type(value).__name__} "
      f"{getattr(value, 'shape', '')}."
    )
  try:
    value = float(value)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"SummaryWriter: value of {tag!r} must be a real number, got {value!r}."
    ) from e
  if math.isfinite(value) and abs(value) > 3.4028234663852886e38:
    value = math.copysign(math.inf, value)  # float32 overflow, as TensorFlow stores it
  return tag, value


# ---------------------------------------------------------------------------------------
# Reader


def read_records(path: str | os.PathLike) -> list[bytes]:
  """The records of one TFRecord file, both CRCs of each checked.

  Raises:
    ValueError: naming the file and the byte offset of a corrupted or truncated record.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"read_scalars: cannot read {path!r}: {e.strerror or e}.") from e
  records = []
  pos = 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise ValueError(f"read_scalars: {path!r}: truncated record header at byte {pos}.")
    length_bytes = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", length_bytes)
    (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    if masked_crc32c(length_bytes) != length_crc:
      raise ValueError(f"read_scalars: {path!r}: corrupted record length at byte {pos} (bad CRC).")
    end = pos + 12 + length + 4
    if end > len(data):
      raise ValueError(f"read_scalars: {path!r}: truncated record at byte {pos}.")
    body = data[pos + 12 : pos + 12 + length]
    (body_crc,) = struct.unpack("<I", data[end - 4 : end])
    if masked_crc32c(body) != body_crc:
      raise ValueError(f"read_scalars: {path!r}: corrupted record data at byte {pos} (bad CRC).")
    records.append(body)
    pos = end
  return records


def read_scalars(path_or_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
  """Reads the scalar summaries of an event file, or of every event file in a folder.

  Args:
    path_or_dir: an event file, or a folder whose files named `*tfevents*` are read in
      name order (not recursively).

  Returns:
    tag -> [(step, value), ...] in the order written. Values written as `simple_value`
    (float32) or as a float/double scalar tensor (TF2 summaries) are read; other summary
    kinds (images, histograms, ...) are skipped.

  Raises:
    ValueError: naming the file, if it is missing, corrupted (CRC mismatch) or truncated,
      or holds an undecodable protobuf; or if a folder holds no event file.
  """
  path = os.fspath(path_or_dir)
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if "tfevents" in n)
    files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    if not files:
      raise ValueError(f"read_scalars: no event file (*tfevents*) in folder {path!r}.")
  elif os.path.exists(path):
    files = [path]
  else:
    raise ValueError(f"read_scalars: {path!r} does not exist.")
  out: dict[str, list[tuple[int, float]]] = {}
  for file in files:
    for i, record in enumerate(read_records(file)):
      try:
        _decode_event(record, out)
      except (ValueError, IndexError, struct.error) as e:
        raise ValueError(f"read_scalars: {file!r}: record {i} is not a valid Event ({e}).") from e
  return out


def _decode_event(record: bytes, out: dict[str, list[tuple[int, float]]]) -> None:
  step = 0
  summaries = []
  for field, wire, value in _parse(record):
    if field == 2 and wire == 0:
      step = _signed64(value)
    elif field == 5 and wire == 2:
      summaries.append(value)
  for summary in summaries:
    for field, wire, value in _parse(summary):
      if field == 1 and wire == 2:
        decoded = _decode_value(value)
        if decoded is not None:
          out.setdefault(decoded[0], []).append((step, decoded[1]))


def _decode_value(buf: bytes) -> tuple[str, float] | None:
  tag = None
  scalar = None
  for field, wire, value in _parse(buf):
    if field == 1 and wire == 2:
      tag = value.decode("utf-8")
    elif field == 2 and wire == 5:
      (scalar,) = struct.unpack("<f", value)
    elif field == 8 and wire == 2:  # TensorProto
      t = _decode_tensor_scalar(value)
      if t is not None:
        scalar = t
  if tag is None or scalar is None:
    return None
  return tag, scalar


def _decode_tensor_scalar(buf: bytes) -> float | None:
  """A scalar float (DT_FLOAT = 1) or double (DT_DOUBLE = 2) TensorProto, else None."""
  dtype = 0
  content = b""
  values: list[float] = []
  for field, wire, value in _parse(buf):
    if field == 1 and wire == 0:
      dtype = value
    elif field == 4 and wire == 2:
      content = value
    elif field == 5:  # float_val, packed or not
      values += struct.unpack(f"<{len(value) // 4}f", value) if wire == 2 else [_f32(value)]
    elif field == 6:  # double_val
      values += struct.unpack(f"<{len(value) // 8}d", value) if wire == 2 else [_f64(value)]
  fmt = {1: "<f", 2: "<d"}.get(dtype)
  if fmt is None:
    return None
  if content and len(content) == struct.calcsize(fmt):
    return struct.unpack(fmt, content)[0]
  return values[0] if len(values) == 1 else None


def _f32(b: bytes) -> float:
  return struct.unpack("<f", b)[0]


def _f64(b: bytes) -> float:
  return struct.unpack("<d", b)[0]


def _signed64(n: int) -> int:
  return n - (1 << 64) if n >= 1 << 63 else n


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
  result = 0
  shift = 0
  while True:
    if pos >= len(buf) or shift > 63:
      raise ValueError("malformed varint")
    byte = buf[pos]
    pos += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, pos
    shift += 7


def _parse(buf: bytes):
  """Yields (field number, wire type, value) of a serialized protobuf message."""
  pos = 0
  while pos < len(buf):
    key, pos = _read_varint(buf, pos)
    field, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _read_varint(buf, pos)
    elif wire == 1:
      value, pos = buf[pos : pos + 8], pos + 8
    elif wire == 2:
      n, pos = _read_varint(buf, pos)
      value, pos = buf[pos : pos + n], pos + n
    elif wire == 5:
      value, pos = buf[pos : pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported wire type {wire}")
    if pos > len(buf):
      raise ValueError("truncated field")
    yield field, wire, value
