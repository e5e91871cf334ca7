"""Helpers for the state-bounds tests: rewrite one state record of a saved stream, and encode
values a description's bounds refuse (the source side never writes them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import xxhash

from pymig import stream, vmstate
from pymig.transport import BytesChannel


def state_records(data: bytes) -> dict[tuple[str, int], tuple[stream.RecordHeader, int]]:
    """Every FULL record of a stream: (idstr, instance) -> (header, payload offset)."""
    reader = stream.StreamReader(BytesChannel(data))
    reader.read_header()
    found = {}
    while True:
        record = reader.next_record()
        if record.type == stream.RecordType.EOF:
            return found
        if record.type == stream.RecordType.FULL:
            head = (stream.RECORD_HEAD.size + 1 + len(record.idstr) + stream.SECTION_INFO.size
                    + stream.U32.size)
            found[(record.idstr, record.instance_id)] = (record, record.offset + head)
        if record.payload_len:
            reader.skip_payload()


def replace_payload(data: bytes, idstr: str, instance: int, payload: bytes) -> bytes:
    """``data`` with the payload of FULL record ``idstr/instance`` replaced by ``payload``, its
    footer recomputed as a source would write it.  A payload of the same length leaves every
    other byte (and a snapshot's index) where it was."""
    record, at = state_records(data)[(idstr, instance)]
    out = bytearray(data)
    head = bytes(out[record.offset:at])
    head = head[:-4] + stream.U32.pack(len(payload))
    tail = out[at + record.payload_len + stream.FOOTER_BYTES:]
    footer = stream.FOOTER.pack(stream.FOOTER_MAGIC, record.section_id,
                                xxhash.xxh3_64_intdigest(head + payload))
    return bytes(out[:record.offset]) + head + payload + footer + bytes(tail)


def payload_of(data: bytes, idstr: str, instance: int) -> bytes:
    record, at = state_records(data)[(idstr, instance)]
    return data[at:at + record.payload_len]


def relaxed(vmsd: vmstate.VMStateDescription) -> vmstate.VMStateDescription:
    """A twin of ``vmsd`` with the same wire encoding and no bounds at all: bools are bytes,
    counts have no maximum.  Saving with it writes what the real description refuses."""
    fields = []
    for f in vmsd.fields:
        elem = f.elem
        if isinstance(elem, vmstate.VMStateDescription):
            elem = relaxed(elem)
        elif elem.is_bool:
            elem = vmstate.SCALARS["u8"]
        unbounded = {"bound": None} if hasattr(f, "bound") else {}
        fields.append(dataclasses.replace(f, elem=elem, max_count=stream.MAX_U32, **unbounded))
    return dataclasses.replace(vmsd, fields=tuple(fields),
                               subsections=tuple(relaxed(s) for s in vmsd.subsections),
                               pre_save=None, post_load=None)


def mutated(vmsd: vmstate.VMStateDescription, payload: bytes, version_id: int,
            change: Callable[[dict], None]) -> bytes:
    """``payload`` decoded without bounds, changed by ``change(values)``, encoded again."""
    loose = relaxed(vmsd)
    values = vmstate.decode(loose, payload, version_id)
    change(values)
    return vmstate.save(loose, values)  # decode's dict is what save reads back
