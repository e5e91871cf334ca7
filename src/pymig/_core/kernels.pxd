# The C kernels (c/kernels.h), callable without the GIL.  They never touch Python objects:
# the .pyx wrappers check arguments first and raise the pymig.errors classes.
from cpython.pystate cimport PyThreadState
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t


cdef extern from "kernels.h" nogil:
    enum:
        PYMIG_NVARIANTS
        PYMIG_PACKET_HEADER_BYTES
        PYMIG_RUN_HEADER_BYTES

    ctypedef struct pymig_ops:
        const char *name
        int (*is_zero)(const unsigned char *buf, size_t len_bytes) noexcept nogil
        uint64_t (*read_sum)(const unsigned char *buf, size_t len_bytes) noexcept nogil
        uint64_t (*bitmap_count)(const uint64_t *bm, uint64_t npages) noexcept nogil
        uint64_t (*bitmap_count_runs)(const uint64_t *bm, uint64_t npages) noexcept nogil
        uint64_t (*bitmap_indices)(const uint64_t *bm, uint64_t npages, int64_t *out,
                                   uint64_t cap) noexcept nogil
        uint64_t (*bitmap_runs)(const uint64_t *bm, uint64_t npages, int64_t *out,
                                uint64_t cap) noexcept nogil
        uint64_t (*bitmap_merge)(uint64_t *dst, const uint64_t *src,
                                 uint64_t npages) noexcept nogil
        uint64_t (*bitmap_test_and_clear)(uint64_t *bm, uint64_t npages, uint64_t start,
                                          uint64_t count) noexcept nogil
        void (*xxh3_update)(void *state, const unsigned char *buf,
                            size_t len_bytes) noexcept nogil
        void (*copy_to_guest)(unsigned char *dst, const unsigned char *src,
                              size_t len_bytes) noexcept nogil

    const pymig_ops *pymig_variant_ops(int variant)
    int pymig_variant_supported(int variant)

    int pymig_zero_pages(const unsigned char *mem, uint64_t npages, uint32_t page_size,
                         const int64_t *pages, uint64_t count, unsigned char *out,
                         uint64_t *bad, const pymig_ops *ops)
    void pymig_zero_bitmap(const unsigned char *mem, uint32_t page_size, const uint64_t *bm,
                           uint64_t npages, uint64_t *out, const pymig_ops *ops)

    uint64_t pymig_bitmap_find_next(const uint64_t *bm, uint64_t npages, uint64_t start)
    void pymig_bitmap_set_range(uint64_t *bm, uint64_t start, uint64_t count)

    ctypedef struct pymig_packet_error:
        uint64_t offset
        int fault
        uint64_t args[4]

    ctypedef struct pymig_packet_header:
        uint32_t magic
        uint16_t version
        uint16_t flags
        uint32_t block_id
        uint32_t page_size
        uint32_t record_count
        uint32_t payload_len
        uint64_t checksum

    ctypedef struct pymig_encode_result:
        uint64_t nbytes, cursor, normal_pages, zero_pages, runs, compressed_pages

    ctypedef struct pymig_decode_result:
        uint64_t normal_pages, zero_pages, runs, compressed_pages

    ctypedef struct pymig_compress_state:
        uint32_t skip_units, fails

    int pymig_packet_header_parse(const unsigned char *buf, size_t len_bytes,
                                  pymig_packet_header *hdr, pymig_packet_error *err)
    void pymig_encode_packet(const unsigned char *mem, uint32_t page_size, uint32_t block_id,
                             uint64_t *bm, uint64_t npages, uint64_t cursor,
                             unsigned char *out, size_t out_bytes,
                             pymig_compress_state *compress, const pymig_ops *ops,
                             pymig_encode_result *res)
    int pymig_decode_packet(const unsigned char *pkt, size_t pkt_bytes, unsigned char *mem,
                            uint32_t page_size, uint32_t block_id, uint64_t npages,
                            uint64_t *present, const pymig_ops *ops, pymig_decode_result *res,
                            pymig_packet_error *err)
    int pymig_packet_runs(const unsigned char *pkt, size_t pkt_bytes, uint32_t page_size,
                          uint32_t block_id, uint64_t npages, int64_t *runs_out,
                          pymig_decode_result *res, pymig_packet_error *err)
    int pymig_page_hashes(const unsigned char *mem, uint64_t npages, uint32_t page_size,
                          const int64_t *pages, uint64_t count, uint64_t *out, uint64_t *bad,
                          const pymig_ops *ops)
    uint64_t pymig_xxh3_64(const unsigned char *buf, size_t len_bytes, const pymig_ops *ops)


cdef extern from "Python.h":
    PyThreadState *PyEval_SaveThread() nogil
    void PyEval_RestoreThread(PyThreadState *state) nogil


# Release the GIL only for work worth more than releasing it: a thread that gives the GIL up
# may wait a whole switch interval (5 ms) to get it back when others are busy, so calls on
# less than this keep it (python-xxhash does the same with XXHASH_GIL_MINSIZE).  Cython's
# `with nogil(<condition>)` takes only compile-time conditions, hence the pair below; callers
# take every pointer before releasing and call only C between the two.
cdef enum:
    NOGIL_MIN_BYTES = 64 * 1024
    NOGIL_MIN_PAGES = 64 * 1024   # bitmap bits: 8 KiB of bitmap


cdef inline PyThreadState *release_gil_if(bint worth_it) noexcept:
    return PyEval_SaveThread() if worth_it else NULL


cdef inline void reacquire_gil(PyThreadState *state) noexcept:
    if state != NULL:
        PyEval_RestoreThread(state)
