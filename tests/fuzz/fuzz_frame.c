/*
 * fuzz_frame.c - libFuzzer target for the input path of a connection:
 * byte stream -> frames (frame.c) -> cJSON -> raw members and NUL-safe
 * strings (jsonstr.c).
 *
 * Input layout: byte 0 seeds the choice of split points, byte 1 picks the
 * maximum frame size, the rest is the stream.  Each stage is one static
 * function and checks its own invariants, calling abort() on a violation so
 * that libFuzzer (and the replay tool, tests/fuzz/replay.c) report it:
 *   stage_split    the stream scanned in one read, scanned in random pieces
 *                  the way net.c feeds it, and a naive reference splitter
 *                  must all give the same frames, garbage and size errors;
 *   stage_frame    per complete frame: cJSON_ParseWithLengthOpts (with its
 *                  per-call end pointer) must end exactly at the frame end;
 *   stage_members  json_member_raw for "msgid", "id", "msg" agrees with
 *                  cJSON_GetObjectItemCaseSensitive, string values decode to
 *                  cJSON's bytes and survive a json_quote round trip;
 *   stage_strings  the raw input as bytes and as a literal: json_quote and
 *                  json_unescape round trips.
 * To drive more of the core (e.g. the dispatcher), add a stage and call it
 * from on_frame().  The file has no main(): libFuzzer provides one, and
 * replay.c is the one for ordinary builds.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "fuzz_frame: %s:%d: check failed: %s\n",       \
                    __FILE__, __LINE__, #cond);                            \
            abort();                                                       \
        }                                                                  \
    } while (0)

/* ---- events of one scan ------------------------------------------------- */
struct fz_ev {
    int status;
    size_t off;   /* COMPLETE: frame start; else the offending byte */
    size_t len;   /* COMPLETE: frame length */
};

struct fz_evs {
    struct fz_ev *ev;
    size_t n, cap;
};

static void evs_add(struct fz_evs *e, int status, size_t off, size_t len)
{
    CHECK(e->n < e->cap);
    e->ev[e->n].status = status;
    e->ev[e->n].off = off;
    e->ev[e->n].len = len;
    e->n++;
}

static void evs_check_equal(const struct fz_evs *a, const struct fz_evs *b)
{
    CHECK(a->n == b->n);
    for (size_t i = 0; i < a->n; i++) {
        CHECK(a->ev[i].status == b->ev[i].status);
        CHECK(a->ev[i].off == b->ev[i].off);
        CHECK(a->ev[i].len == b->ev[i].len);
    }
}

/* Naive reference: what the transport section of the protocol says. */
static void ref_scan(const uint8_t *s, size_t n, size_t max, struct fz_evs *e)
{
    size_t i = 0;

    while (i < n) {
        uint8_t c = s[i];
        if (c == 0 || c == '\n' || c == '\r' || c == ' ' || c == '\t') {
            i++;
            continue;
        }
        if (c != '{') {
            evs_add(e, FRAME_GARBAGE, i, 0);
            i++;
            continue;
        }
        size_t b = i, depth = 0;
        int in_str = 0, esc = 0, done = 0;
        for (; i < n && !done; i++) {
            if (i - b + 1 > max) {
                evs_add(e, FRAME_TOO_LARGE, i, 0);
                return;
            }
            c = s[i];
            if (in_str) {
                if (esc)
                    esc = 0;
                else if (c == '\\')
                    esc = 1;
                else if (c == '"')
                    in_str = 0;
            } else if (c == '"') {
                in_str = 1;
            } else if (c == '{' || c == '[') {
                depth++;
            } else if ((c == '}' || c == ']') && --depth == 0) {
                evs_add(e, FRAME_COMPLETE, b, i + 1 - b);
                done = 1;
            }
        }
        if (!done)
            return;   /* the stream ends inside a frame */
    }
}

/* Feed s[0..n) to frame_scan in pieces whose sizes come from seed (0: in
 * one piece), keeping partial frames as net.c must: the last fs.len bytes
 * consumed.  Pieces may be empty. */
static void scan(const uint8_t *s, size_t n, size_t max, unsigned seed,
                 struct fz_evs *e)
{
    static const size_t spans[4] = {3, 17, 200, 2};
    struct frame_scanner fs;
    size_t a = 0, kept_from = 0;   /* partial frame = s[kept_from..a) */
    unsigned r = seed * 2654435761u + 1;
    int first = 1, zeros = 0;

    frame_init(&fs, max);
    while (a < n || first) {
        size_t plen = n - a, off = 0;
        const uint8_t *piece = s + a;

        first = 0;
        if (seed != 0) {
            r = r * 1103515245u + 12345u;
            size_t want = (r >> 16) % spans[seed % 4];
            if (want == 0 && ++zeros > 2)
                want = 1;
            if (want != 0)
                zeros = 0;
            if (want < plen)
                plen = want;
        }
        do {
            size_t used = (size_t)-1;
            long start = -2;
            int rc = frame_scan(&fs, (const char *)piece + off, plen - off,
                                &used, &start);
            CHECK(used <= plen - off);
            switch (rc) {
            case FRAME_COMPLETE: {
                size_t end = a + off + used, fstart;
                CHECK(used > 0);
                if (start >= 0) {
                    CHECK((size_t)start < used);
                    fstart = a + off + (size_t)start;
                } else {
                    fstart = kept_from;
                }
                CHECK(fs.len == 0);
                evs_add(e, rc, fstart, end - fstart);
                break;
            }
            case FRAME_NEED_MORE:
                CHECK(used == plen - off);
                CHECK(fs.len <= a + plen);
                kept_from = a + plen - fs.len;
                break;
            case FRAME_GARBAGE:
                CHECK(used > 0);
                CHECK(fs.len == 0);
                evs_add(e, rc, a + off + used - 1, 0);
                break;
            case FRAME_TOO_LARGE: {
                size_t used2 = 1;
                long start2;
                CHECK(used > 0);
                evs_add(e, rc, a + off + used - 1, 0);
                /* sticky */
                CHECK(frame_scan(&fs, "{}", 2, &used2, &start2) == FRAME_TOO_LARGE);
                CHECK(used2 == 0);
                return;
            }
            default:
                CHECK(!"unknown status");
            }
            off += used;
        } while (off < plen);
        a += plen;
    }
}

/* ---- per-frame stages ----------------------------------------------------- */

/* Does any string of the text contain a NUL (raw, \u0000, or a \u escape
 * with bad hex digits, which cJSON 1.7.15 also reads as NUL)?  Then cJSON's
 * C strings are cut short and only weaker checks apply. */
static int has_nul(const char *t, size_t n)
{
    if (memchr(t, '\0', n) != NULL)
        return 1;
    for (size_t i = 0; i + 1 < n; i++) {
        if (t[i] != '\\')
            continue;
        if (t[i + 1] == 'u') {
            unsigned v = 0;
            int ok = i + 6 <= n;
            for (size_t k = i + 2; ok && k < i + 6; k++) {
                char c = t[k];
                int h = c >= '0' && c <= '9' ? c - '0'
                      : c >= 'a' && c <= 'f' ? c - 'a' + 10
                      : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
                ok = h >= 0;
                v = v * 16 + (unsigned)(h >= 0 ? h : 0);
            }
            if (!ok || v == 0)
                return 1;
        }
        i++;
    }
    return 0;
}

static void check_roundtrip(const char *b, size_t n)
{
    size_t ql = 0, ul = 0;
    char *q = json_quote(b, n, &ql), *u;

    CHECK(q != NULL);
    CHECK(ql >= 2 && q[0] == '"' && q[ql - 1] == '"' && q[ql] == '\0');
    for (size_t i = 0; i < ql; i++)
        CHECK((unsigned char)q[i] >= 0x20 && q[i] != 0x7f);
    u = json_unescape(q, ql, &ul);
    CHECK(u != NULL);
    CHECK(ul == n && memcmp(u, b, n) == 0 && u[ul] == '\0');
    mem_free(u);
    mem_free(q);
}

static int same_json(const cJSON *a, const cJSON *b)
{
    char *x = cJSON_PrintUnformatted(a), *y = cJSON_PrintUnformatted(b);
    int same = x != NULL && y != NULL && strcmp(x, y) == 0;

    free(x);
    free(y);
    return same;
}

static void stage_members(const char *f, size_t len, const cJSON *root)
{
    static const char *keys[] = {"msgid", "id", "msg"};
    int nul = has_nul(f, len);

    for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
        size_t vlen = 0;
        const char *v = json_member_raw(f, len, keys[k], &vlen);
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, keys[k]);

        if (v != NULL) {
            CHECK(v > f && vlen > 0 && v + vlen <= f + len);
            CHECK(item != NULL);   /* an exact key match is a cJSON match */
        }
        if (nul) {
            /* cJSON may have matched a key cut at a NUL; strings still
             * decode (unless cJSON's \u leniency is involved) */
            if (v != NULL && v[0] == '"') {
                size_t ul;
                char *u = json_unescape(v, vlen, &ul);
                if (u != NULL)
                    check_roundtrip(u, ul);
                mem_free(u);
            }
            continue;
        }
        CHECK((v == NULL) == (item == NULL));
        if (v == NULL)
            continue;
        const char *endp = NULL;
        cJSON *got = cJSON_ParseWithLengthOpts(v, vlen, &endp, 0);
        CHECK(got != NULL && endp == v + vlen);
        CHECK(same_json(got, item));
        if (cJSON_IsString(item)) {
            size_t ul = 0;
            char *u = json_unescape(v, vlen, &ul);
            CHECK(u != NULL);
            CHECK(ul == strlen(item->valuestring));
            CHECK(memcmp(u, item->valuestring, ul) == 0);
            check_roundtrip(u, ul);
            mem_free(u);
        }
        cJSON_Delete(got);
    }
}

/* One complete frame, as net.c hands it to the dispatcher. */
static void stage_frame(const char *f, size_t len)
{
    const char *endp = NULL;
    cJSON *root;

    CHECK(len >= 2 && f[0] == '{');
    CHECK(f[len - 1] == '}' || f[len - 1] == ']');
    root = cJSON_ParseWithLengthOpts(f, len, &endp, 0);
    if (root == NULL) {
        /* not JSON: the raw lookups must still stay inside the frame */
        size_t vlen;
        const char *v = json_member_raw(f, len, "msg", &vlen);
        CHECK(v == NULL || (v > f && v + vlen <= f + len));
        return;
    }
    /* the scanner and cJSON agree where the object ends */
    CHECK(endp == f + len);
    CHECK(cJSON_IsObject(root));
    stage_members(f, len, root);
    cJSON_Delete(root);
}

/* The first member whose key decodes like an earlier one's, the slow way. */
static long dup_reference(const struct json_span *m, size_t n)
{
    char *k[16];
    size_t kl[16];
    long dup = -1;

    for (size_t i = 0; i < n; i++) {
        char lit[1100];
        k[i] = NULL;
        if (m[i].klen + 2 <= sizeof lit) {
            lit[0] = '"';
            memcpy(lit + 1, m[i].key, m[i].klen);
            lit[m[i].klen + 1] = '"';
            k[i] = json_unescape(lit, m[i].klen + 2, &kl[i]);
        }
        CHECK(k[i] != NULL || m[i].klen + 2 > sizeof lit);
        if (!k[i])
            dup = -3; /* too long to compare here */
    }
    for (size_t i = 0; i < n && dup == -1; i++)
        for (size_t j = 0; j < i && dup == -1; j++)
            if (k[j] && kl[i] == kl[j] && !memcmp(k[i], k[j], kl[i]))
                dup = (long)i;
    for (size_t i = 0; i < n; i++)
        mem_free(k[i]);
    return dup;
}

/* The dispatcher's strict scan: what it accepts cJSON accepts, as an
 * object with the same members in the same order, raw values agreeing. */
static void stage_scan(const char *f, size_t len)
{
    struct json_span m[16];
    long n = json_scan_object(f, len, m, 16);
    cJSON *root;
    const cJSON *c;
    long i = 0;

    if (n < 0)
        return;
    root = cJSON_ParseWithLengthOpts(f, len, NULL, 0);
    CHECK(root != NULL && cJSON_IsObject(root));
    CHECK(cJSON_GetArraySize(root) == n);
    cJSON_ArrayForEach(c, root) {
        if (i < 16) {
            size_t dl;
            char *k, lit[520];
            CHECK(m[i].klen + 2 < sizeof(lit) || m[i].klen > 500);
            if (m[i].klen <= 500) {
                lit[0] = '"';
                memcpy(lit + 1, m[i].key, m[i].klen);
                lit[m[i].klen + 1] = '"';
                k = json_unescape(lit, m[i].klen + 2, &dl);
                CHECK(k != NULL);
                /* cJSON stops a key at NUL; compare up to it */
                CHECK(strncmp(k, c->string, dl) == 0 || memchr(k, 0, dl));
                mem_free(k);
            }
            CHECK(m[i].val >= f && m[i].val + m[i].vlen <= f + len);
        }
        i++;
    }
    cJSON_Delete(root);
    if (n <= 16) {
        long ref = dup_reference(m, (size_t)n);
        CHECK(ref == -3 || json_span_dup(m, (size_t)n) == ref);
    }
}

static void on_frame(const char *f, size_t len)
{
    stage_frame(f, len);
    stage_scan(f, len);
}

/* ---- stream and string stages --------------------------------------------- */

static void stage_split(const uint8_t *s, size_t n, size_t max, unsigned seed)
{
    struct fz_evs whole, split, ref;
    size_t cap = n + 2;

    whole.ev = malloc(cap * sizeof(*whole.ev));
    split.ev = malloc(cap * sizeof(*split.ev));
    ref.ev = malloc(cap * sizeof(*ref.ev));
    CHECK(whole.ev && split.ev && ref.ev);
    whole.n = split.n = ref.n = 0;
    whole.cap = split.cap = ref.cap = cap;

    scan(s, n, max, 0, &whole);
    scan(s, n, max, seed | 1u << 8, &split);
    ref_scan(s, n, max, &ref);
    evs_check_equal(&whole, &split);
    evs_check_equal(&whole, &ref);

    for (size_t i = 0; i < whole.n; i++) {
        if (whole.ev[i].status == FRAME_COMPLETE)
            on_frame((const char *)s + whole.ev[i].off, whole.ev[i].len);
    }
    free(whole.ev);
    free(split.ev);
    free(ref.ev);
}

static void stage_strings(const uint8_t *s, size_t n)
{
    size_t ul;
    char *u;

    check_roundtrip((const char *)s, n);
    /* the input as a literal: valid or not, never a crash, and a decoded
     * literal quotes back to something that decodes the same */
    u = json_unescape((const char *)s, n, &ul);
    if (u != NULL)
        check_roundtrip(u, ul);
    mem_free(u);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t max;
    unsigned seed;

    if (size < 2)
        return 0;
    seed = data[0];
    max = data[1] == 255 ? 65536 : 1 + (size_t)data[1] * 8;
    stage_split(data + 2, size - 2, max, seed);
    stage_strings(data + 2, size - 2);
    return 0;
}
