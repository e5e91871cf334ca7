"""A mutator that knows the stream's records: it changes one record and frames it again.

libFuzzer's own mutations land anywhere in an input of kilobytes, and most of them break the
framing or a length before the change reaches what the record means.  This one takes a stream
apart into its records, changes one of them (its payload, with libFuzzer's mutations; its
header; or which records there are: one dropped, repeated or two swapped), and puts the stream
together again with every length and checksum right, so the loaders, not the framing, see the
change.  A part of the inputs still gets libFuzzer's mutations of the whole, and the harnesses
run every input both as it is and repaired (:mod:`pymig.fuzz.repair`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pymig import stream
from pymig.fuzz import repair

_NAMED = (stream.RecordType.START, stream.RecordType.FULL)


@dataclass
class Record:
    head: bytes  # from the type byte through payload_len
    payload: bytes

    @property
    def nocsum(self) -> bool:
        return bool(self.head[1] & stream.FLAG_NOCSUM)


def split(data: bytes) -> tuple[bytes, list[Record], bytes]:
    """(stream header, the records that parse, whatever follows them)."""
    pos = stream.HEADER_BYTES
    if len(data) < pos:
        return data, [], b""
    records = []
    while pos + stream.RECORD_HEAD.size <= len(data):
        start = pos
        rtype = data[pos]
        pos += stream.RECORD_HEAD.size
        if rtype in _NAMED:
            if pos >= len(data):
                return data[:stream.HEADER_BYTES], records, data[start:]
            pos += 1 + data[pos] + stream.SECTION_INFO.size
        if pos + 4 > len(data):
            return data[:stream.HEADER_BYTES], records, data[start:]
        length = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4
        end = pos + length + stream.FOOTER_BYTES
        if end > len(data):
            return data[:stream.HEADER_BYTES], records, data[start:]
        records.append(Record(data[start:pos], data[pos:pos + length]))
        pos = end
        if rtype == stream.RecordType.EOF:
            break
    return data[:stream.HEADER_BYTES], records, data[pos:]


def join(header: bytes, records: list[Record], tail: bytes) -> bytes:
    """The stream of ``records``, each with its payload length and footer made right."""
    out = bytearray(header)
    for record in records:
        head = bytearray(record.head)
        if len(head) >= stream.RECORD_HEAD.size + 4:
            head[-4:] = len(record.payload).to_bytes(4, "little")
        out += head + record.payload
        out += b"\0" * stream.FOOTER_BYTES  # filled in by repair.records below
    out += tail
    fixed, _ = repair.records(bytes(out))
    return fixed


def stream_mutator(mutate):
    """A libFuzzer custom mutator for stream inputs, over ``mutate(data, max_size)`` (atheris's
    own mutations)."""

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        header, records, tail = split(data)
        choice = rng.random()
        if not records or choice < 0.3:
            return mutate(data, max_size)
        i = rng.randrange(len(records))
        record = records[i]
        if choice < 0.75:
            payload = mutate(record.payload, max(2 * len(record.payload), 64))
            if payload[:4] == repair.PACKET_MAGIC and rng.random() < 0.8:
                payload = repair.packet(payload, fix_length=rng.random() < 0.5)
            records[i] = Record(record.head, payload)
        elif choice < 0.9:
            records[i] = Record(mutate(record.head, len(record.head) + 8), record.payload)
        elif choice < 0.95 and len(records) > 1:
            j = rng.randrange(len(records))
            records[i], records[j] = records[j], records[i]
        elif rng.random() < 0.5:
            del records[i]
        else:
            records.insert(i, record)
        out = join(header, records, tail)
        return out[:max_size] if len(out) > max_size else out

    return custom_mutator
