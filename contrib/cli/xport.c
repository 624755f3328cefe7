/*
 * xport.c - chat-cli's transports between the TCP socket and the JSON
 * stream: nothing (tcp://), TLS (tls://), WebSocket (ws://) and WebSocket
 * over TLS (wss://), stacked as  socket < TLS < WebSocket < JSON.
 *
 * conn.c owns the socket and the JSON scanner and calls four functions here:
 * xp_start once the socket is connected, xp_input with every read, xp_send
 * for every request, xp_free from the close callback.  This file calls back
 * down (conn_raw_write) and up (conn_ready once the handshakes are done,
 * conn_plain_in with application bytes, conn_fail), and after any call up
 * checks conn_alive: a reply handler may have dropped the connection.
 *
 * TLS is OpenSSL 3 through a pair of memory BIOs, so the socket stays
 * libuv's: ciphertext read from the socket goes into the read BIO, and
 * whatever OpenSSL wrote into the write BIO is handed to uv_write after
 * every OpenSSL call.  The server's certificate chain is verified against
 * the system's CAs (or --ca FILE) and its name against the host of the URL
 * (an IP address against the certificate's IP SANs); --insecure turns the
 * check off and says so.
 *
 * WebSocket: the upgrade response is parsed by http-parser (status 101,
 * Upgrade: websocket, and Sec-WebSocket-Accept checked against the key we
 * sent), the frames by wslay in the client role (masks from RAND_bytes).
 * Each request is one text message and each text message from the server
 * is one JSON object; pings are answered by wslay; a close from the server
 * is answered and ends the connection with its code and reason.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <arpa/inet.h>
#include <http_parser.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <wslay/wslay.h>

#include "cli.h"

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#define WS_MSG_MAX (64u << 20) /* as conn.c's IN_MAX */
#define HDR_MAX 1024           /* one upgrade-response header value we keep */

enum { H_NONE, H_UPGRADE, H_ACCEPT };

struct xp {
    SSL *ssl;                 /* tls, wss */
    int tls_up;
    wslay_event_context_ptr ws;
    http_parser hp;
    int hdr;                  /* H_*: the header whose value comes next */
    int in_value;             /* http-parser's last callback was a value */
    struct sbuf name;         /* the header name being read */
    int hdrs_done, ws_up;
    char key[32];             /* Sec-WebSocket-Key we sent */
    struct sbuf upgrade, accept;
    const uint8_t *rd;        /* plaintext for wslay's recv callback */
    size_t rdlen;
    char why[256];
};

static int uses_tls(const struct cli *c)
{
    return c->scheme == XP_TLS || c->scheme == XP_WSS;
}

static int uses_ws(const struct cli *c)
{
    return c->scheme == XP_WS || c->scheme == XP_WSS;
}

/* ---- TLS --------------------------------------------------------------- */

int xp_init(struct cli *c)
{
    SSL_CTX *ctx;

    if (!uses_tls(c))
        return 0;
    ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx)
        cli_oom();
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (c->insecure) {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        fputs("chat-cli: warning: --insecure: the server's certificate is "
              "not checked; anyone on the path can read and change this "
              "session\n", stderr);
    } else {
        SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        if (c->ca_file ? !SSL_CTX_load_verify_locations(ctx, c->ca_file, NULL)
                       : !SSL_CTX_set_default_verify_paths(ctx)) {
            char e[256];

            ERR_error_string_n(ERR_get_error(), e, sizeof(e));
            fprintf(stderr, "chat-cli: cannot load %s: %s\n",
                    c->ca_file ? c->ca_file : "the system's CA certificates", e);
            SSL_CTX_free(ctx);
            return -1;
        }
    }
    c->ssl_ctx = ctx;
    return 0;
}

void xp_done(struct cli *c)
{
    SSL_CTX_free(c->ssl_ctx);
    c->ssl_ctx = NULL;
}

static void fail(struct cli_conn *k, const char *fmt, const char *arg)
{
    struct xp *x = k->xp;

    snprintf(x->why, sizeof(x->why), fmt, arg);
    conn_fail(k, x->why);
}

/* Hand what OpenSSL wrote to the socket. */
static void tls_flush(struct cli_conn *k)
{
    BIO *wb = SSL_get_wbio(k->xp->ssl);
    char buf[16384];
    int n;

    while ((n = BIO_read(wb, buf, sizeof(buf))) > 0)
        conn_raw_write(k, buf, (size_t)n);
}

static void tls_fail(struct cli_conn *k, const char *what)
{
    struct xp *x = k->xp;
    long vr = SSL_get_verify_result(x->ssl);
    unsigned long e = ERR_get_error();
    char es[200];

    tls_flush(k); /* the alert, if any */
    if (vr != X509_V_OK) {
        snprintf(x->why, sizeof(x->why), "TLS %s: certificate verify failed: "
                 "%s", what, X509_verify_cert_error_string(vr));
    } else {
        ERR_error_string_n(e, es, sizeof(es));
        snprintf(x->why, sizeof(x->why), "TLS %s failed: %s", what,
                 e ? es : "the server closed the connection");
    }
    ERR_clear_error();
    conn_fail(k, x->why);
}

static int is_ip(const char *host)
{
    unsigned char b[16];

    return inet_pton(AF_INET, host, b) == 1 || inet_pton(AF_INET6, host, b) == 1;
}

static int tls_begin(struct cli_conn *k)
{
    struct cli *c = k->c;
    struct xp *x = k->xp;
    BIO *rb = BIO_new(BIO_s_mem()), *wb = BIO_new(BIO_s_mem());

    x->ssl = SSL_new(c->ssl_ctx);
    if (!x->ssl || !rb || !wb)
        cli_oom();
    SSL_set_bio(x->ssl, rb, wb);
    SSL_set_connect_state(x->ssl);
    if (is_ip(c->host)) {
        if (!X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(x->ssl), c->host))
            cli_oom();
    } else if (!SSL_set_tlsext_host_name(x->ssl, c->host) ||
               !SSL_set1_host(x->ssl, c->host)) {
        cli_oom();
    }
    return 0;
}

/* ---- WebSocket: the upgrade ---------------------------------------------- */

static void ws_write(struct cli_conn *k, const void *p, size_t n);

static void b64(const unsigned char *in, int n, char *out)
{
    EVP_EncodeBlock((unsigned char *)out, in, n);
}

static void ws_request(struct cli_conn *k)
{
    struct cli *c = k->c;
    struct xp *x = k->xp;
    unsigned char raw[16];
    int v6 = strchr(c->host, ':') != NULL;
    struct sbuf b = {0};

    if (RAND_bytes(raw, sizeof(raw)) != 1)
        cli_oom();
    b64(raw, sizeof(raw), x->key);
    sb_fmt(&b, "GET %s HTTP/1.1\r\nHost: %s%s%s:%s\r\n", c->path,
           v6 ? "[" : "", c->host, v6 ? "]" : "", c->port);
    sb_str(&b, "Upgrade: websocket\r\nConnection: Upgrade\r\n");
    sb_fmt(&b, "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", x->key);
    if (c->origin)
        sb_fmt(&b, "Origin: %s\r\n", c->origin);
    sb_str(&b, "User-Agent: chat-cli\r\n\r\n");
    ws_write(k, b.data, b.len);
    sb_free(&b);
}

/* http-parser may hand a name or a value over in pieces (when a read
 * splits it): a name is complete once its value starts. */
static int on_hfield(http_parser *hp, const char *at, size_t n)
{
    struct xp *x = hp->data;

    if (x->in_value || !x->name.data) {
        x->in_value = 0;
        x->name.len = 0;
        if (x->name.data)
            x->name.data[0] = '\0';
    }
    if (x->name.len + n < HDR_MAX)
        sb_add(&x->name, at, n);
    return 0;
}

static int on_hvalue(http_parser *hp, const char *at, size_t n)
{
    struct xp *x = hp->data;
    struct sbuf *b;

    if (!x->in_value) {
        const char *name = x->name.data ? x->name.data : "";

        x->in_value = 1;
        x->hdr = !strcasecmp(name, "upgrade") ? H_UPGRADE
               : !strcasecmp(name, "sec-websocket-accept") ? H_ACCEPT : H_NONE;
    }
    b = x->hdr == H_UPGRADE ? &x->upgrade : x->hdr == H_ACCEPT ? &x->accept : NULL;

    if (b && b->len + n < HDR_MAX)
        sb_add(b, at, n);
    return 0;
}

static int on_hdone(http_parser *hp)
{
    struct xp *x = hp->data;

    x->hdrs_done = 1;
    return 0;
}

static const http_parser_settings resp_settings = {
    .on_header_field = on_hfield,
    .on_header_value = on_hvalue,
    .on_headers_complete = on_hdone,
};

/* 0 when the response is a valid upgrade for our key. */
static int ws_check(struct cli_conn *k)
{
    struct xp *x = k->xp;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    char want[64];
    struct sbuf s = {0};

    if (x->hp.status_code != 101) {
        snprintf(x->why, sizeof(x->why), "the server answered HTTP %u, not "
                 "101 Switching Protocols (wrong path, or no WebSocket "
                 "listener there?)", x->hp.status_code);
        return -1;
    }
    sb_fmt(&s, "%s%s", x->key, WS_GUID);
    if (!EVP_Digest(s.data, s.len, md, &mdlen, EVP_sha1(), NULL))
        cli_oom();
    sb_free(&s);
    b64(md, (int)mdlen, want);
    if (!x->hp.upgrade || !x->upgrade.data ||
        strcasecmp(x->upgrade.data, "websocket") ||
        !x->accept.data || strcmp(x->accept.data, want)) {
        snprintf(x->why, sizeof(x->why), "the server's WebSocket upgrade is "
                 "invalid (Upgrade or Sec-WebSocket-Accept)");
        return -1;
    }
    return 0;
}

/* ---- WebSocket: frames (wslay) ------------------------------------------- */

static ssize_t ws_recv_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len,
                          int flags, void *ud)
{
    struct xp *x = ((struct cli_conn *)ud)->xp;

    (void)flags;
    if (!x->rdlen) {
        wslay_event_set_error(ctx, WSLAY_ERR_WOULDBLOCK);
        return -1;
    }
    if (len > x->rdlen)
        len = x->rdlen;
    memcpy(buf, x->rd, len);
    x->rd += len;
    x->rdlen -= len;
    return (ssize_t)len;
}

static ssize_t ws_send_cb(wslay_event_context_ptr ctx, const uint8_t *data,
                          size_t len, int flags, void *ud)
{
    (void)ctx;
    (void)flags;
    ws_write(ud, data, len); /* queued by libuv: never would block */
    return (ssize_t)len;
}

static int ws_mask_cb(wslay_event_context_ptr ctx, uint8_t *buf, size_t len,
                      void *ud)
{
    (void)ctx;
    (void)ud;
    return RAND_bytes(buf, (int)len) == 1 ? 0 : -1;
}

static void ws_msg_cb(wslay_event_context_ptr ctx,
                      const struct wslay_event_on_msg_recv_arg *m, void *ud)
{
    struct cli_conn *k = ud;

    (void)ctx;
    if (!conn_alive(k))
        return;
    if (m->opcode == WSLAY_TEXT_FRAME)
        conn_plain_in(k, (const char *)m->msg, m->msg_length);
    else if (m->opcode == WSLAY_BINARY_FRAME)
        fail(k, "%s", "the server sent a binary WebSocket message");
}

static const struct wslay_event_callbacks ws_callbacks = {
    .recv_callback = ws_recv_cb,
    .send_callback = ws_send_cb,
    .genmask_callback = ws_mask_cb,
    .on_msg_recv_callback = ws_msg_cb,
};

static void ws_closed(struct cli_conn *k)
{
    struct xp *x = k->xp;
    unsigned code = wslay_event_get_status_code_received(x->ws);

    snprintf(x->why, sizeof(x->why), "the server closed the WebSocket "
             "(code %u)", code);
    conn_fail(k, x->why);
}

/* Frames from the server: text messages go up, pings are answered. */
static void ws_frames(struct cli_conn *k, const char *p, size_t n)
{
    struct xp *x = k->xp;

    x->rd = (const uint8_t *)p;
    x->rdlen = n;
    if (wslay_event_recv(x->ws) != 0) {
        if (conn_alive(k))
            fail(k, "%s", "the server broke the WebSocket protocol");
        return;
    }
    if (!conn_alive(k))
        return;
    wslay_event_send(x->ws); /* pongs, our half of a close */
    if (wslay_event_get_close_received(x->ws))
        ws_closed(k);
}

static void ws_upgrade_in(struct cli_conn *k, const char *p, size_t n)
{
    struct xp *x = k->xp;
    size_t used = http_parser_execute(&x->hp, &resp_settings, p, n);

    if (x->hp.http_errno != HPE_OK && !x->hp.upgrade) {
        fail(k, "the server's answer to the WebSocket upgrade is not HTTP: "
             "%s", http_errno_description(HTTP_PARSER_ERRNO(&x->hp)));
        return;
    }
    if (!x->hdrs_done)
        return;
    if (ws_check(k) < 0) {
        conn_fail(k, x->why);
        return;
    }
    if (wslay_event_context_client_init(&x->ws, &ws_callbacks, k) != 0)
        cli_oom();
    wslay_event_config_set_max_recv_msg_length(x->ws, WS_MSG_MAX);
    x->ws_up = 1;
    conn_ready(k);
    if (conn_alive(k) && used < n)
        ws_frames(k, p + used, n - used);
}

/* Plaintext from the server (after TLS, if any). */
static void plain_in(struct cli_conn *k, const char *p, size_t n)
{
    struct xp *x = k->xp;

    if (!uses_ws(k->c))
        conn_plain_in(k, p, n);
    else if (x->ws_up)
        ws_frames(k, p, n);
    else
        ws_upgrade_in(k, p, n);
}

/* Bytes for the WebSocket layer's peer: through TLS when wss. */
static void ws_write(struct cli_conn *k, const void *p, size_t n)
{
    struct xp *x = k->xp;

    if (!x->ssl) {
        conn_raw_write(k, p, n);
        return;
    }
    if (n && SSL_write(x->ssl, p, (int)n) <= 0) {
        tls_fail(k, "write");
        return;
    }
    tls_flush(k);
}

/* ---- the stack ------------------------------------------------------------ */

/* The transport under JSON is up: say so, or start the WebSocket upgrade. */
static void lower_up(struct cli_conn *k)
{
    struct xp *x = k->xp;

    if (!uses_ws(k->c)) {
        conn_ready(k);
        return;
    }
    http_parser_init(&x->hp, HTTP_RESPONSE);
    x->hp.data = x;
    ws_request(k);
}

static void tls_handshake(struct cli_conn *k)
{
    struct xp *x = k->xp;
    int r = SSL_do_handshake(x->ssl);

    if (r == 1) {
        tls_flush(k);
        x->tls_up = 1;
        lower_up(k);
        return;
    }
    if (SSL_get_error(x->ssl, r) == SSL_ERROR_WANT_READ) {
        tls_flush(k);
        return;
    }
    tls_fail(k, "handshake");
}

static void tls_input(struct cli_conn *k, const char *p, size_t n)
{
    struct xp *x = k->xp;
    char buf[16384];
    int r;

    if (BIO_write(SSL_get_rbio(x->ssl), p, (int)n) != (int)n)
        cli_oom();
    if (!x->tls_up) {
        tls_handshake(k);
        if (!x->tls_up || !conn_alive(k))
            return;
    }
    while ((r = SSL_read(x->ssl, buf, sizeof(buf))) > 0) {
        plain_in(k, buf, (size_t)r);
        if (!conn_alive(k))
            return;
    }
    switch (SSL_get_error(x->ssl, r)) {
    case SSL_ERROR_WANT_READ:
        tls_flush(k); /* e.g. answers to post-handshake messages */
        break;
    case SSL_ERROR_ZERO_RETURN:
        fail(k, "%s", "the server closed the TLS session");
        break;
    default:
        tls_fail(k, "read");
    }
}

void xp_start(struct cli_conn *k)
{
    k->xp = calloc(1, sizeof(*k->xp));
    if (!k->xp)
        cli_oom();
    if (!uses_tls(k->c)) {
        lower_up(k);
        return;
    }
    tls_begin(k);
    tls_handshake(k);
}

void xp_input(struct cli_conn *k, const char *p, size_t n)
{
    if (k->xp->ssl)
        tls_input(k, p, n);
    else
        plain_in(k, p, n);
}

void xp_send(struct cli_conn *k, const char *line, size_t n)
{
    struct xp *x = k->xp;
    struct wslay_event_msg m = {WSLAY_TEXT_FRAME, (const uint8_t *)line,
                                n && line[n - 1] == '\n' ? n - 1 : n};

    if (x->ws) {
        if (wslay_event_queue_msg(x->ws, &m) != 0 ||
            wslay_event_send(x->ws) != 0)
            fail(k, "%s", "cannot send on the WebSocket");
        return;
    }
    ws_write(k, line, n);
}

void xp_free(struct cli_conn *k)
{
    struct xp *x = k->xp;

    if (!x)
        return;
    if (x->ws)
        wslay_event_context_free(x->ws);
    SSL_free(x->ssl);
    sb_free(&x->upgrade);
    sb_free(&x->accept);
    sb_free(&x->name);
    free(x);
    k->xp = NULL;
}
