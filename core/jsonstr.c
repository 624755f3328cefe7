/*
 * jsonstr.c - JSON string literals handled with their length (NUL-safe).
 *
 * cJSON hands out strings as NUL-terminated C strings, so a chat message
 * containing "\u0000" is silently cut short.  The core therefore reads the
 * string fields it forwards or stores (msg, name, ...) from the raw frame:
 * json_member_raw finds a member's value text, json_unescape decodes a string
 * literal into bytes with an explicit length, and json_quote writes bytes
 * back as a literal.
 *
 * Design: these functions follow cJSON's own reading of the text exactly, so
 * that a frame cJSON accepted means the same thing here: whitespace is any
 * byte <= 0x20 (cJSON's rule), raw bytes inside strings (control characters
 * and invalid UTF-8 included) are taken as they are, the escapes are those
 * cJSON knows, and a lone or reversed UTF-16 surrogate is an error.  One
 * deliberate difference: "\u" followed by non-hex digits is an error here,
 * where cJSON 1.7.15 quietly reads it as "\u0000".
 * json_member_raw returns the FIRST member with the key, as
 * cJSON_GetObjectItemCaseSensitive does, and compares keys after decoding
 * their escapes ("m\u0073g" is "msg") on all their bytes ("msg\u0000x" is
 * not "msg", which cJSON, cutting at the NUL, would match).  It expects
 * text cJSON validated but never reads outside obj[0..len) whatever the text
 * is: on malformed input it returns NULL or some value-sized slice of it.
 * Results of json_unescape and json_quote are mem_malloc'd, NUL-terminated
 * (the length is what counts), NULL on allocation failure; outlen may be
 * NULL.
 */
#include <string.h>

#include "core.h"

#define JSON_WS(c) ((unsigned char)(c) <= 0x20)

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The 4 hex digits at p (end bounds the input); -1 if not hex or cut. */
static long hex4(const unsigned char *p, const unsigned char *end)
{
    long v = 0;

    if (end - p < 4)
        return -1;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0)
            return -1;
        v = (v << 4) | h;
    }
    return v;
}

static size_t utf8_put(unsigned long cp, unsigned char *out)
{
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | (cp >> 6));
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | (cp >> 12));
        out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (unsigned char)(0xF0 | (cp >> 18));
    out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* Decode the escape sequence at p ('\\') that must end before end.  Writes
 * 1-4 bytes to out and *outn; returns the input bytes used, 0 if invalid. */
static size_t unescape_one(const unsigned char *p, const unsigned char *end,
                           unsigned char out[4], size_t *outn)
{
    long hi, lo;

    if (end - p < 2)
        return 0;
    *outn = 1;
    switch (p[1]) {
    case '"': case '\\': case '/': out[0] = p[1]; return 2;
    case 'b': out[0] = '\b'; return 2;
    case 'f': out[0] = '\f'; return 2;
    case 'n': out[0] = '\n'; return 2;
    case 'r': out[0] = '\r'; return 2;
    case 't': out[0] = '\t'; return 2;
    case 'u': break;
    default: return 0;
    }
    hi = hex4(p + 2, end);
    if (hi < 0 || (hi >= 0xDC00 && hi <= 0xDFFF))
        return 0;
    if (hi < 0xD800 || hi > 0xDBFF) {
        *outn = utf8_put((unsigned long)hi, out);
        return 6;
    }
    if (end - p < 12 || p[6] != '\\' || p[7] != 'u')
        return 0;
    lo = hex4(p + 8, end);
    if (lo < 0xDC00 || lo > 0xDFFF)
        return 0;
    *outn = utf8_put(0x10000 + ((((unsigned long)hi & 0x3FF) << 10) |
                                ((unsigned long)lo & 0x3FF)), out);
    return 12;
}

/* p is at an opening quote: return the byte after the closing quote, or
 * NULL if the literal does not end before end. */
static const unsigned char *skip_string(const unsigned char *p,
                                        const unsigned char *end)
{
    for (p++; p < end; p++) {
        if (*p == '"')
            return p + 1;
        if (*p == '\\')
            p++;
    }
    return NULL;
}

/* p is at '{' or '[': return the byte after the matching close, or NULL. */
static const unsigned char *skip_nested(const unsigned char *p,
                                        const unsigned char *end)
{
    size_t depth = 0;

    while (p < end) {
        switch (*p) {
        case '"':
            p = skip_string(p, end);
            if (p == NULL)
                return NULL;
            continue;
        case '{': case '[':
            depth++;
            break;
        case '}': case ']':
            if (--depth == 0)
                return p + 1;
            break;
        default:
            break;
        }
        p++;
    }
    return NULL;
}

/* Skip one value at p (no leading whitespace); NULL if there is none. */
static const unsigned char *skip_value(const unsigned char *p,
                                       const unsigned char *end)
{
    const unsigned char *q = p;

    if (p >= end)
        return NULL;
    if (*p == '"')
        return skip_string(p, end);
    if (*p == '{' || *p == '[')
        return skip_nested(p, end);
    while (q < end && !JSON_WS(*q) && *q != ',' && *q != '}' && *q != ']')
        q++;
    return q > p ? q : NULL;
}

static const unsigned char *skip_ws(const unsigned char *p,
                                    const unsigned char *end)
{
    while (p < end && JSON_WS(*p))
        p++;
    return p;
}

/* Does the literal body s[0..e) (between the quotes) decode to key[0..klen)? */
static int key_equal(const unsigned char *s, const unsigned char *e,
                     const char *key, size_t klen)
{
    const unsigned char *k = (const unsigned char *)key;
    size_t i = 0;

    while (s < e) {
        unsigned char buf[4];
        size_t n, used;

        if (*s != '\\') {
            if (i == klen || k[i] != *s)
                return 0;
            i++;
            s++;
            continue;
        }
        used = unescape_one(s, e, buf, &n);
        if (used == 0 || klen - i < n || memcmp(k + i, buf, n) != 0)
            return 0;
        i += n;
        s += used;
    }
    return i == klen;
}

const char *json_member_raw(const char *obj, size_t len, const char *key,
                            size_t *vlen)
{
    const unsigned char *p = (const unsigned char *)obj, *end = p + len;
    size_t klen = strlen(key);

    p = skip_ws(p, end);
    if (p == end || *p != '{')
        return NULL;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}')
        return NULL;
    while (p < end && *p == '"') {
        const unsigned char *ks = p, *ke, *v, *ve;

        ke = skip_string(p, end);
        if (ke == NULL)
            return NULL;
        p = skip_ws(ke, end);
        if (p == end || *p != ':')
            return NULL;
        v = skip_ws(p + 1, end);
        ve = skip_value(v, end);
        if (ve == NULL)
            return NULL;
        if (key_equal(ks + 1, ke - 1, key, klen)) {
            *vlen = (size_t)(ve - v);
            return (const char *)v;
        }
        p = skip_ws(ve, end);
        if (p == end || *p != ',')
            return NULL;
        p = skip_ws(p + 1, end);
    }
    return NULL;
}

char *json_unescape(const char *lit, size_t len, size_t *outlen)
{
    const unsigned char *p = (const unsigned char *)lit, *end;
    unsigned char *out, *o;

    if (len < 2 || p[0] != '"' || p[len - 1] != '"')
        return NULL;
    end = p + len - 1;  /* the closing quote */
    out = mem_malloc(len - 1);  /* decoding never makes text longer */
    if (out == NULL)
        return NULL;
    o = out;
    for (p++; p < end;) {
        const unsigned char *q = p;
        size_t n, used;

        while (q < end && *q != '\\' && *q != '"')
            q++;
        memcpy(o, p, (size_t)(q - p));
        o += q - p;
        p = q;
        if (p == end)
            break;
        if (*p == '"')
            goto bad;
        used = unescape_one(p, end, o, &n);
        if (used == 0)
            goto bad;
        o += n;
        p += used;
    }
    *o = '\0';
    if (outlen != NULL)
        *outlen = (size_t)(o - out);
    return (char *)out;

bad:
    mem_free(out);
    return NULL;
}

/* Escaped length of one byte (the short forms, \u00XX, or itself). */
static size_t quote_len(unsigned char c)
{
    switch (c) {
    case '"': case '\\': case '\n': case '\r': case '\t': case '\b': case '\f':
        return 2;
    default:
        return (c < 0x20 || c == 0x7F) ? 6 : 1;
    }
}

char *json_quote(const char *s, size_t len, size_t *outlen)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t n = 3; /* quotes and the terminating NUL */
    char *out, *o;

    if (len > (SIZE_MAX - 3) / 6)
        return NULL;
    for (size_t i = 0; i < len; i++)
        n += quote_len(p[i]);
    out = mem_malloc(n);
    if (out == NULL)
        return NULL;
    o = out;
    *o++ = '"';
    for (size_t i = 0; i < len; i++) {
        unsigned char c = p[i];
        char sh = 0;

        switch (c) {
        case '"': sh = '"'; break;
        case '\\': sh = '\\'; break;
        case '\n': sh = 'n'; break;
        case '\r': sh = 'r'; break;
        case '\t': sh = 't'; break;
        case '\b': sh = 'b'; break;
        case '\f': sh = 'f'; break;
        default: break;
        }
        if (sh != 0) {
            *o++ = '\\';
            *o++ = sh;
        } else if (c < 0x20 || c == 0x7F) {
            memcpy(o, "\\u00", 4);
            o[4] = hex[c >> 4];
            o[5] = hex[c & 15];
            o += 6;
        } else {
            *o++ = (char)c;
        }
    }
    *o++ = '"';
    *o = '\0';
    if (outlen != NULL)
        *outlen = (size_t)(o - out);
    return out;
}

/* ---- strict validation with member spans ------------------------------- */
/* A validating scan for the dispatcher's fast path: RFC 8259 JSON, stricter
 * than cJSON where cJSON is lenient in ways a receiving client may not be
 * (raw control characters in strings, leading zeros, bytes that are not
 * UTF-8).  No allocation; the depth is bounded.  The scan context carries
 * why it failed, so the caller can name the error. */

#define SCAN_DEPTH 64

struct scan {
    const unsigned char *e; /* end of the input */
    int err;                /* JSON_SCAN_SYNTAX or JSON_SCAN_UTF8 */
};

static const unsigned char *v_value(struct scan *sc, const unsigned char *p, int depth);

static const unsigned char *v_ws(const unsigned char *p, const unsigned char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* p is at a byte >= 0x80: the byte after one well-formed UTF-8 sequence
 * (RFC 3629: shortest form, no surrogates, at most U+10FFFF), or NULL. */
static const unsigned char *v_utf8(const unsigned char *p, const unsigned char *e)
{
    unsigned char c = *p, lo = 0x80, hi = 0xBF;
    int n;

    if (c >= 0xC2 && c <= 0xDF)
        n = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 2;
        if (c == 0xE0)
            lo = 0xA0; /* overlong below U+0800 */
        else if (c == 0xED)
            hi = 0x9F; /* U+D800..U+DFFF */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 3;
        if (c == 0xF0)
            lo = 0x90; /* overlong below U+10000 */
        else if (c == 0xF4)
            hi = 0x8F; /* past U+10FFFF */
    } else
        return NULL; /* a continuation byte, C0, C1 or F5..FF */
    if (e - p <= n || p[1] < lo || p[1] > hi)
        return NULL;
    for (int i = 2; i <= n; i++)
        if ((p[i] & 0xC0) != 0x80)
            return NULL;
    return p + n + 1;
}

static const unsigned char *v_string(struct scan *sc, const unsigned char *p)
{
    const unsigned char *e = sc->e;
    if (p >= e || *p != '"')
        return NULL;
    for (p++; p < e; p++) {
        if (*p == '"')
            return p + 1;
        if (*p < 0x20)
            return NULL;
        if (*p >= 0x80) {
            const unsigned char *q = v_utf8(p, e);
            if (!q) {
                sc->err = JSON_SCAN_UTF8;
                return NULL;
            }
            p = q - 1;
            continue;
        }
        if (*p == '\\') {
            if (++p >= e)
                return NULL;
            if (*p == 'u') {
                long cp;
                if (e - p < 5 || (cp = hex4(p + 1, e)) < 0 || (cp >= 0xDC00 && cp <= 0xDFFF))
                    return NULL; /* a low surrogate must follow a high one */
                p += 4;
                if (cp >= 0xD800 && cp <= 0xDBFF) { /* needs its low half */
                    long lo;
                    if (e - p < 7 || p[1] != '\\' || p[2] != 'u' ||
                        (lo = hex4(p + 3, e)) < 0xDC00 || lo > 0xDFFF)
                        return NULL;
                    p += 6;
                }
            } else if (!memchr("\"\\/bfnrt", *p, 8)) {
                return NULL;
            }
        }
    }
    return NULL;
}

static const unsigned char *v_digits(const unsigned char *p, const unsigned char *e)
{
    const unsigned char *s = p;
    while (p < e && *p >= '0' && *p <= '9')
        p++;
    return p > s ? p : NULL;
}

static const unsigned char *v_number(const unsigned char *p, const unsigned char *e)
{
    if (p < e && *p == '-')
        p++;
    if (p < e && *p == '0')
        p++;
    else if (!(p = v_digits(p, e)))
        return NULL;
    if (p < e && *p == '.' && !(p = v_digits(p + 1, e)))
        return NULL;
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        if (!(p = v_digits(p, e)))
            return NULL;
    }
    return p;
}

static const unsigned char *v_word(const unsigned char *p, const unsigned char *e,
                                   const char *w)
{
    size_t n = strlen(w);
    return (size_t)(e - p) >= n && memcmp(p, w, n) == 0 ? p + n : NULL;
}

/* Object or array body after the opening bracket; m/max/count record the
 * members of the top-level object only (m == NULL below it). */
static const unsigned char *v_container(struct scan *sc, const unsigned char *p,
                                        int depth, int object, struct json_span *m,
                                        size_t max, size_t *count)
{
    const unsigned char *e = sc->e;
    char close = object ? '}' : ']';
    if (depth >= SCAN_DEPTH)
        return NULL;
    p = v_ws(p, e);
    if (p < e && *p == (unsigned char)close)
        return p + 1;
    for (;;) {
        const unsigned char *k = p, *v;
        if (object) {
            if (!(p = v_string(sc, p)))
                return NULL;
            p = v_ws(p, e);
            if (p >= e || *p != ':')
                return NULL;
            p = v_ws(p + 1, e);
        }
        v = p;
        if (!(p = v_value(sc, p, depth + 1)))
            return NULL;
        if (m) {
            if (*count < max) {
                m[*count].key = (const char *)k + 1;
                m[*count].klen = 0; /* measured after the scan */
                m[*count].val = (const char *)v;
                m[*count].vlen = (size_t)(p - v);
            }
            (*count)++;
        }
        p = v_ws(p, e);
        if (p >= e)
            return NULL;
        if (*p == (unsigned char)close)
            return p + 1;
        if (*p != ',')
            return NULL;
        p = v_ws(p + 1, e);
    }
}

static const unsigned char *v_value(struct scan *sc, const unsigned char *p, int depth)
{
    const unsigned char *e = sc->e;
    if (p >= e)
        return NULL;
    switch (*p) {
    case '{': return v_container(sc, p + 1, depth, 1, NULL, 0, NULL);
    case '[': return v_container(sc, p + 1, depth, 0, NULL, 0, NULL);
    case '"': return v_string(sc, p);
    case 't': return v_word(p, e, "true");
    case 'f': return v_word(p, e, "false");
    case 'n': return v_word(p, e, "null");
    default: return v_number(p, e);
    }
}

long json_scan_object(const char *buf, size_t len, struct json_span *m, size_t max)
{
    const unsigned char *p = (const unsigned char *)buf, *e = p + len;
    struct scan sc;
    size_t count = 0;

    /* the framer passes separators through: NUL is not JSON whitespace,
     * but it may end a legacy frame */
    while (e > p && (e[-1] == '\0' || JSON_WS(e[-1])))
        e--;
    sc.e = e;
    sc.err = JSON_SCAN_SYNTAX;
    p = v_ws(p, e);
    if (p >= e || *p != '{')
        return JSON_SCAN_SYNTAX;
    p = v_container(&sc, p + 1, 0, 1, m, max, &count);
    if (!p)
        return sc.err;
    if (v_ws(p, e) != e)
        return JSON_SCAN_SYNTAX;
    /* key lengths: the literal body between the quotes */
    for (size_t i = 0; i < count && i < max; i++) {
        const unsigned char *k = (const unsigned char *)m[i].key, *q = k;
        while (*q != '"')
            q += *q == '\\' ? 2 : 1;
        m[i].klen = (size_t)(q - k);
    }
    return (long)count;
}

const struct json_span *json_span_find(const struct json_span *m, size_t n,
                                       const char *key)
{
    size_t klen = strlen(key);
    for (size_t i = 0; i < n; i++) {
        const unsigned char *s = (const unsigned char *)m[i].key;
        if (m[i].klen == klen && memcmp(s, key, klen) == 0)
            return &m[i];
        if (memchr(s, '\\', m[i].klen) && key_equal(s, s + m[i].klen, key, klen))
            return &m[i];
    }
    return NULL;
}

/* ---- duplicate members ------------------------------------------------- */
/* Keys are compared as the bytes they decode to ("i\u0064" is "id"), since
 * that is what every receiving parser sees.  A hash of the decoded bytes and
 * an open-addressed table on the stack keep the check linear; it is bounded
 * by JSON_SPAN_DUP_MAX members. */

struct kdec { /* reads a key literal body one decoded byte at a time */
    const unsigned char *p, *e;
    unsigned char buf[4];
    size_t n, i;
};

static void kdec_init(struct kdec *d, const struct json_span *m)
{
    d->p = (const unsigned char *)m->key;
    d->e = d->p + m->klen;
    d->n = d->i = 0;
}

/* The next decoded byte, or -1 at the end (a bad escape ends it too: the
 * scan already refused those). */
static int kdec_next(struct kdec *d)
{
    if (d->i < d->n)
        return d->buf[d->i++];
    if (d->p >= d->e)
        return -1;
    if (*d->p != '\\')
        return *d->p++;
    {
        size_t used = unescape_one(d->p, d->e, d->buf, &d->n);
        if (!used)
            return -1;
        d->p += used;
        d->i = 1;
        return d->buf[0];
    }
}

static uint32_t key_hash(const struct json_span *m)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    struct kdec d;
    int c;

    if (!memchr(m->key, '\\', m->klen)) {
        for (size_t i = 0; i < m->klen; i++)
            h = (h ^ (unsigned char)m->key[i]) * 16777619u;
        return h;
    }
    kdec_init(&d, m);
    while ((c = kdec_next(&d)) >= 0)
        h = (h ^ (unsigned)c) * 16777619u;
    return h;
}

static int key_same(const struct json_span *a, const struct json_span *b)
{
    struct kdec x, y;
    int c;

    if (a->klen == b->klen && memcmp(a->key, b->key, a->klen) == 0)
        return 1;
    if (!memchr(a->key, '\\', a->klen) && !memchr(b->key, '\\', b->klen))
        return 0;
    kdec_init(&x, a);
    kdec_init(&y, b);
    do {
        c = kdec_next(&x);
        if (c != kdec_next(&y))
            return 0;
    } while (c >= 0);
    return 1;
}

long json_span_dup(const struct json_span *m, size_t n)
{
    uint16_t slot[2 * JSON_SPAN_DUP_MAX]; /* member index + 1; 0 is empty */
    size_t size = 8, mask;

    if (n > JSON_SPAN_DUP_MAX)
        return -2;
    while (size < 2 * n)
        size *= 2;
    mask = size - 1;
    memset(slot, 0, size * sizeof *slot);
    for (size_t i = 0; i < n; i++) {
        size_t h = key_hash(&m[i]) & mask;
        while (slot[h]) {
            if (key_same(&m[slot[h] - 1], &m[i]))
                return (long)i;
            h = (h + 1) & mask;
        }
        slot[h] = (uint16_t)(i + 1);
    }
    return -1;
}
