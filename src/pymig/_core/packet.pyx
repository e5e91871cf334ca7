# distutils: sources = src/pymig/_core/c/packet.c src/pymig/_core/c/lz4_unit.c
# cython: boundscheck=False, wraparound=False
"""RAM packets: encode dirty pages into one packet, inspect a header, decode into memory.

The layout is in docs/stream-format.md ("RAM packets").  The checks and their order are the
reference's (pymig._reference); faults come back from C as numbers and are worded by
pymig._coreshared.packet_error, so both backends raise the same PacketError.
"""

import numpy as np

from pymig._coreshared import (DecodeResult, EncodeResult, PacketInfo, byte_view, decode_args,
                               encode_args, packet_error, runs_args)

from cpython.pystate cimport PyThreadState
from libc.stdint cimport int64_t, uint32_t, uint64_t

from pymig._core.cpu cimport current_ops
from pymig._core.kernels cimport (NOGIL_MIN_BYTES, pymig_compress_state, pymig_decode_packet,
                                  pymig_decode_result, pymig_encode_packet, pymig_encode_result, pymig_packet_runs,
                                  pymig_packet_error, pymig_packet_header,
                                  pymig_packet_header_parse, pymig_ops, pymig_xxh3_64,
                                  reacquire_gil, release_gil_if)


cdef inline const unsigned char *_ro(const unsigned char[::1] view) noexcept:
    return &view[0] if view.shape[0] else NULL


cdef _raise(const pymig_packet_error *err):
    raise packet_error(err.fault, err.offset, err.args[0], err.args[1], err.args[2],
                       err.args[3])


def encode_packet(mem, page_size, block_id, bm, npages, cursor, out,
                  compress=None) -> EncodeResult:
    """Move dirty pages from ``bm`` (at or after ``cursor``; each bit taken is cleared) into
    one packet written at the start of ``out``, whose length is the packet capacity; with a
    ``compress`` state (:func:`pymig.core.new_compress_state`), runs that shrink under LZ4 go
    out compressed (and ``out`` past the packet's end may hold what was planned before)."""
    mem, page_size, block_id, bm, npages, cursor, out, compress = encode_args(
        mem, page_size, block_id, bm, npages, cursor, out, compress)
    if npages == 0:
        return EncodeResult(0, 0, 0, 0, 0, 0)
    cdef const unsigned char[::1] src = mem
    cdef uint64_t[::1] dirty = bm
    cdef unsigned char[::1] dst = out
    cdef const unsigned char *src_ptr = &src[0]
    cdef uint64_t *bits = &dirty[0]
    cdef unsigned char *dst_ptr = &dst[0]
    cdef uint32_t ps = page_size, block = block_id
    cdef uint64_t n = npages, start = cursor
    cdef size_t cap = dst.shape[0]
    cdef pymig_encode_result res
    cdef const pymig_ops *ops = current_ops()
    cdef uint32_t[::1] state
    cdef pymig_compress_state *state_ptr = NULL
    if compress is not None:
        state = compress
        state_ptr = <pymig_compress_state *>&state[0]
    # the work is the pages examined (zero pages cost no packet space), not the capacity
    cdef PyThreadState *ts = release_gil_if((n - start) * ps >= NOGIL_MIN_BYTES)
    pymig_encode_packet(src_ptr, ps, block, bits, n, start, dst_ptr, cap, state_ptr, ops, &res)
    reacquire_gil(ts)
    return EncodeResult(res.nbytes, res.cursor, res.normal_pages, res.zero_pages, res.runs,
                        res.compressed_pages)


def packet_info(buf) -> PacketInfo:
    """Parse and check the 32-byte header at the start of ``buf`` (the rest is not read)."""
    cdef const unsigned char[::1] view = byte_view(buf, "buf")
    cdef pymig_packet_header h
    cdef pymig_packet_error err
    if pymig_packet_header_parse(_ro(view), view.shape[0], &h, &err):
        _raise(&err)
    return PacketInfo(h.version, h.block_id, h.page_size, h.record_count, h.payload_len,
                      h.checksum, 32 + <uint64_t>h.payload_len)


def decode_packet(packet, mem, page_size, block_id, npages, present=None) -> DecodeResult:
    """Check ``packet`` completely, then apply it to ``mem`` (``npages`` pages); see
    pymig.core for the rules.  Raises PacketError without writing anything on a bad packet."""
    packet, mem, page_size, block_id, npages, present = decode_args(
        packet, mem, page_size, block_id, npages, present)
    cdef const unsigned char[::1] pkt = packet
    cdef unsigned char[::1] dst = mem
    cdef uint64_t[::1] bits
    cdef uint64_t *bits_ptr = NULL
    cdef uint32_t ps = page_size, block = block_id
    cdef uint64_t n = npages
    cdef size_t size = pkt.shape[0]
    cdef const unsigned char *pkt_ptr = _ro(pkt)
    cdef unsigned char *mem_ptr = &dst[0] if dst.shape[0] else NULL
    cdef pymig_decode_result res
    cdef pymig_packet_error err
    cdef const pymig_ops *ops = current_ops()
    if present is not None and n:
        bits = present
        bits_ptr = &bits[0]
    # a small packet may still declare a long ZERO run over a large block
    cdef PyThreadState *ts = release_gil_if(size >= NOGIL_MIN_BYTES or n * ps >= NOGIL_MIN_BYTES)
    cdef int rc = pymig_decode_packet(pkt_ptr, size, mem_ptr, ps, block, n, bits_ptr, ops,
                                      &res, &err)
    reacquire_gil(ts)
    if rc:
        _raise(&err)
    return DecodeResult(res.normal_pages, res.zero_pages, res.runs, res.compressed_pages)


def packet_runs(packet, page_size, block_id, npages):
    """Each run of ``packet`` as (first page, page count), an int64 array of shape (runs, 2),
    after the checks :func:`decode_packet` makes before the checksum (which is not checked:
    for a packet this process encoded, such as a snapshot's index)."""
    packet, page_size, block_id, npages = runs_args(packet, page_size, block_id, npages)
    cdef const unsigned char[::1] pkt = packet
    cdef size_t size = pkt.shape[0]
    # Room for the runs the header counts, no more than the packet can hold (16 bytes each):
    # a packet of one run needs one row, not a row per 16 bytes of its pages.
    cdef Py_ssize_t rows = max(<Py_ssize_t>size - 32, 0) // 16
    if size >= 32:
        rows = min(rows, <Py_ssize_t>int.from_bytes(pkt[16:20], "little"))
    out = np.empty((rows, 2), dtype=np.int64)
    cdef int64_t[:, ::1] runs = out
    cdef int64_t *runs_ptr = &runs[0, 0] if runs.shape[0] else NULL
    cdef pymig_decode_result res
    cdef pymig_packet_error err
    if pymig_packet_runs(_ro(pkt), size, page_size, block_id, npages, runs_ptr, &res, &err):
        _raise(&err)
    return out[:res.runs]


def _xxh3_64(buf) -> int:
    """xxh3-64 (seed 0) of ``buf`` by the vendored C xxHash, with the current variant's
    update stage (tests compare it with the xxhash package)."""
    cdef const unsigned char[::1] view = byte_view(buf, "buf")
    return pymig_xxh3_64(_ro(view), view.shape[0], current_ops())
