"""``pymig analyze``: what a saved migration stream holds, and where it is damaged.

It reads a stream (a ``file:`` snapshot, or anything piped in) without a guest: the header,
every section (type, id, idstr, instance, version, size, offset), RAM statistics from the
packets' headers and run records (zero and normal pages, bytes, packets, checksum failures;
no page is copied), each travelling disk's block records (data and zero records, bytes, each
held to the bounds a destination holds it to), the guest configuration, and the vCPU and
device state decoded field by field through the state descriptions of the guest kind the
configuration names.

A damaged stream is reported with the offset of the first problem.  Damage inside a record
(a footer or packet checksum that does not match, state or configuration that does not
decode, whatever its bytes say) is counted and the analysis goes on with the next record;
damage to the framing itself (an unknown record type, an impossible length, a truncated
stream) ends it there.  No input makes it raise: what the stream names (idstrs, the
configuration's values) is data, never markup, when it is printed.

After the EOF record a ``file:`` snapshot carries its restore index
(:mod:`pymig.transport.snapshot_index`): it is decoded and held to the same check a restore
makes (each range it lets a restore skip is whole RAM records whose every page a later record
holds again), and anything else after the EOF record is a problem.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import xxhash

from pymig import stream, vmstate
from pymig.block import BLOCK_IDSTR, KIND_DATA, MAX_CHUNK_BYTES, parse_part, parse_start
from pymig.disk import SECTOR_BYTES
from pymig.errors import PacketError, PymigError, SourceCancelled, StreamError
from pymig.machine import CONFIG_IDSTR
from pymig.ram import RAM_IDSTR
from pymig.transport import PeerClosedError
from pymig.transport.snapshot_index import (MAX_INDEX_BYTES, IndexCheck, Pages,
                                            SnapshotIndexError, block_shapes, decode_index,
                                            packet_pages)

_PACKET_HEAD = struct.Struct("<4sHHIIIIQ")
_RUN = struct.Struct("<QIBBH")
_KINDS = {1: "normal", 2: "zero"}
#: The most pages an index is checked against (a flag each while one of its ranges waits for a
#: later version): RAM of 1 TiB in 4 KiB pages.  A restore checks against the guest it built.
INDEX_CHECK_MAX_PAGES = 1 << 28
#: How deep the configuration's and the block list's JSON may nest (they nest two levels).
MAX_JSON_DEPTH = 16


@dataclass
class Problem:
    offset: int
    reason: str


@dataclass
class RamStats:
    packets: int = 0
    normal_pages: int = 0  # pages sent with their data, compressed or not
    zero_pages: int = 0
    compressed_pages: int = 0  # of normal_pages, those in LZ4 blocks
    bytes: int = 0  # packet bytes, headers included
    page_bytes: int = 0  # bytes of page data
    checksum_failures: int = 0
    blocks: list[dict] = field(default_factory=list)
    shapes: dict[int, tuple[int, int]] = field(default_factory=dict, repr=False)


@dataclass
class DiskStats:
    """One disk's block section (:mod:`pymig.block`), from its records' headers."""

    size: int | None = None  # as its START says
    chunk: int | None = None
    parts: int = 0
    data_records: int = 0
    zero_records: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    ended: bool = False
    checkpoint: dict | None = None  # an incremental section's: its name and id

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "chunk": self.chunk, "checkpoint": self.checkpoint,
                "parts": self.parts,
                "data-records": self.data_records, "zero-records": self.zero_records,
                "data-bytes": self.data_bytes, "zero-bytes": self.zero_bytes,
                "ended": self.ended}


@dataclass
class Analysis:
    version: int | None = None
    sections: list[dict] = field(default_factory=list)
    config: dict | None = None
    ram: RamStats = field(default_factory=RamStats)
    disks: dict[str, DiskStats] = field(default_factory=dict)  # block/N: a disk that travels
    state: dict[str, dict] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    complete: bool = False  # an EOF record was reached
    bytes_read: int = 0
    index: dict | None = None  # a snapshot's restore index, when there is one
    # every record's (start, end, block and runs for a RAM record), for the index's check
    records: list[tuple[int, int, Pages | None]] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "complete": self.complete, "bytes": self.bytes_read,
            "version": self.version, "config": self.config,
            "first-problem": (None if not self.problems else
                              {"offset": self.problems[0].offset,
                               "reason": self.problems[0].reason}),
            "problems": [{"offset": p.offset, "reason": p.reason} for p in self.problems],
            "sections": self.sections,
            "ram": {"packets": self.ram.packets, "normal-pages": self.ram.normal_pages,
                    "zero-pages": self.ram.zero_pages,
                    "compressed-pages": self.ram.compressed_pages, "bytes": self.ram.bytes,
                    "page-bytes": self.ram.page_bytes,
                    "checksum-failures": self.ram.checksum_failures,
                    "blocks": self.ram.blocks},
            "disks": {name: disk.to_dict() for name, disk in self.disks.items()},
            "state": self.state,
            "index": self.index,
        }


def state_descriptions(config: dict | None) -> dict[str, vmstate.VMStateDescription]:
    """idstr → description for the guest kind named by the configuration section."""
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind == "kvm":
        from pymig.kvm.statedesc import CPU, DEVICES, DISK_DEVICES

        return {"cpu": CPU, **DEVICES, **DISK_DEVICES}
    if kind == "simulated":
        from pymig.guest.simulated import SIM_CPU_VMSD

        return {"cpu": SIM_CPU_VMSD}
    return {}


def analyze(channel) -> Analysis:
    """Read the whole stream from ``channel`` and describe it."""
    result = Analysis()
    reader = stream.StreamReader(channel)
    try:
        result.version = reader.read_header()
    except PymigError as exc:
        result.problems.append(_problem(exc, 0))
        result.bytes_read = reader.offset
        return result
    names: dict[int, tuple[str, int, int]] = {}
    descriptions: dict[str, vmstate.VMStateDescription] = {}
    while True:
        try:
            record = reader.next_record()
        except PymigError as exc:
            result.problems.append(_problem(exc, reader.offset))
            break
        if record.type == stream.RecordType.EOF:
            result.sections.append(_section(record, "-", None, None))
            result.records.append((record.offset, reader.offset, None))
            result.complete = True
            _index(channel, reader.offset, result)
            return result
        if record.idstr is not None:
            names[record.section_id] = (record.idstr, record.instance_id, record.version_id)
        idstr, instance, version = names.get(record.section_id, ("?", None, None))
        result.sections.append(_section(record, idstr, instance, version))
        payload_offset = reader.offset
        try:
            payload = reader.read_payload()
        except StreamError as exc:
            result.problems.append(_problem(exc, reader.offset))
            if "checksum" in exc.reason:
                result.records.append((record.offset, reader.offset, None))
                continue  # the record was read whole; only its content is suspect
            break
        except PymigError as exc:
            result.problems.append(_problem(exc, reader.offset))
            break
        pages = None
        try:
            if idstr == CONFIG_IDSTR:
                result.config = _json(payload, "the guest configuration", dict)
                descriptions = state_descriptions(result.config)
            elif idstr == RAM_IDSTR:
                pages = _ram(record, payload, payload_offset, result)
            elif idstr == BLOCK_IDSTR:
                _block(record, f"{idstr}/{instance}", payload, payload_offset, result)
            elif idstr in descriptions and version is not None:
                key = f"{idstr}/{instance}"
                result.state[key] = _plain(vmstate.decode(descriptions[idstr], payload, version))
        except Exception as exc:  # noqa: BLE001 - whatever a record holds is damage, reported
            result.problems.append(Problem(payload_offset, f"{idstr}/{instance}: "
                                                           f"{_describe(exc)}"))
        result.records.append((record.offset, reader.offset, pages))
    result.bytes_read = reader.offset
    return result


def _describe(exc: BaseException) -> str:
    """An exception as damage: what it says, and its kind where that is not a message of
    ours (a state that does not decode says so; a KeyError alone would not)."""
    if isinstance(exc, (PymigError, ValueError)) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _json(payload, what: str, kind: type) -> Any:
    """``payload`` as JSON of ``kind`` (dict or list), nested at most :data:`MAX_JSON_DEPTH`
    deep (a report must be able to print it again); ValueError for anything else."""
    too_deep = ValueError(f"{what} nests deeper than {MAX_JSON_DEPTH} levels")

    def not_json(constant: str):  # (NaN, Infinity: Python reads them, JSON has none)
        raise ValueError(f"{what} holds {constant}, which is not JSON")

    try:
        value = json.loads(bytes(payload), parse_constant=not_json)
    except RecursionError:
        raise too_deep from None
    if not isinstance(value, kind):
        raise ValueError(f"{what} is not a JSON {kind.__name__} but {type(value).__name__}")
    level = [value]
    for _ in range(MAX_JSON_DEPTH):
        level = [v for item in level for v in (item.values() if isinstance(item, dict) else item)
                 if isinstance(v, (dict, list))]
        if not level:
            return value
    raise too_deep


def _index(channel, stream_bytes: int, result: Analysis) -> None:
    """Whatever follows the EOF record: nothing, or a restore index that holds."""
    try:
        rest = _read_rest(channel, MAX_INDEX_BYTES + 64)
    except PymigError as exc:
        result.bytes_read = stream_bytes
        result.problems.append(Problem(stream_bytes, f"after the EOF record: {exc}"))
        return
    result.bytes_read = stream_bytes + len(rest)
    if not rest:
        return
    try:
        index = decode_index(rest, stream_bytes)
    except SnapshotIndexError as exc:
        result.problems.append(Problem(exc.offset, f"after the EOF record: {exc.reason}"))
        return
    result.index = {"superseded-ranges": len(index.superseded),
                    "superseded-bytes": index.superseded_bytes,
                    "restore-reads": stream_bytes - index.superseded_bytes}
    if not index.superseded:
        return
    check = IndexCheck(index, max_pages=INDEX_CHECK_MAX_PAGES)
    try:
        try:
            check.ram_blocks(result.ram.blocks)
        except ValueError as exc:
            raise SnapshotIndexError(stream_bytes, f"the index cannot be checked: {exc}") \
                from None
        for start, end, pages in result.records:
            check.record(start, end, pages)
        check.finish()
    except SnapshotIndexError as exc:
        result.problems.append(Problem(exc.offset, exc.reason))


def _read_rest(channel, limit: int) -> bytes:
    out = bytearray()
    chunk = bytearray(1 << 20)
    while len(out) <= limit:
        try:
            channel.recv_into(chunk)
        except PeerClosedError as exc:
            out += chunk[:exc.received]
            break
        out += chunk
    return bytes(out)


def _section(record, idstr, instance, version) -> dict:
    return {"offset": record.offset, "type": record.type.name, "section-id": record.section_id,
            "idstr": idstr, "instance": instance, "version": version,
            "size": record.payload_len}


def _problem(exc: BaseException, offset: int) -> Problem:
    if isinstance(exc, StreamError):
        return Problem(exc.offset, exc.reason)
    if isinstance(exc, SourceCancelled) and exc.offset is not None:
        return Problem(exc.offset, f"{exc} (a CANCEL record: the stream ends unfinished)")
    return Problem(offset, str(exc))


def _block(record, name: str, payload, offset: int, result: Analysis) -> None:
    """One record of a disk's block section, its records held to the bounds a destination
    holds them to (against the disk size its START says)."""
    disk = result.disks.setdefault(name, DiskStats())
    if record.type == stream.RecordType.START:
        try:
            size, chunk, _flags, disk.checkpoint = parse_start(payload, name)
        except PacketError as exc:
            result.problems.append(Problem(offset + exc.offset, exc.reason))
            return
        if not SECTOR_BYTES <= chunk <= MAX_CHUNK_BYTES or chunk % SECTOR_BYTES:
            raise ValueError(f"a chunk of {chunk} bytes")
        disk.size, disk.chunk = size, chunk
        return
    if record.type == stream.RecordType.END:
        disk.ended = True
        return
    if disk.size is None or disk.chunk is None:
        raise ValueError("disk data before its header")
    disk.parts += 1
    try:
        records = parse_part(payload, disk.size, disk.chunk)
    except PacketError as exc:
        result.problems.append(Problem(offset + exc.offset, f"{name}: {exc.reason}"))
        return
    for kind, _offset, length, _at in records:
        if kind == KIND_DATA:
            disk.data_records += 1
            disk.data_bytes += length
        else:
            disk.zero_records += 1
            disk.zero_bytes += length


def _ram(record, payload, offset: int, result: Analysis) -> Pages | None:
    """RAM statistics of one RAM record; a PART's block and runs, for the index's check."""
    ram = result.ram
    if record.type == stream.RecordType.START:
        blocks = _json(payload, "the RAM block list", list)
        ram.blocks = blocks
        ram.shapes = block_shapes(blocks)
        return None
    if record.type != stream.RecordType.PART:
        return None
    # Walk the packet's header and run records only: page data is counted, never copied.
    problems = len(result.problems)
    if len(payload) < _PACKET_HEAD.size:
        result.problems.append(Problem(offset, "RAM packet shorter than its header"))
        return None
    magic, version, _flags, _block, page_size, records, payload_len, checksum = \
        _PACKET_HEAD.unpack_from(payload)
    if magic != b"PMGP" or len(payload) != _PACKET_HEAD.size + payload_len:
        result.problems.append(Problem(offset, "not a RAM packet (bad magic or length)"))
        return None
    ram.packets += 1
    ram.bytes += len(payload)
    state = xxhash.xxh3_64()  # the payload, then the header's first 24 bytes
    state.update(payload[_PACKET_HEAD.size:])
    state.update(payload[:24])
    if state.intdigest() != checksum:
        ram.checksum_failures += 1
        result.problems.append(Problem(offset + 24, "RAM packet checksum mismatch"))
    pos = _PACKET_HEAD.size
    for _ in range(records):
        if pos + _RUN.size > len(payload):
            result.problems.append(Problem(offset + pos, "RAM packet run records overrun"))
            return None
        _first, count, kind, _r1, _r2 = _RUN.unpack_from(payload, pos)
        pos += _RUN.size
        if kind == 1:
            ram.normal_pages += count
            ram.page_bytes += count * page_size
            pos += count * page_size
        elif kind == 2:
            ram.zero_pages += count
        elif kind == 3 and pos + 8 <= len(payload):
            ram.normal_pages += count
            ram.compressed_pages += count
            ram.page_bytes += count * page_size
            pos += 8 + int.from_bytes(payload[pos:pos + 4], "little")
        else:
            result.problems.append(Problem(offset + pos - _RUN.size,
                                           f"unknown RAM run kind {kind}"))
            return None
    try:
        return packet_pages(payload, ram.shapes)
    except (StreamError, ValueError) as exc:
        if len(result.problems) == problems:  # what a destination would refuse it for
            where = offset + exc.offset if isinstance(exc, StreamError) else offset
            result.problems.append(Problem(where, f"RAM packet: {getattr(exc, 'reason', exc)}"))
        return None  # (to the index's check, not a RAM record it can follow)


def _plain(value: Any) -> Any:
    """Decoded state as JSON-friendly values (bytes become a short hex summary)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {"bytes": len(data), "nonzero": sum(1 for b in data if b),
                "head": data[:16].hex()}
    return value


def render(analysis: Analysis, console) -> None:
    """Print an analysis for people (``pymig analyze`` without ``--json``).  Everything the
    stream says goes out as plain text (rich ``Text``), never as markup or emoji codes."""
    from rich.table import Table
    from rich.text import Text

    from pymig.units import format_bytes

    verdict = (("complete and intact", "green") if analysis.ok else
               ("damaged", "red") if analysis.problems else ("incomplete", "yellow"))
    console.print(Text.assemble(f"pymig stream, version {analysis.version}, "
                                f"{analysis.bytes_read:,} bytes: ", verdict))
    if analysis.problems:
        first = analysis.problems[0]
        more = len(analysis.problems) - 1
        console.print(Text(f"first problem at byte {first.offset}: {first.reason}"
                           + (f" (+{more} more)" if more else "")))
    if analysis.config:
        c = analysis.config
        memory = c.get("memory_bytes")
        memory = format_bytes(memory) if type(memory) is int else _scalar(memory)
        console.print(Text(f"guest: {_scalar(c.get('kind'))}, {memory} RAM, "
                           f"{_scalar(c.get('vcpus'))} vCPU(s), workload "
                           f"{_scalar(c.get('workload'))}"))
    table = Table(title="sections", box=None)
    for column in ("offset", "type", "id", "idstr", "instance", "version", "size"):
        table.add_column(column, justify="right" if column != "idstr" else "left")
    parts: dict[str, list[int]] = {}
    for s in analysis.sections:
        if s["type"] == "PART":  # RAM parts are many: one line for all of them
            parts.setdefault(s["idstr"], []).append(s["size"])
            continue
        table.add_row(*(Text(str(v)) for v in (s["offset"], s["type"], s["section-id"],
                                               s["idstr"], s["instance"], s["version"])),
                      Text(f"{s['size']:,}"))
    for idstr, sizes in parts.items():
        table.add_row(Text(""), Text(f"PART x{len(sizes)}"), Text(""), Text(str(idstr)),
                      Text(""), Text(""), Text(f"{sum(sizes):,}"))
    console.print(table)
    if analysis.index:
        ix = analysis.index
        console.print(Text(f"restore index: {ix['superseded-ranges']:,} ranges of superseded "
                           f"RAM records ({format_bytes(ix['superseded-bytes'])}); a restore "
                           f"reads {format_bytes(ix['restore-reads'])} of the stream"))
    ram = analysis.ram
    console.print(Text(f"RAM: {ram.packets:,} packets, {ram.normal_pages:,} normal pages "
                       f"({format_bytes(ram.page_bytes)}, {ram.compressed_pages:,} of them "
                       f"compressed), {ram.zero_pages:,} zero pages, "
                       f"{format_bytes(ram.bytes)} on the wire, {ram.checksum_failures} "
                       f"checksum failures"))
    for name, disk in analysis.disks.items():
        size = format_bytes(disk.size) if disk.size is not None else "?"
        console.print(Text(f"{name}: a {size} disk, {disk.parts:,} parts, "
                           f"{format_bytes(disk.data_bytes)} of data in "
                           f"{disk.data_records:,} records, {format_bytes(disk.zero_bytes)} "
                           f"as {disk.zero_records:,} zero records"
                           + ("" if disk.ended else ", never ended")))
    for key, fields in analysis.state.items():
        console.print(Text(key, style="bold"))
        for name, value in _flatten(fields):
            console.print(Text(f"  {name} = {value}"))


def _scalar(value: Any) -> str:
    """A configuration value as a short text: a number or a string as it is (cut), anything
    else by its type (a crafted configuration may nest deeper than repr() can go)."""
    if isinstance(value, (str, int, float)) or value is None:
        return str(value)[:80]
    return f"<{type(value).__name__}>"


def _flatten(fields: dict, prefix: str = ""):
    for name, value in fields.items():
        if isinstance(value, dict) and "bytes" not in value:
            yield from _flatten(value, f"{prefix}{name}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            yield f"{prefix}{name}", f"{value:#x}" if value > 9 else str(value)
        else:
            yield f"{prefix}{name}", value
