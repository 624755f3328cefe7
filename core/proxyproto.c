/*
 * proxyproto.c - the PROXY protocol header (haproxy's proxy-protocol.txt,
 * versions 1 and 2) that a balancer such as nginx or haproxy puts in front
 * of a connection's bytes to tell the server who the client really is.
 *
 * Design: a pure function of the bytes received so far, with no state of
 * its own and no libuv: the caller keeps the first bytes of the connection
 * (at most PP_MAX_HEADER, the longest header accepted) and asks again when
 * more arrive.  The answer is PP_NEED_MORE (every byte so far can still
 * start a valid header), PP_DONE (a whole header, its length in *used) or
 * PP_INVALID (with a reason); a longer input never changes an answer that
 * a shorter one already gave, and PP_NEED_MORE never comes for
 * PP_MAX_HEADER bytes or more, so the caller's buffer cannot overflow.
 *
 * Strict, as a server facing only its own balancer can afford to be: v1 is
 * exactly "PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n" with single spaces,
 * numeric addresses of the family named, decimal ports without leading
 * zeros, within 107 bytes, or "PROXY UNKNOWN[ anything]\r\n"; v2 is the
 * 12-byte signature, version 2, command LOCAL or PROXY, and for PROXY an
 * AF_INET or AF_INET6 STREAM address block (AF_UNSPEC: unknown), followed
 * by well-formed TLVs, which are skipped; a v2 address length over
 * PP_V2_MAX_LEN is invalid.  Anything else is PP_INVALID.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "core.h"

#define V1_MAX 107                  /* the longest v1 line, CRLF included */
#define V2_HEAD 16                  /* signature, ver/cmd, fam, len */

static const char v1_sig[] = "PROXY ";
static const unsigned char v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                         0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

static int invalid(struct pp_header *h, const char *why)
{
    h->err = why;
    return PP_INVALID;
}

/* ---- version 1 -------------------------------------------------------- */

/* A decimal port, "0".."65535", no sign, no leading zero. */
static int v1_port(const char *p, size_t n, uint16_t *out)
{
    unsigned long v = 0;

    if (n == 0 || n > 5 || (n > 1 && p[0] == '0'))
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return -1;
        v = v * 10 + (unsigned long)(p[i] - '0');
    }
    if (v > 65535)
        return -1;
    *out = (uint16_t)v;
    return 0;
}

/* A numeric address of family af into ss (port set later). */
static int v1_addr(int af, const char *p, size_t n, struct sockaddr_storage *ss)
{
    char tmp[64];

    if (n == 0 || n >= sizeof tmp)
        return -1;
    memcpy(tmp, p, n);
    tmp[n] = '\0';
    memset(ss, 0, sizeof *ss);
    if (af == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        a->sin_family = AF_INET;
        return inet_pton(AF_INET, tmp, &a->sin_addr) == 1 ? 0 : -1;
    }
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    a6->sin6_family = AF_INET6;
    return inet_pton(AF_INET6, tmp, &a6->sin6_addr) == 1 ? 0 : -1;
}

static void set_port(struct sockaddr_storage *ss, uint16_t port)
{
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons(port);
    else
        ((struct sockaddr_in6 *)ss)->sin6_port = htons(port);
}

/* The fields of a complete line between "PROXY " and "\r\n". */
static int v1_fields(const char *p, size_t n, struct pp_header *h)
{
    const char *f[5];
    size_t len[5], k = 0, start = 0;
    uint16_t sport, dport;
    int af;

    if (n >= 7 && memcmp(p, "UNKNOWN", 7) == 0 && (n == 7 || p[7] == ' ')) {
        h->command = PP_LOCAL; /* the rest of the line is ignored */
        return PP_DONE;
    }
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != ' ')
            continue;
        if (k == 5)
            return invalid(h, "v1: too many fields");
        f[k] = p + start;
        len[k++] = i - start;
        start = i + 1;
    }
    if (k != 5)
        return invalid(h, "v1: expected PROTO SRC DST SPORT DPORT");
    if (len[0] == 4 && memcmp(f[0], "TCP4", 4) == 0)
        af = AF_INET;
    else if (len[0] == 4 && memcmp(f[0], "TCP6", 4) == 0)
        af = AF_INET6;
    else
        return invalid(h, "v1: protocol is not TCP4, TCP6 or UNKNOWN");
    if (v1_addr(af, f[1], len[1], &h->src) || v1_addr(af, f[2], len[2], &h->dst))
        return invalid(h, "v1: bad address for the protocol");
    if (v1_port(f[3], len[3], &sport) || v1_port(f[4], len[4], &dport))
        return invalid(h, "v1: bad port");
    set_port(&h->src, sport);
    set_port(&h->dst, dport);
    h->command = PP_PROXY;
    return PP_DONE;
}

static int v1_parse(const char *buf, size_t len, struct pp_header *h, size_t *used)
{
    size_t n = len < V1_MAX ? len : V1_MAX;

    h->version = 1;
    for (size_t i = sizeof v1_sig - 1; i < n; i++) {
        if (buf[i] == '\r') {
            if (i + 1 >= V1_MAX)
                return invalid(h, "v1: no CRLF within 107 bytes");
            if (i + 1 == len)
                return PP_NEED_MORE;
            if (buf[i + 1] != '\n')
                return invalid(h, "v1: CR not followed by LF");
            *used = i + 2;
            return v1_fields(buf + sizeof v1_sig - 1, i - (sizeof v1_sig - 1), h);
        }
        if (buf[i] == '\n' || buf[i] == '\0')
            return invalid(h, "v1: LF or NUL before CR");
    }
    if (len >= V1_MAX)
        return invalid(h, "v1: no CRLF within 107 bytes");
    return PP_NEED_MORE;
}

/* ---- version 2 -------------------------------------------------------- */

/* TLVs: type (1), length (2, network order), value; they must fill the
 * rest of the header exactly.  Their content is not used. */
static int v2_tlvs(const unsigned char *p, size_t n)
{
    while (n > 0) {
        size_t l;
        if (n < 3)
            return -1;
        l = (size_t)p[1] << 8 | p[2];
        if (l > n - 3)
            return -1;
        p += 3 + l;
        n -= 3 + l;
    }
    return 0;
}

static int v2_parse(const unsigned char *b, size_t len, struct pp_header *h,
                    size_t *used)
{
    size_t alen, need;
    unsigned cmd, fam, proto;

    h->version = 2;
    if (len < V2_HEAD)
        return PP_NEED_MORE;
    if ((b[12] >> 4) != 2)
        return invalid(h, "v2: version is not 2");
    cmd = b[12] & 0x0f;
    if (cmd > 1)
        return invalid(h, "v2: command is not LOCAL or PROXY");
    fam = b[13] >> 4;
    proto = b[13] & 0x0f;
    alen = (size_t)b[14] << 8 | b[15];
    if (alen > PP_V2_MAX_LEN)
        return invalid(h, "v2: header longer than 512 bytes");
    /* LOCAL, or PROXY with AF_UNSPEC: the block is skipped unread and the
     * socket's addresses stand (need 0) */
    need = cmd == 0 ? 0 : fam == 1 ? 12 : fam == 2 ? 36 : fam == 0 ? 0 : 1;
    if (need == 1 || (need && proto != 1))
        return invalid(h, "v2: not TCP over IPv4 or IPv6");
    if (alen < need)
        return invalid(h, "v2: address block too short for its family");
    if (len < V2_HEAD + alen)
        return PP_NEED_MORE;
    b += V2_HEAD;
    if (need && v2_tlvs(b + need, alen - need))
        return invalid(h, "v2: malformed TLV");
    *used = V2_HEAD + alen;
    h->command = need ? PP_PROXY : PP_LOCAL;
    if (need == 12) {
        struct sockaddr_in *s = (struct sockaddr_in *)&h->src;
        struct sockaddr_in *d = (struct sockaddr_in *)&h->dst;
        s->sin_family = d->sin_family = AF_INET;
        memcpy(&s->sin_addr, b, 4);
        memcpy(&d->sin_addr, b + 4, 4);
        memcpy(&s->sin_port, b + 8, 2);
        memcpy(&d->sin_port, b + 10, 2);
    } else if (need == 36) {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&h->src;
        struct sockaddr_in6 *d = (struct sockaddr_in6 *)&h->dst;
        s->sin6_family = d->sin6_family = AF_INET6;
        memcpy(&s->sin6_addr, b, 16);
        memcpy(&d->sin6_addr, b + 16, 16);
        memcpy(&s->sin6_port, b + 32, 2);
        memcpy(&d->sin6_port, b + 34, 2);
    }
    return PP_DONE;
}

/* ---- entry ------------------------------------------------------------ */

int pp_parse(const char *buf, size_t len, struct pp_header *h, size_t *used)
{
    size_t n;

    memset(h, 0, sizeof *h);
    *used = 0;
    if (len == 0)
        return PP_NEED_MORE;
    if ((unsigned char)buf[0] == v2_sig[0]) {
        n = len < sizeof v2_sig ? len : sizeof v2_sig;
        if (memcmp(buf, v2_sig, n) != 0)
            return invalid(h, "not a PROXY header");
        if (len < sizeof v2_sig)
            return PP_NEED_MORE;
        return v2_parse((const unsigned char *)buf, len, h, used);
    }
    n = len < sizeof v1_sig - 1 ? len : sizeof v1_sig - 1;
    if (memcmp(buf, v1_sig, n) != 0)
        return invalid(h, "not a PROXY header");
    if (len < sizeof v1_sig - 1)
        return PP_NEED_MORE;
    return v1_parse(buf, len, h, used);
}
