/*
 * pymig compiled page core: declarations shared by the C kernels and the Cython wrappers.
 *
 * Rules every kernel follows:
 *   - arguments were checked by the caller (with the GIL); the kernels still never read or
 *     write outside the lengths they are given;
 *   - they never touch a Python object and can run with the GIL released;
 *   - failure is a negative errno-style return, with details in an out-parameter.
 *
 * Dirty bitmaps use KVM's layout: little-endian 64-bit words, bit i of the bitmap is page i
 * (bit i % 64 of word i / 64).  Bits at index >= npages are ignored and never modified.
 */
#ifndef PYMIG_KERNELS_H
#define PYMIG_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------- SIMD variants (cpu.c) */

/* Preference order: the first supported variant not disabled by PYMIG_DISABLE_SIMD wins. */
enum {
    PYMIG_VARIANT_AVX512 = 0,
    PYMIG_VARIANT_AVX2 = 1,
    PYMIG_VARIANT_SCALAR = 2,
    PYMIG_NVARIANTS = 3
};

/* The kernels whose speed depends on the instruction set; one table per variant. */
typedef struct pymig_ops {
    const char *name;
    /* 1 if all len_bytes bytes are zero; exits at the first non-zero block */
    int (*is_zero)(const unsigned char *buf, size_t len_bytes);
    /* sum of the buffer as little-endian u64 words (tail bytes added singly): a pure read
     * pass, the ceiling the zero scan is measured against */
    uint64_t (*read_sum)(const unsigned char *buf, size_t len_bytes);
    uint64_t (*bitmap_count)(const uint64_t *bm, uint64_t npages);
    uint64_t (*bitmap_count_runs)(const uint64_t *bm, uint64_t npages);
    /* fill out with at most cap indices / (start, length) pairs and return how many: the
     * caller sizes out with bitmap_count / bitmap_count_runs, and cap keeps a bitmap another
     * thread changes in between from writing past it */
    uint64_t (*bitmap_indices)(const uint64_t *bm, uint64_t npages, int64_t *out, uint64_t cap);
    uint64_t (*bitmap_runs)(const uint64_t *bm, uint64_t npages, int64_t *out_pairs,
                            uint64_t cap);
    uint64_t (*bitmap_merge)(uint64_t *dst, const uint64_t *src, uint64_t npages);
    uint64_t (*bitmap_test_and_clear)(uint64_t *bm, uint64_t npages, uint64_t start,
                                      uint64_t count);
    /* XXH3_64bits_update on an XXH3_state_t (void * keeps xxhash.h out of this header) */
    void (*xxh3_update)(void *state, const unsigned char *buf, size_t len_bytes);
    /* memcpy into guest memory (large copies bypass the cache) */
    void (*copy_to_guest)(unsigned char *dst, const unsigned char *src, size_t len_bytes);
} pymig_ops;

/* The table of a variant, or NULL when it is not compiled in (non-x86 builds). */
const pymig_ops *pymig_variant_ops(int variant);
/* 1 when this CPU and its OS (XSAVE state enabled in XCR0) can run the variant. */
int pymig_variant_supported(int variant);

/* ------------------------------------------------------------- zero pages (zeropage*.c) */

int pymig_is_zero_scalar(const unsigned char *buf, size_t len_bytes);
uint64_t pymig_read_sum_scalar(const unsigned char *buf, size_t len_bytes);
#if defined(__x86_64__)
int pymig_is_zero_avx2(const unsigned char *buf, size_t len_bytes);
uint64_t pymig_read_sum_avx2(const unsigned char *buf, size_t len_bytes);
int pymig_is_zero_avx512(const unsigned char *buf, size_t len_bytes);
uint64_t pymig_read_sum_avx512(const unsigned char *buf, size_t len_bytes);
#endif

/* ------------------------------------------------ packet helpers (packet_scalar/avx2.c) */

void pymig_xxh3_update_scalar(void *state, const unsigned char *buf, size_t len_bytes);
void pymig_copy_to_guest_scalar(unsigned char *dst, const unsigned char *src, size_t len_bytes);
#if defined(__x86_64__)
void pymig_xxh3_update_avx2(void *state, const unsigned char *buf, size_t len_bytes);
void pymig_copy_to_guest_avx2(unsigned char *dst, const unsigned char *src, size_t len_bytes);
#endif

/* out[i] = 1 if page pages[i] of mem is all zero.  -ERANGE (and *bad = i) if a page index lies
 * outside the npages pages of mem; nothing after it is checked. */
int pymig_zero_pages(const unsigned char *mem, uint64_t npages, uint32_t page_size,
                     const int64_t *pages, uint64_t count, unsigned char *out, uint64_t *bad,
                     const pymig_ops *ops);
/* out (bitmap_words(npages) words, zeroed by the caller) gets the pages set in bm that are
 * all zero. */
void pymig_zero_bitmap(const unsigned char *mem, uint32_t page_size, const uint64_t *bm,
                       uint64_t npages, uint64_t *out, const pymig_ops *ops);

/* ------------------------------------------------------------------ bitmaps (bitmap*.c) */

#define PYMIG_BITMAP_DECLARE(suffix)                                                     \
    uint64_t pymig_bitmap_count_##suffix(const uint64_t *bm, uint64_t npages);           \
    uint64_t pymig_bitmap_count_runs_##suffix(const uint64_t *bm, uint64_t npages);      \
    uint64_t pymig_bitmap_indices_##suffix(const uint64_t *bm, uint64_t npages,          \
                                           int64_t *out, uint64_t cap);                  \
    uint64_t pymig_bitmap_runs_##suffix(const uint64_t *bm, uint64_t npages, int64_t *out, \
                                        uint64_t cap);                                   \
    uint64_t pymig_bitmap_merge_##suffix(uint64_t *dst, const uint64_t *src,             \
                                         uint64_t npages);                               \
    uint64_t pymig_bitmap_test_and_clear_##suffix(uint64_t *bm, uint64_t npages,         \
                                                  uint64_t start, uint64_t count);

PYMIG_BITMAP_DECLARE(scalar)
#if defined(__x86_64__)
PYMIG_BITMAP_DECLARE(avx2)
#endif

/* Not instruction-set sensitive: one version each (bitmap.c). */
uint64_t pymig_bitmap_find_next(const uint64_t *bm, uint64_t npages, uint64_t start);
/* sets [start, start + count); the caller checked start + count <= npages */
void pymig_bitmap_set_range(uint64_t *bm, uint64_t start, uint64_t count);

/* ------------------------------------------------------------------ RAM packets (packet.c) */

#define PYMIG_PACKET_HEADER_BYTES 32
#define PYMIG_RUN_HEADER_BYTES 16
#define PYMIG_PACKET_VERSION 2
#define PYMIG_RUN_NORMAL 1
#define PYMIG_RUN_ZERO 2
#define PYMIG_RUN_COMPRESSED 3
#define PYMIG_MAX_PAGE_SIZE (1u << 30)
/* A COMPRESSED run's record is followed by u32 data length, u32 reserved (0), then the data. */
#define PYMIG_COMPRESSED_HEADER_BYTES 8
/* The encoder compresses runs of at most this many bytes (LZ4's window is 64 KiB) */
#define PYMIG_COMPRESS_UNIT_BYTES (64u * 1024u)
/* and the decoder refuses a compressed run that would decode to more than this */
#define PYMIG_MAX_COMPRESSED_RUN_BYTES (1u << 30)

/* Why a packet was refused; pymig._coreshared.PacketFault has the same numbers and turns
 * them (with args) into the reason text, so both backends word it identically. */
enum pymig_packet_fault {
    PYMIG_FAULT_HEADER_TRUNCATED = 1,  /* args: bytes present */
    PYMIG_FAULT_MAGIC = 2,             /* args: magic as LE u32 */
    PYMIG_FAULT_VERSION = 3,           /* args: version */
    PYMIG_FAULT_FLAGS = 4,             /* args: flags */
    PYMIG_FAULT_PAGE_SIZE = 5,         /* args: page size */
    PYMIG_FAULT_RECORD_COUNT = 6,      /* args: record count, payload length */
    PYMIG_FAULT_BLOCK = 7,             /* args: block id, expected */
    PYMIG_FAULT_PAGE_SIZE_MISMATCH = 8, /* args: page size, expected */
    PYMIG_FAULT_LENGTH = 9,            /* args: payload length, bytes after the header */
    PYMIG_FAULT_RUN_TRUNCATED = 10,    /* args: run index, bytes left */
    PYMIG_FAULT_RUN_EMPTY = 11,        /* args: run index */
    PYMIG_FAULT_RUN_KIND = 12,         /* args: run index, kind */
    PYMIG_FAULT_RUN_RESERVED = 13,     /* args: run index */
    PYMIG_FAULT_RUN_RANGE = 14,        /* args: run index, first page, page count, npages */
    PYMIG_FAULT_RUN_ORDER = 15,        /* args: run index, first page, end of previous run */
    PYMIG_FAULT_RUN_DATA = 16,         /* args: run index, data bytes, bytes left */
    PYMIG_FAULT_TRAILING = 17,         /* args: bytes left, record count */
    PYMIG_FAULT_CHECKSUM = 18,         /* args: stored checksum, computed checksum */
    PYMIG_FAULT_RUN_COMPRESSED_SIZE = 19, /* args: run index, bytes it decodes to, LZ4 bytes */
    PYMIG_FAULT_RUN_DECOMPRESS = 20    /* args: run index, bytes it should decode to */
};

typedef struct pymig_packet_error {
    uint64_t offset;  /* byte offset of the offending field inside the packet */
    int fault;        /* enum pymig_packet_fault */
    uint64_t args[4];
} pymig_packet_error;

typedef struct pymig_packet_header {
    uint32_t magic;
    uint16_t version;
    uint16_t flags;
    uint32_t block_id;
    uint32_t page_size;
    uint32_t record_count;
    uint32_t payload_len;
    uint64_t checksum;
} pymig_packet_header;

/* normal_pages counts every page sent with its data; compressed_pages is the part of them
 * sent in COMPRESSED runs. */
typedef struct pymig_encode_result {
    uint64_t nbytes, cursor, normal_pages, zero_pages, runs, compressed_pages;
} pymig_encode_result;

typedef struct pymig_decode_result {
    uint64_t normal_pages, zero_pages, runs, compressed_pages;
} pymig_decode_result;

/* The encoder's memory of how well compression went, kept by the caller across packets: after
 * a unit that did not shrink by an eighth, the next 1, 2, 4 ... 64 units (one more doubling per
 * failure in a row) are copied without trying, so incompressible memory costs about one try
 * in 65 units; one unit that compresses resets both. */
typedef struct pymig_compress_state {
    uint32_t skip_units, fails;
} pymig_compress_state;

/* Parses and checks the 32-byte header only (magic, version, flags, page size, record count
 * against payload length).  0, or -EBADMSG with *err filled. */
int pymig_packet_header_parse(const unsigned char *buf, size_t len_bytes,
                              pymig_packet_header *hdr, pymig_packet_error *err);

/* Takes dirty pages from bm at or after cursor (clearing each bit it takes) and writes one
 * packet into out.  mem holds npages pages; out_bytes >= 32 + 16 + page_size. */
void pymig_encode_packet(const unsigned char *mem, uint32_t page_size, uint32_t block_id,
                         uint64_t *bm, uint64_t npages, uint64_t cursor, unsigned char *out,
                         size_t out_bytes, pymig_compress_state *compress,
                         const pymig_ops *ops, pymig_encode_result *res);

/* Checks the whole packet, then applies it to mem (npages pages).  present may be NULL.
 * 0, or -EBADMSG with *err filled.  Every fault but RUN_DECOMPRESS is found before any write;
 * that one (LZ4 data that does not decode to its run, in a packet whose checksum holds) is
 * found while writing, and leaves that run's pages undefined: never a byte outside them. */
int pymig_decode_packet(const unsigned char *pkt, size_t pkt_bytes, unsigned char *mem,
                        uint32_t page_size, uint32_t block_id, uint64_t npages,
                        uint64_t *present, const pymig_ops *ops, pymig_decode_result *res,
                        pymig_packet_error *err);
/* The checks of pymig_decode_packet before its checksum, and each run's (first, count) into
 * runs_out, room for (pkt_bytes - 32) / 16 pairs; guest memory is not touched. */
int pymig_packet_runs(const unsigned char *pkt, size_t pkt_bytes, uint32_t page_size,
                      uint32_t block_id, uint64_t npages, int64_t *runs_out,
                      pymig_decode_result *res, pymig_packet_error *err);

/* out[i] = xxh3-64 (seed 0) of page pages[i] of mem, through the variant's update.  -ERANGE
 * (and *bad = i) if a page index lies outside the npages pages of mem; nothing after it is
 * hashed. */
int pymig_page_hashes(const unsigned char *mem, uint64_t npages, uint32_t page_size,
                      const int64_t *pages, uint64_t count, uint64_t *out, uint64_t *bad,
                      const pymig_ops *ops);

/* xxh3-64, seed 0, of one buffer through the variant's streaming update (tests compare it
 * with the Python xxhash package). */
uint64_t pymig_xxh3_64(const unsigned char *buf, size_t len_bytes, const pymig_ops *ops);

#endif /* PYMIG_KERNELS_H */
