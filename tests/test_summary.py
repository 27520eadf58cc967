"""train/summary.py: crc32c, TFRecord framing, Event encoding, writer and checking reader."""

from __future__ import annotations

import os
import re
import struct

import numpy as np
import pytest

from sparse_attention.train import summary


@pytest.mark.parametrize(
  "data, crc",
  [
    (b"", 0x00000000),
    (b"a", 0xC1D04330),
    (b"123456789", 0xE3069283),  # the CRC-32C check value
    (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 test vectors
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
  ],
)
def test_crc32c_known_vectors(data, crc):
  assert summary.crc32c(data) == crc


def test_masked_crc_and_record_framing():
  crc = summary.crc32c(b"abc")
  rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
  assert summary.masked_crc32c(b"abc") == (rotated + 0xA282EAD8) & 0xFFFFFFFF
  record = summary.tfrecord(b"payload")
  assert len(record) == 8 + 4 + 7 + 4
  assert struct.unpack("<Q", record[:8]) == (7,)
  assert struct.unpack("<I", record[8:12]) == (summary.masked_crc32c(record[:8]),)
  assert record[12:19] == b"payload"
  assert struct.unpack("<I", record[19:]) == (summary.masked_crc32c(b"payload"),)


def test_event_bytes_match_the_protobuf_encoding():
  value = summary._bytes_field(1, summary._scalar_value("a", 2.0))
  event = summary._event(1.5, 3, summary=value)
  expected = (
    b"\x09" + struct.pack("<d", 1.5)  # wall_time: field 1, 64-bit
    + b"\x10\x03"  # step: field 2, varint
    + b"\x2a\x0a"  # summary: field 5, 10 bytes
    + b"\x0a\x08"  # Summary.value: field 1, 8 bytes
    + b"\x0a\x01a"  # Value.tag: field 1, "a"
    + b"\x15" + struct.pack("<f", 2.0)  # Value.simple_value: field 2, 32-bit
  )  # fmt: skip
  assert event == expected
  version = summary._event(0.0, 0, file_version="brain.Event:2")
  assert version.endswith(b"\x1a\x0dbrain.Event:2")
  assert summary._varint(300) == b"\xac\x02"
  assert summary._varint(-1) == b"\xff" * 9 + b"\x01"  # int64 two's complement


def test_write_and_read_back(tmp_path):
  with summary.SummaryWriter(tmp_path / "logs") as w:
    w.scalar("train/loss", 2.5, 0)
    w.scalar("train/loss", np.float32(1.25), 10)
    w.scalars({"eval/accuracy": 0.1, "eval/loss": np.array(3.3, np.float64)}, 10)
    w.scalar("train/loss", 0.1, 2**40)
    w.scalar("weird step", float("nan"), -5)
    w.scalar("big", 1e300, 1)
  name = os.path.basename(w.path)
  assert re.fullmatch(r"events\.out\.tfevents\.\d+\..+", name), name
  got = summary.read_scalars(tmp_path / "logs")
  assert summary.read_scalars(w.path).keys() == got.keys()
  assert got["train/loss"] == [(0, 2.5), (10, 1.25), (2**40, float(np.float32(0.1)))]
  assert got["eval/accuracy"] == [(10, float(np.float32(0.1)))]
  assert got["eval/loss"] == [(10, float(np.float32(3.3)))]
  assert got["weird step"][0][0] == -5 and np.isnan(got["weird step"][0][1])
  assert got["big"] == [(1, float("inf"))]  # float32 overflow
  # The first record is the file_version event; one event per scalars() call after it.
  records = summary.read_records(w.path)
  assert len(records) == 1 + 6
  fields = {f: v for f, _, v in summary._parse(records[0])}
  assert fields[3] == b"brain.Event:2" and fields[2] == 0 and 5 not in fields
  assert struct.unpack("<d", fields[1])[0] > 1.6e9  # wall time, seconds


def test_jax_scalars(tmp_path):
  import jax.numpy as jnp

  with summary.SummaryWriter(tmp_path) as w:
    w.scalars({"x": jnp.float32(0.5), "y": jnp.asarray(7, jnp.int32)}, jnp.asarray(4))
  assert summary.read_scalars(tmp_path) == {"x": [(4, 0.5)], "y": [(4, 7.0)]}


def test_corruption_is_detected(tmp_path):
  with summary.SummaryWriter(tmp_path) as w:
    w.scalar("loss", 1.0, 1)
    w.scalar("loss", 2.0, 2)
  blob = open(w.path, "rb").read()
  first = len(summary.tfrecord(summary.read_records(w.path)[0]))

  def corrupt(pos):
    bad = bytearray(blob)
    bad[pos] ^= 0x01
    path = tmp_path / f"bad_{pos}.tfevents"
    path.write_bytes(bytes(bad))
    return path

  with pytest.raises(ValueError, match=r"bad_\d+.tfevents.*corrupted record data"):
    summary.read_scalars(corrupt(first + 14))  # a byte of the second record's data
  with pytest.raises(ValueError, match="corrupted record data"):
    summary.read_scalars(corrupt(len(blob) - 1))  # the last record's data CRC
  with pytest.raises(ValueError, match="corrupted record length"):
    summary.read_scalars(corrupt(first))  # the second record's length
  truncated = tmp_path / "short.tfevents"
  truncated.write_bytes(blob[:-3])
  with pytest.raises(ValueError, match="short.tfevents.*truncated record"):
    summary.read_scalars(truncated)
  with pytest.raises(ValueError, match="does not exist"):
    summary.read_scalars(tmp_path / "absent")
  os.makedirs(tmp_path / "nothing")
  with pytest.raises(ValueError, match="no event file"):
    summary.read_scalars(tmp_path / "nothing")


def test_disabled_writer_writes_nothing(tmp_path):
  logdir = tmp_path / "never"
  with summary.SummaryWriter(logdir, enabled=False) as w:
    w.scalar("loss", 1.0, 1)
    w.scalars({"a": object()}, 2)  # values are not even looked at
    w.flush()
  assert w.path is None and not logdir.exists()
  with pytest.raises(ValueError, match="tag"):  # but tags and steps are checked everywhere
    w.scalar("", 1.0, 1)


def test_buffering_flush_and_close(tmp_path):
  w = summary.SummaryWriter(tmp_path, flush_secs=3600)
  assert summary.read_scalars(w.path) == {}  # the version record is on disk at once
  w.scalar("loss", 1.0, 1)
  assert summary.read_scalars(w.path) == {}  # buffered
  w.flush()
  assert summary.read_scalars(w.path) == {"loss": [(1, 1.0)]}
  w.close()
  w.close()  # idempotent
  with pytest.raises(ValueError, match="closed"):
    w.scalar("loss", 2.0, 2)
  eager = summary.SummaryWriter(tmp_path / "eager", flush_secs=0)
  eager.scalar("loss", 3.0, 3)
  assert summary.read_scalars(eager.path) == {"loss": [(3, 3.0)]}
  eager.close()


def test_two_writers_in_one_folder(tmp_path):
  with summary.SummaryWriter(tmp_path) as a, summary.SummaryWriter(tmp_path) as b:
    a.scalar("loss", 1.0, 1)
    b.scalar("loss", 2.0, 2)
  assert a.path != b.path
  assert sorted(summary.read_scalars(tmp_path)["loss"]) == [(1, 1.0), (2, 2.0)]


def test_bad_arguments(tmp_path):
  with summary.SummaryWriter(tmp_path) as w:
    with pytest.raises(ValueError, match="tag"):
      w.scalar(3, 1.0, 1)
    with pytest.raises(ValueError, match="step"):
      w.scalar("x", 1.0, 1.5)
    with pytest.raises(ValueError, match="step"):
      w.scalar("x", 1.0, True)
    with pytest.raises(ValueError, match="real scalar"):
      w.scalar("x", np.ones(3), 1)
    with pytest.raises(ValueError, match="real"):
      w.scalar("x", "1.0", 1)
    with pytest.raises(ValueError, match="mapping"):
      w.scalars([("x", 1.0)], 1)


def test_reads_tensor_scalars_of_tf2_summaries(tmp_path):
  tensor_f32 = b"\x08\x01" + b"\x12\x00" + b"\x2a\x04" + struct.pack("<f", 0.75)  # float_val
  tensor_f64 = b"\x08\x02" + b"\x22\x08" + struct.pack("<d", 1.5)  # tensor_content
  values = [
    summary._bytes_field(1, b"t") + summary._bytes_field(8, tensor_f32),
    summary._bytes_field(1, b"u") + summary._bytes_field(8, tensor_f64),
    summary._bytes_field(1, b"img"),  # no scalar: skipped
  ]
  record = summary._event(1.0, 9, summary=b"".join(summary._bytes_field(1, v) for v in values))
  path = tmp_path / "events.out.tfevents.1.tf2"
  path.write_bytes(summary.tfrecord(record))
  assert summary.read_scalars(path) == {"t": [(9, 0.75)], "u": [(9, 1.5)]}


def test_records_parse_with_the_protobuf_library(tmp_path):
  """Cross-check the hand encoding with protobuf (when installed) and Event's field numbers."""
  pytest.importorskip("google.protobuf")
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

  f = descriptor_pb2.FieldDescriptorProto
  proto = descriptor_pb2.FileDescriptorProto(name="event_check.proto", package="check")
  for name, fields in (
    ("Value", [("tag", 1, f.TYPE_STRING, None), ("simple_value", 2, f.TYPE_FLOAT, None)]),
    ("Summary", [("value", 1, f.TYPE_MESSAGE, ".check.Value")]),
    (
      "Event",
      [
        ("wall_time", 1, f.TYPE_DOUBLE, None),
        ("step", 2, f.TYPE_INT64, None),
        ("file_version", 3, f.TYPE_STRING, None),
        ("summary", 5, f.TYPE_MESSAGE, ".check.Summary"),
      ],
    ),
  ):
    message = proto.message_type.add(name=name)
    for field_name, number, kind, type_name in fields:
      label = f.LABEL_REPEATED if name == "Summary" else f.LABEL_OPTIONAL
      field = message.field.add(name=field_name, number=number, type=kind, label=label)
      if type_name:
        field.type_name = type_name
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  event_class = message_factory.GetMessageClass(pool.FindMessageTypeByName("check.Event"))
  with summary.SummaryWriter(tmp_path) as w:
    w.scalars({"a": 1.5, "b/c": -2.25}, 7)
    w.scalar("neg", 3.0, -4)
  events = []
  for record in summary.read_records(w.path):
    event = event_class()
    event.ParseFromString(record)
    events.append(event)
  assert events[0].file_version == "brain.Event:2"
  assert [(e.step, [(v.tag, v.simple_value) for v in e.summary.value]) for e in events[1:]] == [
    (7, [("a", 1.5), ("b/c", -2.25)]),
    (-4, [("neg", 3.0)]),
  ]
  assert all(abs(e.wall_time - events[0].wall_time) < 60 for e in events)
