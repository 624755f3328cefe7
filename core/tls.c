/*
 * tls.c - the tls transport: OpenSSL 3 on the loop, never blocking.
 *
 * Each connection's SSL object talks to net through one custom BIO and no
 * buffer of its own: the BIO's read side serves the bytes of the current
 * socket read in place (net's loop-wide read buffer), its write side hands
 * every record straight to net_tr_down(), which appends it to the
 * session's wire buffer.  So the only per-connection memory besides the SSL
 * object is what OpenSSL keeps between records, and SSL_MODE_RELEASE_BUFFERS
 * frees its record buffers whenever they are empty: an idle connection holds
 * no buffer at all.  Decrypted bytes land in one loop-wide buffer and go up
 * to net in place.  What stays is OpenSSL's own (3.0, TLS 1.3, measured
 * with CRYPTO_set_mem_functions): the SSL object 7.6 KiB, two AES-GCM
 * contexts 1.9 KiB, the session 0.9 KiB, the handshake digest, key shares,
 * locks and the certificate reference about 2.6 KiB: about 13 KiB an idle
 * connection that no setting of ours releases.
 *
 * The endpoint's SSL_CTX is built from [tls] at start.  A SIGHUP builds a
 * new one on a worker thread (it reads files) and swaps it in on the loop:
 * new handshakes use it, connections keep the context they started with
 * (each SSL holds a reference), and files that do not load or do not match
 * leave the old context in place, with a log line saying why.  The session
 * cache is off (resumption uses stateless tickets) so that the server keeps
 * nothing per past handshake.
 */
#include <limits.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include "transport.h"

#define TLS_PLAIN_SIZE 16384 /* one record's worth of plaintext per SSL_read */

/* What a context is built from: copies of the [tls] settings. */
struct tls_settings {
    char *cert, *key, *ca, *ciphers, *groups;
    int min_version;
};

struct tls_ep {
    SSL_CTX *ctx;
    char name[80];
    /* a reload under way (uv_work on the pool) */
    uv_work_t work;
    int reloading, again, stopped;
    struct tls_settings next;   /* what the running reload builds */
    struct tls_settings queued; /* a SIGHUP during it: the one after */
    SSL_CTX *built;
    char err[256];
};

struct tls_conn {
    struct net_tconn t; /* first: net sees this */
    SSL *ssl;
    const char *in;     /* the unread part of the current socket read */
    size_t in_len;
    unsigned failed : 1;
};

static BIO_METHOD *bio_meth;
static char plain[TLS_PLAIN_SIZE];

/* ---- settings and contexts --------------------------------------------- */

static void settings_free(struct tls_settings *st)
{
    mem_free(st->cert);
    mem_free(st->key);
    mem_free(st->ca);
    mem_free(st->ciphers);
    mem_free(st->groups);
    memset(st, 0, sizeof *st);
}

static int settings_copy(struct tls_settings *st, const struct conf *c)
{
    memset(st, 0, sizeof *st);
    st->min_version = c->tls_min_version == 0x0304 ? TLS1_3_VERSION : TLS1_2_VERSION;
    if (!(st->cert = mem_strdup(c->tls_cert)) || !(st->key = mem_strdup(c->tls_key)) ||
        !(st->ca = mem_strdup(c->tls_ca)) || !(st->ciphers = mem_strdup(c->tls_ciphers)) ||
        !(st->groups = mem_strdup(c->tls_groups))) {
        settings_free(st);
        return -1;
    }
    return 0;
}

/* The last OpenSSL error as text, after what (the error queue is cleared). */
static void ssl_err(char *err, size_t errlen, const char *what, const char *file)
{
    unsigned long e = ERR_peek_last_error();
    char buf[200];

    ERR_error_string_n(e, buf, sizeof buf);
    snprintf(err, errlen, "%s%s%s: %s", what, file ? " " : "", file ? file : "",
             e ? buf : "failed");
    ERR_clear_error();
}

/* Extra chain certificates (ca): every certificate in the file. */
static int add_chain(SSL_CTX *ctx, const char *path, char *err, size_t errlen)
{
    BIO *b = BIO_new_file(path, "r");
    X509 *x;
    int n = 0;

    if (!b) {
        ssl_err(err, errlen, "cannot read ca", path);
        return -1;
    }
    while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL))) {
        int ok = SSL_CTX_add1_chain_cert(ctx, x);
        X509_free(x);
        if (!ok)
            break;
        n++;
    }
    BIO_free(b);
    ERR_clear_error(); /* the end of the file reads as an error */
    if (n == 0) {
        snprintf(err, errlen, "ca %s: no certificate in it", path);
        return -1;
    }
    return 0;
}

/* A server context from st; NULL with the reason in err.  Reads files:
 * start-up or a worker thread. */
static SSL_CTX *ctx_build(const struct tls_settings *st, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());

    if (!ctx) {
        ssl_err(err, errlen, "SSL_CTX_new", NULL);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, st->min_version);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                 SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    /* take all the bytes of a socket read at once rather than a record's
     * header, then its body: half the BIO calls (the buffer is released
     * all the same once it is drained, and tls_input drains it) */
    SSL_CTX_set_read_ahead(ctx, 1);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (!SSL_CTX_set_cipher_list(ctx, st->ciphers)) {
        ssl_err(err, errlen, "ciphers", st->ciphers);
        goto fail;
    }
    if (!SSL_CTX_set1_groups_list(ctx, st->groups)) {
        ssl_err(err, errlen, "groups", st->groups);
        goto fail;
    }
    if (SSL_CTX_use_certificate_chain_file(ctx, st->cert) != 1) {
        ssl_err(err, errlen, "cert", st->cert);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, st->key, SSL_FILETYPE_PEM) != 1) {
        ssl_err(err, errlen, "key", st->key);
        goto fail;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        ssl_err(err, errlen, "key does not match cert", st->cert);
        goto fail;
    }
    if (st->ca[0] && add_chain(ctx, st->ca, err, errlen))
        goto fail;
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

/* ---- the BIO between SSL and net ---------------------------------------- */

static int bio_write(BIO *b, const char *buf, int n)
{
    struct tls_conn *tc = BIO_get_data(b);

    BIO_clear_retry_flags(b);
    if (n <= 0)
        return 0;
    return net_tr_down(&tc->t, buf, (size_t)n) ? -1 : n;
}

static int bio_read(BIO *b, char *buf, int n)
{
    struct tls_conn *tc = BIO_get_data(b);
    size_t k;

    BIO_clear_retry_flags(b);
    if (tc->in_len == 0) {
        BIO_set_retry_read(b);
        return -1;
    }
    k = tc->in_len < (size_t)n ? tc->in_len : (size_t)n;
    memcpy(buf, tc->in, k);
    tc->in += k;
    tc->in_len -= k;
    return (int)k;
}

static long bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)b;
    (void)num;
    (void)ptr;
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int bio_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static int bio_init(void)
{
    if (bio_meth)
        return 0;
    if (!(bio_meth = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "chatd")))
        return -1;
    BIO_meth_set_write(bio_meth, bio_write);
    BIO_meth_set_read(bio_meth, bio_read);
    BIO_meth_set_ctrl(bio_meth, bio_ctrl);
    BIO_meth_set_create(bio_meth, bio_create);
    return 0;
}

/* ---- endpoint ------------------------------------------------------------ */

static int tls_ep_start(const struct conf *c, const struct conf_listen *l, void **ep_ctx,
                        int *handshake_ms, char *err, size_t errlen)
{
    struct tls_ep *ep;
    struct tls_settings st;

    if (bio_init() || !(ep = mem_calloc(1, sizeof *ep))) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (settings_copy(&st, c)) {
        mem_free(ep);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    ep->ctx = ctx_build(&st, err, errlen);
    settings_free(&st);
    if (!ep->ctx) {
        mem_free(ep);
        return -1;
    }
    snprintf(ep->name, sizeof ep->name, "%s:%d", l->host, l->port);
    *ep_ctx = ep;
    *handshake_ms = c->tls_handshake_timeout_s * 1000;
    return 0;
}

static void reload_work(uv_work_t *req)
{
    struct tls_ep *ep = container_of(req, struct tls_ep, work);
    ep->err[0] = '\0';
    ep->built = ctx_build(&ep->next, ep->err, sizeof ep->err);
}

static void reload_start(struct tls_ep *ep);

static void reload_done(uv_work_t *req, int status)
{
    struct tls_ep *ep = container_of(req, struct tls_ep, work);

    ep->reloading = 0;
    settings_free(&ep->next);
    if (ep->stopped) {
        SSL_CTX_free(ep->built);
        settings_free(&ep->queued);
        mem_free(ep);
        return;
    }
    if (status == 0 && ep->built) {
        SSL_CTX_free(ep->ctx); /* connections hold their own reference */
        ep->ctx = ep->built;
        LOGI("tls %s: certificate and key reloaded; new handshakes use them", ep->name);
    } else
        LOGE("tls %s: reload failed: %s; keeping the old certificate and key", ep->name,
             ep->err[0] ? ep->err : "cancelled");
    ep->built = NULL;
    if (ep->again) {
        ep->again = 0;
        ep->next = ep->queued;
        memset(&ep->queued, 0, sizeof ep->queued);
        reload_start(ep);
    }
}

/* Build a context from ep->next on the pool. */
static void reload_start(struct tls_ep *ep)
{
    ep->reloading = 1;
    if (uv_queue_work(net_tr_loop(), &ep->work, reload_work, reload_done)) {
        ep->reloading = 0;
        settings_free(&ep->next);
        LOGE("tls %s: reload could not start; keeping the old certificate", ep->name);
    }
}

static void tls_ep_reload(void *ep_ctx, const struct conf *c)
{
    struct tls_ep *ep = ep_ctx;
    struct tls_settings *st = ep->reloading ? &ep->queued : &ep->next;

    settings_free(st);
    if (settings_copy(st, c)) {
        LOGE("tls %s: reload: out of memory; keeping the old certificate", ep->name);
        return;
    }
    if (ep->reloading)
        ep->again = 1; /* after the running one, with the newest settings */
    else
        reload_start(ep);
}

static void tls_ep_stop(void *ep_ctx)
{
    struct tls_ep *ep = ep_ctx;
    SSL_CTX_free(ep->ctx);
    ep->ctx = NULL;
    if (ep->reloading) {
        ep->stopped = 1; /* reload_done frees it */
        return;
    }
    mem_free(ep);
}

/* ---- connection ----------------------------------------------------------- */

static struct net_tconn *tls_open(void *ep_ctx, struct chat_session *s,
                                  struct net_tconn *below)
{
    struct tls_ep *ep = ep_ctx;
    struct tls_conn *tc = mem_calloc(1, sizeof *tc);
    BIO *b;

    (void)s;
    (void)below;
    if (!tc)
        return NULL;
    if (!(tc->ssl = SSL_new(ep->ctx)) || !(b = BIO_new(bio_meth))) {
        SSL_free(tc->ssl);
        mem_free(tc);
        ERR_clear_error();
        return NULL;
    }
    BIO_set_data(b, tc);
    SSL_set_bio(tc->ssl, b, b);
    SSL_set_accept_state(tc->ssl);
    return &tc->t;
}

/* The error queue must be empty before an SSL call whose result goes to
 * SSL_get_error; every failure path here clears it, so it nearly always
 * is, and peeking costs much less than ERR_clear_error's walk of all its
 * slots, once per read and per write. */
static void err_clean(void)
{
    if (ERR_peek_error())
        ERR_clear_error();
}

/* Why a handshake or read failed, for the log (debug: peers do this). */
static void conn_failed(struct tls_conn *tc, const char *what, int r)
{
    unsigned long e = ERR_peek_last_error();
    char buf[160];

    ERR_error_string_n(e, buf, sizeof buf);
    LOGSD(tc->t.s, "tls %s failed (%d): %s", what, SSL_get_error(tc->ssl, r),
          e ? buf : "connection error");
    ERR_clear_error();
    tc->failed = 1;
}

static int tls_input(struct net_tconn *t, const char *buf, size_t n)
{
    struct tls_conn *tc = (struct tls_conn *)t;
    int r, e;

    tc->in = buf;
    tc->in_len = n;
    err_clean();
    if (!t->ready) {
        r = SSL_do_handshake(tc->ssl);
        if (r != 1) {
            e = SSL_get_error(tc->ssl, r);
            tc->in_len = 0;
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
                return 0;
            conn_failed(tc, "handshake", r);
            net_tr_close(t, 1); /* the alert goes out, then the socket closes */
            return 0;
        }
        LOGSD(t->s, "tls: %s, %s", SSL_get_version(tc->ssl),
              SSL_get_cipher_name(tc->ssl));
        net_tr_ready(t);
    }
    while ((r = SSL_read(tc->ssl, plain, sizeof plain)) > 0) {
        net_tr_up(t, plain, (size_t)r);
        if (net_session_closing(t->s))
            break;
    }
    tc->in_len = 0;
    if (r > 0)
        return 0;
    e = SSL_get_error(tc->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
        return 0;
    if (e == SSL_ERROR_ZERO_RETURN) { /* close_notify: the peer is done */
        ERR_clear_error();
        net_tr_close(t, 0);
        return 0;
    }
    conn_failed(tc, "read", r);
    return -1;
}

static int tls_output(struct net_tconn *t, const char *buf, size_t n)
{
    struct tls_conn *tc = (struct tls_conn *)t;
    int r;

    if (tc->failed || n > INT_MAX)
        return -1;
    err_clean();
    r = SSL_write(tc->ssl, buf, (int)n); /* the BIO takes all: never partial */
    if (r == (int)n)
        return 0;
    conn_failed(tc, "write", r);
    return -1;
}

static void tls_close(struct net_tconn *t, int code, const char *reason)
{
    struct tls_conn *tc = (struct tls_conn *)t;
    (void)code;
    (void)reason;
    if (t->ready && !tc->failed) {
        ERR_clear_error();
        SSL_shutdown(tc->ssl); /* close_notify; the peer's is not awaited */
        ERR_clear_error();
    }
}

static void tls_free(struct net_tconn *t)
{
    struct tls_conn *tc = (struct tls_conn *)t;
    SSL_free(tc->ssl); /* and its BIO */
    mem_free(tc);
}

const struct net_transport tls_transport = {
    .name = "tls",
    .below = NULL,
    .flags = 0,
    .ep_start = tls_ep_start,
    .ep_reload = tls_ep_reload,
    .ep_stop = tls_ep_stop,
    .open = tls_open,
    .input = tls_input,
    .output = tls_output,
    .close = tls_close,
    .free = tls_free,
};
