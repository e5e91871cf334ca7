/*
 * RAM packets: encode dirty pages into one packet, check and apply a received one.
 * The byte layout is documented in docs/stream-format.md ("RAM packets").
 *
 *   header (32 bytes)                 run record (16 bytes), then page data for NORMAL runs
 *   0  u32 magic "PMGP"               0  u64 first_page
 *   4  u16 version (1)                8  u32 page_count (>= 1)
 *   6  u16 flags (0)                  12 u8  kind (1 NORMAL, 2 ZERO)
 *   8  u32 block_id                   13 u8  reserved (0)
 *   12 u32 page_size                  14 u16 reserved (0)
 *   16 u32 record_count
 *   20 u32 payload_len
 *   24 u64 checksum = xxh3-64(header[0:24] + payload)
 *
 * Encoding plans the packet first (which pages, which runs; the zero check of a page with data
 * reads about one cache line), because the checksum starts with header fields only known at
 * the end.  Then it copies each NORMAL run in chunks and hashes every chunk from the packet
 * right after copying it, while it is still in L1/L2: one pass over guest memory, and the hash
 * covers exactly the bytes sent even if the guest writes the page meanwhile.
 *
 * Decoding checks the header, walks every run record (bounds, kind, order, sizes) and verifies
 * the checksum before it writes a single byte of guest memory.
 */
#include <errno.h>
#include <string.h>

#include "kernels.h"
#include "bitops.h"

#define XXH_INLINE_ALL
#include "xxhash/xxhash.h"

/* Copy and hash granularity: small enough to stay in L1/L2 between the copy and the hash. */
#define CHUNK_BYTES (32u * 1024u)
#define PACKET_MAGIC UINT32_C(0x50474d50) /* "PMGP" read as a little-endian u32 */

/* Field offsets: of the packet header, then of a run record. */
enum {
    H_MAGIC = 0, H_VERSION = 4, H_FLAGS = 6, H_BLOCK = 8, H_PAGE_SIZE = 12, H_RECORDS = 16,
    H_PAYLOAD_LEN = 20, H_CHECKSUM = 24
};
enum { R_FIRST = 0, R_COUNT = 8, R_KIND = 12, R_RESERVED8 = 13, R_RESERVED16 = 14 };
_Static_assert(H_CHECKSUM + 8 == PYMIG_PACKET_HEADER_BYTES, "header: 32 bytes, checksum last");
_Static_assert(R_RESERVED16 + 2 == PYMIG_RUN_HEADER_BYTES, "run record: 16 bytes");

static inline uint16_t rd16(const unsigned char *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static inline uint32_t rd32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static inline uint64_t rd64(const unsigned char *p)
{
    return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32);
}

static inline void wr16(unsigned char *p, uint16_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static inline void wr32(unsigned char *p, uint32_t v)
{
    wr16(p, (uint16_t)v);
    wr16(p + 2, (uint16_t)(v >> 16));
}

static inline void wr64(unsigned char *p, uint64_t v)
{
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

static int fault(pymig_packet_error *err, uint64_t offset, int what, uint64_t a, uint64_t b,
                 uint64_t c, uint64_t d)
{
    err->offset = offset;
    err->fault = what;
    err->args[0] = a;
    err->args[1] = b;
    err->args[2] = c;
    err->args[3] = d;
    return -EBADMSG;
}

uint64_t pymig_xxh3_64(const unsigned char *buf, size_t len_bytes, const pymig_ops *ops)
{
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    ops->xxh3_update(&state, buf, len_bytes);
    return XXH3_64bits_digest(&state);
}

int pymig_packet_header_parse(const unsigned char *buf, size_t len_bytes,
                              pymig_packet_header *hdr, pymig_packet_error *err)
{
    if (len_bytes < PYMIG_PACKET_HEADER_BYTES)
        return fault(err, len_bytes, PYMIG_FAULT_HEADER_TRUNCATED, len_bytes, 0, 0, 0);
    hdr->magic = rd32(buf + H_MAGIC);
    hdr->version = rd16(buf + H_VERSION);
    hdr->flags = rd16(buf + H_FLAGS);
    hdr->block_id = rd32(buf + H_BLOCK);
    hdr->page_size = rd32(buf + H_PAGE_SIZE);
    hdr->record_count = rd32(buf + H_RECORDS);
    hdr->payload_len = rd32(buf + H_PAYLOAD_LEN);
    hdr->checksum = rd64(buf + H_CHECKSUM);
    if (hdr->magic != PACKET_MAGIC)
        return fault(err, H_MAGIC, PYMIG_FAULT_MAGIC, hdr->magic, 0, 0, 0);
    if (hdr->version != PYMIG_PACKET_VERSION)
        return fault(err, H_VERSION, PYMIG_FAULT_VERSION, hdr->version, 0, 0, 0);
    if (hdr->flags != 0)
        return fault(err, H_FLAGS, PYMIG_FAULT_FLAGS, hdr->flags, 0, 0, 0);
    uint32_t ps = hdr->page_size;
    if (ps < 512 || ps > PYMIG_MAX_PAGE_SIZE || (ps & (ps - 1)))
        return fault(err, H_PAGE_SIZE, PYMIG_FAULT_PAGE_SIZE, ps, 0, 0, 0);
    if ((uint64_t)hdr->record_count * PYMIG_RUN_HEADER_BYTES > hdr->payload_len)
        return fault(err, H_RECORDS, PYMIG_FAULT_RECORD_COUNT, hdr->record_count, hdr->payload_len, 0,
                     0);
    return 0;
}

/* ------------------------------------------------------------------------------ encode */

/* Pass 1: choose the pages and write the run records in place; returns bytes used. */
static uint64_t plan(const unsigned char *mem, uint32_t ps, uint64_t *bm, uint64_t npages,
                     uint64_t cursor, unsigned char *out, uint64_t cap, const pymig_ops *ops,
                     pymig_encode_result *res)
{
    uint64_t used = PYMIG_PACKET_HEADER_BYTES;
    unsigned char *run = NULL; /* record of the open run */
    uint64_t run_end = 0, run_count = 0;
    int run_kind = 0;
    uint64_t page = pymig_next_set(bm, npages, cursor);
    for (; page < npages; page = pymig_next_set(bm, npages, page + 1)) {
        int kind = ops->is_zero(mem + page * ps, ps) ? PYMIG_RUN_ZERO : PYMIG_RUN_NORMAL;
        uint64_t data = kind == PYMIG_RUN_NORMAL ? ps : 0;
        int extend = kind == run_kind && page == run_end && run_count < UINT32_MAX;
        uint64_t need = data + (extend ? 0 : PYMIG_RUN_HEADER_BYTES);
        if (need > cap - used)
            break;
        if (!extend) {
            if (run)
                wr32(run + R_COUNT, (uint32_t)run_count);
            run = out + used;
            wr64(run + R_FIRST, page);
            run[R_KIND] = (unsigned char)kind;
            run[R_RESERVED8] = 0;
            wr16(run + R_RESERVED16, 0);
            run_kind = kind;
            run_count = 0;
            used += PYMIG_RUN_HEADER_BYTES;
            res->runs++;
        }
        run_count++;
        run_end = page + 1;
        used += data;
        if (kind == PYMIG_RUN_NORMAL)
            res->normal_pages++;
        else
            res->zero_pages++;
        bm[page >> 6] &= ~(UINT64_C(1) << (page & 63));
    }
    if (run)
        wr32(run + R_COUNT, (uint32_t)run_count);
    res->cursor = page;
    return used;
}

void pymig_encode_packet(const unsigned char *mem, uint32_t page_size, uint32_t block_id,
                         uint64_t *bm, uint64_t npages, uint64_t cursor, unsigned char *out,
                         size_t out_bytes, const pymig_ops *ops, pymig_encode_result *res)
{
    uint64_t cap = (uint64_t)PYMIG_PACKET_HEADER_BYTES + UINT32_MAX;
    if ((uint64_t)out_bytes < cap)
        cap = out_bytes;
    memset(res, 0, sizeof(*res));
    uint64_t used = plan(mem, page_size, bm, npages, cursor, out, cap, ops, res);
    if (res->runs == 0)
        return; /* nothing dirty at or after cursor: nbytes 0, out untouched */
    res->nbytes = used;

    wr32(out + H_MAGIC, PACKET_MAGIC);
    wr16(out + H_VERSION, PYMIG_PACKET_VERSION);
    wr16(out + H_FLAGS, 0);
    wr32(out + H_BLOCK, block_id);
    wr32(out + H_PAGE_SIZE, page_size);
    wr32(out + H_RECORDS, (uint32_t)res->runs);
    wr32(out + H_PAYLOAD_LEN, (uint32_t)(used - PYMIG_PACKET_HEADER_BYTES));

    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    ops->xxh3_update(&state, out, H_CHECKSUM);
    uint64_t off = PYMIG_PACKET_HEADER_BYTES;
    /* Pass 2: walk the records just written, copy and hash. */
    for (uint64_t r = 0; r < res->runs && used - off >= PYMIG_RUN_HEADER_BYTES; r++) {
        unsigned char *rec = out + off;
        ops->xxh3_update(&state, rec, PYMIG_RUN_HEADER_BYTES);
        off += PYMIG_RUN_HEADER_BYTES;
        if (rec[R_KIND] != PYMIG_RUN_NORMAL)
            continue;
        uint64_t first = rd64(rec + R_FIRST), count = rd32(rec + R_COUNT);
        uint64_t total = count * page_size;
        /* out is caller memory: if another thread scribbled on a record meanwhile, stop
         * rather than read outside mem (the checksum then no longer matches) */
        if (first >= npages || count > npages - first || total > used - off)
            break;
        const unsigned char *src = mem + first * page_size;
        for (uint64_t done = 0; done < total; done += CHUNK_BYTES) {
            size_t n = total - done < CHUNK_BYTES ? (size_t)(total - done) : CHUNK_BYTES;
            memcpy(out + off + done, src + done, n);
            ops->xxh3_update(&state, out + off + done, n);
        }
        off += total;
    }
    wr64(out + H_CHECKSUM, XXH3_64bits_digest(&state));
}

/* ------------------------------------------------------------------------------ decode */

/* Every check that needs no guest memory: header against the caller's expectations, then
 * every run record.  With ``runs_out``, each run's (first page, page count) goes there: a
 * run needs 16 bytes of packet, so (pkt_bytes - 32) / 16 pairs always fit. */
static int validate(const unsigned char *pkt, size_t pkt_bytes, uint32_t page_size,
                    uint32_t block_id, uint64_t npages, pymig_packet_header *h,
                    pymig_decode_result *res, int64_t *runs_out, pymig_packet_error *err)
{
    if (pymig_packet_header_parse(pkt, pkt_bytes, h, err))
        return -EBADMSG;
    if (h->block_id != block_id)
        return fault(err, H_BLOCK, PYMIG_FAULT_BLOCK, h->block_id, block_id, 0, 0);
    if (h->page_size != page_size)
        return fault(err, H_PAGE_SIZE, PYMIG_FAULT_PAGE_SIZE_MISMATCH, h->page_size, page_size, 0, 0);
    uint64_t body = pkt_bytes - PYMIG_PACKET_HEADER_BYTES;
    if (body != h->payload_len)
        return fault(err, H_PAYLOAD_LEN, PYMIG_FAULT_LENGTH, h->payload_len, body, 0, 0);

    uint64_t off = PYMIG_PACKET_HEADER_BYTES, end = off + h->payload_len, prev_end = 0;
    for (uint64_t r = 0; r < h->record_count; r++) {
        uint64_t left = end - off;
        if (left < PYMIG_RUN_HEADER_BYTES)
            return fault(err, off, PYMIG_FAULT_RUN_TRUNCATED, r, left, 0, 0);
        const unsigned char *rec = pkt + off;
        uint64_t first = rd64(rec + R_FIRST);
        uint32_t count = rd32(rec + R_COUNT);
        unsigned kind = rec[R_KIND];
        if (count == 0)
            return fault(err, off + R_COUNT, PYMIG_FAULT_RUN_EMPTY, r, 0, 0, 0);
        if (kind != PYMIG_RUN_NORMAL && kind != PYMIG_RUN_ZERO)
            return fault(err, off + R_KIND, PYMIG_FAULT_RUN_KIND, r, kind, 0, 0);
        if (rec[R_RESERVED8] != 0)
            return fault(err, off + R_RESERVED8, PYMIG_FAULT_RUN_RESERVED, r, 0, 0, 0);
        if (rd16(rec + R_RESERVED16) != 0)
            return fault(err, off + R_RESERVED16, PYMIG_FAULT_RUN_RESERVED, r, 0, 0, 0);
        if (first >= npages || count > npages - first)
            return fault(err, off, PYMIG_FAULT_RUN_RANGE, r, first, count, npages);
        if (first < prev_end)
            return fault(err, off, PYMIG_FAULT_RUN_ORDER, r, first, prev_end, 0);
        uint64_t data = kind == PYMIG_RUN_NORMAL ? (uint64_t)count * page_size : 0;
        if (data > left - PYMIG_RUN_HEADER_BYTES)
            return fault(err, off + 16, PYMIG_FAULT_RUN_DATA, r, data,
                         left - PYMIG_RUN_HEADER_BYTES, 0);
        if (runs_out) {
            runs_out[2 * res->runs] = (int64_t)first;
            runs_out[2 * res->runs + 1] = (int64_t)count;
        }
        off += PYMIG_RUN_HEADER_BYTES + data;
        prev_end = first + count;
        if (kind == PYMIG_RUN_NORMAL)
            res->normal_pages += count;
        else
            res->zero_pages += count;
        res->runs++;
    }
    if (off != end)
        return fault(err, off, PYMIG_FAULT_TRAILING, end - off, h->record_count, 0, 0);
    return 0;
}

static void clear_zero_run(unsigned char *mem, uint32_t ps, uint64_t first, uint64_t count,
                           uint64_t *present, const pymig_ops *ops)
{
    for (uint64_t page = first; page < first + count; page++) {
        uint64_t bit = UINT64_C(1) << (page & 63);
        if (present) {
            if (!(present[page >> 6] & bit))
                continue; /* known zero: not even read, so never faulted in */
            present[page >> 6] &= ~bit;
        }
        unsigned char *dst = mem + page * ps;
        /* writing zeros over zeros would still dirty (and fault in) the page */
        if (!ops->is_zero(dst, ps))
            memset(dst, 0, ps);
    }
}

int pymig_decode_packet(const unsigned char *pkt, size_t pkt_bytes, unsigned char *mem,
                        uint32_t page_size, uint32_t block_id, uint64_t npages,
                        uint64_t *present, const pymig_ops *ops, pymig_decode_result *res,
                        pymig_packet_error *err)
{
    pymig_packet_header h;
    memset(res, 0, sizeof(*res));
    if (validate(pkt, pkt_bytes, page_size, block_id, npages, &h, res, NULL, err))
        return -EBADMSG;

    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    ops->xxh3_update(&state, pkt, H_CHECKSUM);
    ops->xxh3_update(&state, pkt + PYMIG_PACKET_HEADER_BYTES, h.payload_len);
    uint64_t sum = XXH3_64bits_digest(&state);
    if (sum != h.checksum)
        return fault(err, H_CHECKSUM, PYMIG_FAULT_CHECKSUM, h.checksum, sum, 0, 0);

    uint64_t off = PYMIG_PACKET_HEADER_BYTES, end = off + h.payload_len;
    for (uint64_t r = 0; r < h.record_count; r++) {
        /* every record was checked above; the few checks that keep accesses inside the
         * buffers are repeated because the packet is caller memory that another thread
         * could change meanwhile */
        if (end - off < PYMIG_RUN_HEADER_BYTES)
            return fault(err, off, PYMIG_FAULT_RUN_TRUNCATED, r, end - off, 0, 0);
        const unsigned char *rec = pkt + off;
        uint64_t first = rd64(rec + R_FIRST), count = rd32(rec + R_COUNT);
        int normal = rec[R_KIND] == PYMIG_RUN_NORMAL;
        uint64_t total = normal ? count * page_size : 0;
        off += PYMIG_RUN_HEADER_BYTES;
        if (first >= npages || count > npages - first || total > end - off)
            return fault(err, off - PYMIG_RUN_HEADER_BYTES, PYMIG_FAULT_RUN_RANGE, r, first,
                         count, npages);
        if (normal) {
            ops->copy_to_guest(mem + first * page_size, pkt + off, total);
            if (present)
                pymig_set_range(present, first, count);
            off += total;
        } else {
            clear_zero_run(mem, page_size, first, count, present, ops);
        }
    }
    return 0;
}

int pymig_packet_runs(const unsigned char *pkt, size_t pkt_bytes, uint32_t page_size,
                      uint32_t block_id, uint64_t npages, int64_t *runs_out,
                      pymig_decode_result *res, pymig_packet_error *err)
{
    pymig_packet_header h;
    memset(res, 0, sizeof(*res));
    return validate(pkt, pkt_bytes, page_size, block_id, npages, &h, res, runs_out, err)
               ? -EBADMSG : 0;
}
