/*
 * RAM packets: encode dirty pages into one packet, check and apply a received one.
 * The byte layout is documented in docs/stream-format.md ("RAM packets").
 *
 *   header (32 bytes)                 run record (16 bytes), then its data
 *   0  u32 magic "PMGP"               0  u64 first_page
 *   4  u16 version (2)                8  u32 page_count (>= 1)
 *   6  u16 flags (0)                  12 u8  kind (1 NORMAL, 2 ZERO, 3 COMPRESSED)
 *   8  u32 block_id                   13 u8  reserved (0)
 *   12 u32 page_size                  14 u16 reserved (0)
 *   16 u32 record_count
 *   20 u32 payload_len                NORMAL: the pages; ZERO: nothing; COMPRESSED: u32 length,
 *   24 u64 checksum = xxh3-64(payload + header[0:24])   u32 reserved (0), an LZ4 block
 *
 * Encoding plans the packet first (which pages, which runs; the zero check of a page with data
 * reads about one cache line).  Then it walks the planned records: it copies each NORMAL run in
 * chunks and hashes every chunk from the packet right after copying it, while it is still in
 * L1/L2: one pass over guest memory, and the hash covers exactly the bytes sent even if the
 * guest writes the page meanwhile.  With compression, a NORMAL run is at most one 32 KiB unit
 * and is first offered to LZ4; one that shrinks goes out as a COMPRESSED run, so the packet
 * shrinks behind the walk (each record is written at or before where it was planned).  The
 * header's record count and length are final only then, which is why the checksum takes the
 * header last.
 *
 * Decoding checks the header, walks every run record (bounds, kind, order, sizes) and verifies
 * the checksum before it writes a single byte of guest memory.  LZ4 data is untrusted too: it
 * decodes with LZ4_decompress_safe into exactly its run's pages.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "bitops.h"

#define XXH_INLINE_ALL
#include "xxhash/xxhash.h"
#include "lz4_local.h"

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

/* Pass 1: choose the pages and write the run records in place; returns bytes used.  A NORMAL
 * run holds at most max_normal pages (compression works on units of that size). */
static uint64_t plan(const unsigned char *mem, uint32_t ps, uint64_t *bm, uint64_t npages,
                     uint64_t cursor, unsigned char *out, uint64_t cap, uint64_t max_normal,
                     const pymig_ops *ops, pymig_encode_result *res)
{
    uint64_t used = PYMIG_PACKET_HEADER_BYTES;
    unsigned char *run = NULL; /* record of the open run */
    uint64_t run_end = 0, run_count = 0;
    int run_kind = 0;
    uint64_t page = pymig_next_set(bm, npages, cursor);
    for (; page < npages; page = pymig_next_set(bm, npages, page + 1)) {
        int kind = ops->is_zero(mem + page * ps, ps) ? PYMIG_RUN_ZERO : PYMIG_RUN_NORMAL;
        uint64_t data = kind == PYMIG_RUN_NORMAL ? ps : 0;
        uint64_t limit = kind == PYMIG_RUN_NORMAL ? max_normal : UINT32_MAX;
        int extend = kind == run_kind && page == run_end && run_count < limit;
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

/* What compressing needs besides the caller's state: LZ4's tables and room for its output. */
typedef struct compressor {
    pymig_compress_state *state;
    LZ4_stream_t lz4;
    char dst[LZ4_COMPRESSBOUND(PYMIG_COMPRESS_UNIT_BYTES)];
} compressor;

/* The compressed size of a unit, or 0 when it is not worth sending compressed (it did not
 * shrink by an eighth, or the backoff says not to try). */
static int try_compress(compressor *c, const unsigned char *src, uint64_t total)
{
    pymig_compress_state *st = c->state;
    if (st->skip_units) {
        st->skip_units--;
        return 0;
    }
    /* a fresh stream per unit, as python-lz4's lz4.block.compress (the reference) does it,
     * so that both backends produce the same bytes */
    LZ4_initStream(&c->lz4, sizeof(c->lz4));
    int n = LZ4_compress_fast_continue(&c->lz4, (const char *)src, c->dst, (int)total,
                                       (int)sizeof(c->dst), 1);
    if (n > 0 && (uint64_t)n + PYMIG_COMPRESSED_HEADER_BYTES <= total - total / 8) {
        st->fails = 0;
        return n;
    }
    if (st->fails < 7)
        st->fails++;
    st->skip_units = UINT32_C(1) << (st->fails - 1);
    return 0;
}

/* Pass 2: walk the planned records, write each one's data (or its compressed form) and hash
 * the payload as it is written.  Returns the payload's end: with compression it is at or
 * before the plan's, because every record goes at or before where it was planned. */
static uint64_t fill(const unsigned char *mem, uint32_t ps, uint64_t npages, unsigned char *out,
                     uint64_t used, compressor *c, XXH3_state_t *state, const pymig_ops *ops,
                     pymig_encode_result *res)
{
    uint64_t roff = PYMIG_PACKET_HEADER_BYTES, woff = roff;
    for (uint64_t r = 0; r < res->runs && used - roff >= PYMIG_RUN_HEADER_BYTES; r++) {
        unsigned char rec[PYMIG_RUN_HEADER_BYTES];
        memcpy(rec, out + roff, sizeof(rec));
        roff += PYMIG_RUN_HEADER_BYTES;
        unsigned char *w = out + woff;
        memcpy(w, rec, sizeof(rec));
        if (rec[R_KIND] != PYMIG_RUN_NORMAL) {
            ops->xxh3_update(state, w, PYMIG_RUN_HEADER_BYTES);
            woff += PYMIG_RUN_HEADER_BYTES;
            continue;
        }
        uint64_t first = rd64(rec + R_FIRST), count = rd32(rec + R_COUNT);
        uint64_t total = count * ps;
        /* out is caller memory: if another thread scribbled on a record meanwhile, stop
         * rather than read outside mem (the checksum then no longer matches) */
        if (first >= npages || count > npages - first || total > used - roff)
            break;
        roff += total;
        const unsigned char *src = mem + first * ps;
        int n = c && total <= PYMIG_COMPRESS_UNIT_BYTES ? try_compress(c, src, total) : 0;
        if (n > 0) {
            w[R_KIND] = PYMIG_RUN_COMPRESSED;
            wr32(w + PYMIG_RUN_HEADER_BYTES, (uint32_t)n);
            wr32(w + PYMIG_RUN_HEADER_BYTES + 4, 0);
            memcpy(w + PYMIG_RUN_HEADER_BYTES + PYMIG_COMPRESSED_HEADER_BYTES, c->dst, (size_t)n);
            uint64_t len = PYMIG_RUN_HEADER_BYTES + PYMIG_COMPRESSED_HEADER_BYTES + (uint64_t)n;
            ops->xxh3_update(state, w, len);
            woff += len;
            res->compressed_pages += count;
            continue;
        }
        ops->xxh3_update(state, w, PYMIG_RUN_HEADER_BYTES);
        woff += PYMIG_RUN_HEADER_BYTES;
        for (uint64_t done = 0; done < total; done += CHUNK_BYTES) {
            size_t len = total - done < CHUNK_BYTES ? (size_t)(total - done) : CHUNK_BYTES;
            memcpy(out + woff + done, src + done, len);
            ops->xxh3_update(state, out + woff + done, len);
        }
        woff += total;
    }
    return woff;
}

void pymig_encode_packet(const unsigned char *mem, uint32_t page_size, uint32_t block_id,
                         uint64_t *bm, uint64_t npages, uint64_t cursor, unsigned char *out,
                         size_t out_bytes, pymig_compress_state *compress,
                         const pymig_ops *ops, pymig_encode_result *res)
{
    uint64_t cap = (uint64_t)PYMIG_PACKET_HEADER_BYTES + UINT32_MAX;
    if ((uint64_t)out_bytes < cap)
        cap = out_bytes;
    memset(res, 0, sizeof(*res));
    /* pages larger than a unit are never compressed */
    uint64_t unit = page_size <= PYMIG_COMPRESS_UNIT_BYTES ? PYMIG_COMPRESS_UNIT_BYTES / page_size
                                                           : 0;
    compressor *c = NULL;
    if (compress && unit) {
        c = malloc(sizeof(*c)); /* NULL: this packet goes uncompressed */
        if (c)
            c->state = compress;
    }
    uint64_t used = plan(mem, page_size, bm, npages, cursor, out, cap, c ? unit : UINT32_MAX,
                         ops, res);
    if (res->runs == 0) {
        free(c);
        return; /* nothing dirty at or after cursor: nbytes 0, out untouched */
    }
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    used = fill(mem, page_size, npages, out, used, c, &state, ops, res);
    free(c);
    res->nbytes = used;

    wr32(out + H_MAGIC, PACKET_MAGIC);
    wr16(out + H_VERSION, PYMIG_PACKET_VERSION);
    wr16(out + H_FLAGS, 0);
    wr32(out + H_BLOCK, block_id);
    wr32(out + H_PAGE_SIZE, page_size);
    wr32(out + H_RECORDS, (uint32_t)res->runs);
    wr32(out + H_PAYLOAD_LEN, (uint32_t)(used - PYMIG_PACKET_HEADER_BYTES));
    ops->xxh3_update(&state, out, H_CHECKSUM);
    wr64(out + H_CHECKSUM, XXH3_64bits_digest(&state));
}

/* ------------------------------------------------------------------------------ decode */

static inline uint64_t compress_bound(uint64_t total)
{
    return total + total / 255 + 16; /* LZ4_COMPRESSBOUND, without its int range */
}

/* Every check that needs no guest memory: header against the caller's expectations, then
 * every run record.  With ``runs_out``, each run's (first page, page count) goes there: at
 * most record_count pairs, and a run needs 16 bytes of packet, so the smaller of
 * record_count and (pkt_bytes - 32) / 16 pairs always fit. */
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
        if (kind != PYMIG_RUN_NORMAL && kind != PYMIG_RUN_ZERO && kind != PYMIG_RUN_COMPRESSED)
            return fault(err, off + R_KIND, PYMIG_FAULT_RUN_KIND, r, kind, 0, 0);
        if (rec[R_RESERVED8] != 0)
            return fault(err, off + R_RESERVED8, PYMIG_FAULT_RUN_RESERVED, r, 0, 0, 0);
        if (rd16(rec + R_RESERVED16) != 0)
            return fault(err, off + R_RESERVED16, PYMIG_FAULT_RUN_RESERVED, r, 0, 0, 0);
        if (first >= npages || count > npages - first)
            return fault(err, off, PYMIG_FAULT_RUN_RANGE, r, first, count, npages);
        if (first < prev_end)
            return fault(err, off, PYMIG_FAULT_RUN_ORDER, r, first, prev_end, 0);
        uint64_t room = left - PYMIG_RUN_HEADER_BYTES, data = 0;
        if (kind == PYMIG_RUN_NORMAL) {
            data = (uint64_t)count * page_size;
        } else if (kind == PYMIG_RUN_COMPRESSED) {
            data = PYMIG_COMPRESSED_HEADER_BYTES;
            if (data <= room) {
                const unsigned char *len = rec + PYMIG_RUN_HEADER_BYTES;
                if (rd32(len + 4) != 0)
                    return fault(err, off + PYMIG_RUN_HEADER_BYTES + 4, PYMIG_FAULT_RUN_RESERVED,
                                 r, 0, 0, 0);
                /* an LZ4 block never needs more than LZ4_COMPRESSBOUND of what it decodes to */
                uint64_t total = (uint64_t)count * page_size, clen = rd32(len);
                if (total > PYMIG_MAX_COMPRESSED_RUN_BYTES || clen > compress_bound(total))
                    return fault(err, off + R_COUNT, PYMIG_FAULT_RUN_COMPRESSED_SIZE, r, total,
                                 clen, 0);
                data += clen;
            }
        }
        if (data > room)
            return fault(err, off + 16, PYMIG_FAULT_RUN_DATA, r, data, room, 0);
        if (runs_out) {
            runs_out[2 * res->runs] = (int64_t)first;
            runs_out[2 * res->runs + 1] = (int64_t)count;
        }
        off += PYMIG_RUN_HEADER_BYTES + data;
        prev_end = first + count;
        if (kind == PYMIG_RUN_ZERO) {
            res->zero_pages += count;
        } else {
            res->normal_pages += count;
            if (kind == PYMIG_RUN_COMPRESSED)
                res->compressed_pages += count;
        }
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
    ops->xxh3_update(&state, pkt + PYMIG_PACKET_HEADER_BYTES, h.payload_len);
    ops->xxh3_update(&state, pkt, H_CHECKSUM);
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
        unsigned kind = rec[R_KIND];
        uint64_t total = count * page_size, data = 0;
        if (kind == PYMIG_RUN_NORMAL)
            data = total;
        else if (kind == PYMIG_RUN_COMPRESSED && end - off >= PYMIG_RUN_HEADER_BYTES + 8)
            data = PYMIG_COMPRESSED_HEADER_BYTES + (uint64_t)rd32(rec + PYMIG_RUN_HEADER_BYTES);
        off += PYMIG_RUN_HEADER_BYTES;
        if (first >= npages || count > npages - first || data > end - off ||
            (kind == PYMIG_RUN_COMPRESSED &&
             (data < PYMIG_COMPRESSED_HEADER_BYTES || total > PYMIG_MAX_COMPRESSED_RUN_BYTES ||
              data - PYMIG_COMPRESSED_HEADER_BYTES > compress_bound(total))))
            return fault(err, off - PYMIG_RUN_HEADER_BYTES, PYMIG_FAULT_RUN_RANGE, r, first,
                         count, npages);
        unsigned char *dst = mem + first * page_size;
        if (kind == PYMIG_RUN_NORMAL) {
            ops->copy_to_guest(dst, pkt + off, total);
        } else if (kind == PYMIG_RUN_COMPRESSED) {
            const char *src = (const char *)pkt + off + PYMIG_COMPRESSED_HEADER_BYTES;
            int got = LZ4_decompress_safe(src, (char *)dst,
                                          (int)(data - PYMIG_COMPRESSED_HEADER_BYTES), (int)total);
            if (got < 0 || (uint64_t)got != total)
                return fault(err, off - PYMIG_RUN_HEADER_BYTES, PYMIG_FAULT_RUN_DECOMPRESS, r,
                             total, 0, 0);
        } else {
            clear_zero_run(mem, page_size, first, count, present, ops);
            continue;
        }
        if (present)
            pymig_set_range(present, first, count);
        off += data;
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
