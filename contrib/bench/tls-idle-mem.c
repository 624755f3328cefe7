/*
 * tls-idle-mem.c - what OpenSSL keeps for one idle server connection.
 *
 * Not built by CMake (a measuring tool, run by hand):
 *   cc -O1 -o /tmp/tls-idle-mem contrib/bench/tls-idle-mem.c -lssl -lcrypto
 *   contrib/stack/tls-cert.sh /tmp/tlsm && /tmp/tls-idle-mem /tmp/tlsm/cert.pem /tmp/tlsm/key.pem [1.2]
 *
 * N server SSL objects with chatd's context settings (tls.c: release
 * buffers, read-ahead, no session cache) each complete a handshake with a
 * client in this process over memory BIOs and exchange one message both
 * ways; then every allocation made inside a server-side call that is
 * still live is summed by OpenSSL source line (CRYPTO_set_mem_functions
 * passes file and line).  The memory BIOs of the test (chatd uses a BIO
 * without a buffer) are freed before the count.  "1.2" caps the client at
 * TLS 1.2.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/ssl.h>

#define N 200

struct hdr {
    size_t n;
    const char *file;
    int line, srv;
    struct hdr *next, *prev;
    long pad; /* keeps what follows 16-byte aligned */
};

static int srv_on;
static struct hdr head;

static void link_(struct hdr *h)
{
    h->next = head.next;
    h->prev = &head;
    if (head.next)
        head.next->prev = h;
    head.next = h;
}

static void unlink_(struct hdr *h)
{
    h->prev->next = h->next;
    if (h->next)
        h->next->prev = h->prev;
}

static void *m_alloc(size_t n, const char *f, int l)
{
    struct hdr *h = malloc(sizeof *h + n);
    if (!h)
        return NULL;
    h->n = n, h->file = f, h->line = l, h->srv = srv_on;
    link_(h);
    return h + 1;
}

static void m_free(void *p, const char *f, int l)
{
    (void)f, (void)l;
    if (p) {
        struct hdr *h = (struct hdr *)p - 1;
        unlink_(h);
        free(h);
    }
}

static void *m_realloc(void *p, size_t n, const char *f, int l)
{
    struct hdr *h;
    if (!p)
        return m_alloc(n, f, l);
    h = (struct hdr *)p - 1;
    unlink_(h);
    if (!(h = realloc(h, sizeof *h + n)))
        return NULL;
    h->n = n, h->file = f, h->line = l, h->srv = srv_on;
    link_(h);
    return h + 1;
}

static void move(BIO *from, BIO *to)
{
    char buf[65536];
    int n;
    while ((n = BIO_read(from, buf, sizeof buf)) > 0)
        BIO_write(to, buf, n);
}

int main(int argc, char **argv)
{
    static struct { const char *f; int l; size_t bytes, cnt; } t[500];
    static SSL *srv[N];
    SSL_CTX *sctx, *cctx;
    size_t tot = 0;
    int nt = 0;

    if (argc < 3) {
        fprintf(stderr, "usage: %s cert.pem key.pem [1.2]\n", argv[0]);
        return 2;
    }
    CRYPTO_set_mem_functions(m_alloc, m_realloc, m_free);
    sctx = SSL_CTX_new(TLS_server_method());
    cctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_options(sctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_CIPHER_SERVER_PREFERENCE |
                                  SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(sctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_read_ahead(sctx, 1);
    SSL_CTX_set_session_cache_mode(sctx, SSL_SESS_CACHE_OFF);
    if (argc > 3)
        SSL_CTX_set_max_proto_version(cctx, TLS1_2_VERSION);
    if (SSL_CTX_use_certificate_chain_file(sctx, argv[1]) != 1 ||
        SSL_CTX_use_PrivateKey_file(sctx, argv[2], SSL_FILETYPE_PEM) != 1) {
        fprintf(stderr, "cannot load %s / %s\n", argv[1], argv[2]);
        return 1;
    }
    for (int i = 0; i < N; i++) {
        SSL *c = SSL_new(cctx), *s;
        BIO *cr = BIO_new(BIO_s_mem()), *cw = BIO_new(BIO_s_mem()), *sr, *sw;
        char buf[4096];
        SSL_set_connect_state(c);
        SSL_set_bio(c, cr, cw);
        srv_on = 1;
        s = srv[i] = SSL_new(sctx);
        SSL_set_accept_state(s);
        srv_on = 2; /* the test's BIOs: not counted */
        sr = BIO_new(BIO_s_mem());
        sw = BIO_new(BIO_s_mem());
        SSL_set_bio(s, sr, sw);
        srv_on = 0;
        for (int k = 0; k < 20 && !(SSL_is_init_finished(c) && SSL_is_init_finished(s)); k++) {
            SSL_do_handshake(c);
            move(cw, sr);
            srv_on = 1;
            SSL_do_handshake(s);
            srv_on = 0;
            move(sw, cr);
        }
        SSL_write(c, "hello\n", 6);
        move(cw, sr);
        srv_on = 1;
        SSL_read(s, buf, sizeof buf);
        SSL_write(s, "hi\n", 3);
        srv_on = 0;
        move(sw, cr);
        SSL_read(c, buf, sizeof buf);
        if (i == 0)
            printf("%s %s\n", SSL_get_version(s), SSL_get_cipher_name(s));
    }
    for (int i = 0; i < N; i++) /* the test's BIOs and what they hold */
        SSL_set_bio(srv[i], NULL, NULL);
    for (struct hdr *h = head.next; h; h = h->next) {
        int j;
        if (h->srv != 1)
            continue;
        for (j = 0; j < nt; j++)
            if (t[j].l == h->line && strcmp(t[j].f, h->file) == 0)
                break;
        if (j == nt) {
            if (nt == 500)
                continue;
            t[nt].f = h->file, t[nt].l = h->line, t[nt].bytes = t[nt].cnt = 0;
            nt++;
        }
        t[j].bytes += h->n;
        t[j].cnt++;
        tot += h->n;
    }
    for (int a = 0; a < nt; a++)
        for (int b = a + 1; b < nt; b++)
            if (t[b].bytes > t[a].bytes) {
                __typeof__(t[0]) x = t[a];
                t[a] = t[b];
                t[b] = x;
            }
    printf("live per idle server connection: %zu bytes (requested, before malloc's own overhead)\n",
           tot / N);
    for (int a = 0; a < nt && a < 25; a++)
        printf("%7zu B %5.1f allocations  %s:%d\n", t[a].bytes / N, (double)t[a].cnt / N,
               t[a].f, t[a].l);
    return 0;
}
