/*
 * conf.c - chat.conf: an INI file read with inih, checked strictly.
 *
 * Sections [server], [plugins], [mysql], [redis], [admin], [limits], [ws],
 * [web] have a fixed set of keys ([limits] also class.NAME, ratelimit.c parses the
 * values);
 * an unknown key, a bad number or an unknown section is an error reported as
 * "file:line: reason" (inih returns the first failing line).  [plugin.NAME]
 * sections are free-form: their keys belong to the plugin, which reads them
 * through the host table.  The result is an immutable struct conf; a reload
 * builds a new one and swaps it, so a bad file changes nothing.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <ini.h>

#include "core.h"

struct parse_ctx {
    struct conf *c;
    int line;          /* current line (counted by us) */
    char err[512];     /* first error, without the "file:line: " prefix */
    int err_line;
    int seen_mysql, seen_redis;
    int ws_max_message_set; /* else [server] max_frame, whatever the order */
    int proxy_line;         /* of [server] proxy_protocol */
};

static int set_err(struct parse_ctx *p, const char *fmt, const char *a,
                   const char *b)
{
    if (!p->err[0])
        snprintf(p->err, sizeof p->err, fmt, a, b);
    return 0; /* inih: this line is an error */
}

static int parse_int(const char *v, long long lo, long long hi, long long *out)
{
    char *end;
    long long x;
    errno = 0;
    x = strtoll(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi)
        return -1;
    *out = x;
    return 0;
}

static int replace_str(char **dst, const char *v)
{
    char *d = mem_strdup(v);
    if (!d)
        return -1;
    mem_free(*dst);
    *dst = d;
    return 0;
}

/* Absolute path for v, relative to the config file's folder. */
static char *abs_path(const struct conf *c, const char *v)
{
    size_t n;
    char *out;
    if (v[0] == '/' || !v[0])
        return mem_strdup(v);
    n = strlen(c->dir) + strlen(v) + 2;
    out = mem_malloc(n);
    if (out)
        snprintf(out, n, "%s/%s", c->dir, v);
    return out;
}

static int parse_list(struct conf *c, const char *v)
{
    char *copy = mem_strdup(v), *tok, *save = NULL;
    if (!copy)
        return -1;
    for (size_t i = 0; i < c->nplugins; i++)
        mem_free(c->plugins[i]);
    c->nplugins = 0;
    for (tok = strtok_r(copy, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save)) {
        char **np = mem_realloc(c->plugins, (c->nplugins + 1) * sizeof *np);
        if (!np)
            goto fail;
        c->plugins = np;
        if (!(c->plugins[c->nplugins] = mem_strdup(tok)))
            goto fail;
        c->nplugins++;
    }
    mem_free(copy);
    return 0;
fail:
    mem_free(copy);
    return -1;
}

int conf_ip_ok(const char *host)
{
    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    return host && (uv_ip4_addr(host, 0, &a4) == 0 || uv_ip6_addr(host, 0, &a6) == 0);
}

int conf_parse_cidr(const char *s, struct conf_cidr *out)
{
    char ip[64];
    const char *slash = strchr(s, '/');
    size_t n = slash ? (size_t)(slash - s) : strlen(s);
    long long bits;

    if (n == 0 || n >= sizeof ip)
        return CHAT_ERR_INVAL;
    memcpy(ip, s, n);
    ip[n] = '\0';
    memset(out, 0, sizeof *out);
    if (inet_pton(AF_INET, ip, out->addr) == 1)
        out->family = AF_INET;
    else if (inet_pton(AF_INET6, ip, out->addr) == 1)
        out->family = AF_INET6;
    else
        return CHAT_ERR_INVAL;
    out->bits = out->family == AF_INET ? 32 : 128;
    if (slash) {
        if (parse_int(slash + 1, 0, out->bits, &bits))
            return CHAT_ERR_INVAL;
        out->bits = (unsigned)bits;
    }
    return CHAT_OK;
}

int conf_cidr_match(const struct conf_cidr *c, int family, const unsigned char *addr)
{
    unsigned full = c->bits / 8, rest = c->bits % 8;

    if (c->family != family || memcmp(c->addr, addr, full) != 0)
        return 0;
    if (rest == 0)
        return 1;
    return ((c->addr[full] ^ addr[full]) & (0xff00u >> rest)) == 0;
}

/* "trusted": addresses and networks separated by commas or blanks. */
static int parse_trusted(struct conf *c, const char *v, char *bad, size_t badlen)
{
    char *copy = mem_strdup(v), *tok, *save = NULL;
    int r = CHAT_OK;

    if (!copy)
        return CHAT_ERR_NOMEM;
    c->ntrusted = 0;
    for (tok = strtok_r(copy, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save)) {
        struct conf_cidr *t = mem_realloc(c->trusted, (c->ntrusted + 1) * sizeof *t);
        if (!t) {
            r = CHAT_ERR_NOMEM;
            break;
        }
        c->trusted = t;
        if (conf_parse_cidr(tok, &t[c->ntrusted])) {
            snprintf(bad, badlen, "%s", tok);
            r = CHAT_ERR_INVAL;
            break;
        }
        c->ntrusted++;
    }
    mem_free(copy);
    return r;
}

#define INT_KEY(k, lo, hi, field)                                        \
    if (strcmp(name, k) == 0) {                                          \
        long long x_;                                                    \
        if (parse_int(value, lo, hi, &x_))                               \
            return set_err(p, "%s: not an integer in range (%s)", name,  \
                           #lo ".." #hi);                                \
        field = x_;                                                      \
        return 1;                                                        \
    }
#define STR_KEY(k, field)                                                \
    if (strcmp(name, k) == 0)                                            \
        return replace_str(&(field), value) ? set_err(p, "%s%s", "out of memory", "") : 1;

/* ---- listen endpoints ------------------------------------------------- */

void conf_listen_free(struct conf_listen *l, size_t n)
{
    for (size_t i = 0; l && i < n; i++) {
        mem_free(l[i].host);
        mem_free(l[i].path);
    }
    mem_free(l);
}

/* One endpoint, tok (trimmed, NUL-terminated); 0 or CHAT_ERR_*. */
static int parse_endpoint(char *tok, struct conf_listen *e)
{
    static const char *const schemes[] = {"tcp", "tls", "ws", "wss"};
    char *rest = strstr(tok, "://"), *slash;
    int web;

    memset(e, 0, sizeof *e);
    snprintf(e->scheme, sizeof e->scheme, "tcp");
    if (rest) {
        size_t k;
        *rest = '\0';
        for (k = 0; k < sizeof schemes / sizeof schemes[0]; k++)
            if (strcmp(tok, schemes[k]) == 0)
                break;
        if (k == sizeof schemes / sizeof schemes[0])
            return CHAT_ERR_INVAL;
        snprintf(e->scheme, sizeof e->scheme, "%s", schemes[k]);
        tok = rest + 3;
    }
    web = e->scheme[0] == 'w';
    /* the path starts at the first '/' after the host ("[::1]" has none) */
    slash = strchr(tok[0] == '[' && strchr(tok, ']') ? strchr(tok, ']') : tok, '/');
    if (slash && !web)
        return CHAT_ERR_INVAL;
    if (web && !(e->path = mem_strdup(slash ? slash : "/")))
        return CHAT_ERR_NOMEM;
    if (slash)
        *slash = '\0';
    if (conf_parse_hostport(tok, &e->host, &e->port) || !conf_ip_ok(e->host)) {
        mem_free(e->host);
        mem_free(e->path);
        e->host = e->path = NULL;
        return CHAT_ERR_INVAL;
    }
    return CHAT_OK;
}

int conf_parse_listen(const char *v, struct conf_listen **out, size_t *n, char *bad,
                      size_t badlen)
{
    char *copy = mem_strdup(v), *tok, *next;
    struct conf_listen *l = NULL;
    size_t k = 0;
    int r = CHAT_OK;

    if (!copy)
        return CHAT_ERR_NOMEM;
    for (tok = copy; tok; tok = next) { /* an empty endpoint is an error */
        struct conf_listen *nl;
        char *end;
        if ((next = strchr(tok, ',')))
            *next++ = '\0';
        end = tok + strlen(tok);
        while (*tok == ' ' || *tok == '\t')
            tok++;
        while (end > tok && (end[-1] == ' ' || end[-1] == '\t'))
            *--end = '\0';
        if (!(nl = mem_realloc(l, (k + 1) * sizeof *l))) {
            r = CHAT_ERR_NOMEM;
            break;
        }
        l = nl;
        snprintf(bad, badlen, "%s", tok);
        if ((r = parse_endpoint(tok, &l[k])) != CHAT_OK)
            break;
        k++;
    }
    if (r == CHAT_OK && k == 0) {
        snprintf(bad, badlen, "%s", v);
        r = CHAT_ERR_INVAL;
    }
    mem_free(copy);
    if (r != CHAT_OK) {
        conf_listen_free(l, k);
        return r;
    }
    *out = l;
    *n = k;
    return CHAT_OK;
}

static int set_listen(struct parse_ctx *p, const char *value)
{
    struct conf *c = p->c;
    struct conf_listen *l;
    size_t n;
    char bad[128] = "";
    int r = conf_parse_listen(value, &l, &n, bad, sizeof bad);

    if (r == CHAT_ERR_NOMEM)
        return set_err(p, "%s%s", "out of memory", "");
    if (r)
        return set_err(p, "listen: expected IP:PORT or SCHEME://IP:PORT[/PATH] (scheme "
                       "tcp, tls, ws or wss; a numeric IPv4 or [IPv6] address; a path "
                       "only for ws and wss), got \"%s\"%s", bad, "");
    conf_listen_free(c->listens, c->nlistens);
    c->listens = l;
    c->nlistens = n;
    return 1;
}

/* ---- [server] proxy_protocol ------------------------------------------ */
/* "on": every connection to the client listener starts with a PROXY
 * header (v1 or v2) from an address in [server] trusted (net.c); "off"
 * (the default): none is expected.  One switch for the listener today; an
 * endpoint of the multi-endpoint listen syntax can carry it later. */
static int set_proxy_protocol(struct parse_ctx *p, const char *value)
{
    if (strcmp(value, "on") == 0)
        p->c->proxy_protocol = 1;
    else if (strcmp(value, "off") == 0)
        p->c->proxy_protocol = 0;
    else
        return set_err(p, "proxy_protocol: expected on or off, got \"%s\"%s", value, "");
    p->proxy_line = p->line;
    return 1;
}

/* on without a trusted list would refuse every connection. */
static int check_proxy_protocol(const struct parse_ctx *p, char *err, size_t errlen)
{
    if (!p->c->proxy_protocol || p->c->ntrusted)
        return 0;
    snprintf(err, errlen, "%s:%d: proxy_protocol = on needs [server] trusted "
             "(the addresses of the balancers that send the header)",
             p->c->path, p->proxy_line);
    return -1;
}

static int on_server(struct parse_ctx *p, const char *name, const char *value)
{
    struct conf *c = p->c;
    if (strcmp(name, "listen") == 0)
        return set_listen(p, value);
    if (strcmp(name, "log_level") == 0) {
        int l = log_parse_level(value);
        if (l < 0)
            return set_err(p, "log_level: \"%s\" is not error, warn, info or debug%s", value, "");
        c->log_level = l;
        return 1;
    }
    if (strcmp(name, "log_format") == 0) {
        int f = log_parse_format(value);
        if (f < 0)
            return set_err(p, "log_format: \"%s\" is not text or json%s", value, "");
        c->log_format = f;
        return 1;
    }
    if (strcmp(name, "log_file") == 0) {
        char *d = abs_path(c, value);
        if (!d)
            return set_err(p, "%s%s", "out of memory", "");
        mem_free(c->log_file);
        c->log_file = d;
        return 1;
    }
    INT_KEY("max_connections", 1, 10000000, c->max_connections)
    INT_KEY("max_frame", 64, 16777216, c->max_frame)
    if (strcmp(name, "trusted") == 0) {
        char bad[64] = "";
        int r = parse_trusted(c, value, bad, sizeof bad);
        if (r == CHAT_ERR_NOMEM)
            return set_err(p, "%s%s", "out of memory", "");
        if (r)
            return set_err(p, "trusted: \"%s\" is not an IP address or "
                           "ADDRESS/BITS network%s", bad, "");
        return 1;
    }
    INT_KEY("idle_timeout", 0, 86400 * 365, c->idle_timeout_s)
    INT_KEY("request_timeout", 0, 86400, c->request_timeout_s)
    INT_KEY("max_connections_per_addr", 0, 10000000, c->max_conns_per_addr)
    INT_KEY("max_unauth_per_addr", 0, 10000000, c->max_unauth_per_addr)
    INT_KEY("tcp_keepalive", 0, 86400, c->keepalive_idle_s)
    INT_KEY("tcp_keepalive_interval", 1, 3600, c->keepalive_intvl_s)
    INT_KEY("tcp_keepalive_count", 1, 127, c->keepalive_cnt)
    INT_KEY("tcp_user_timeout", 0, 86400, c->user_timeout_s)
    INT_KEY("max_output", 1024, 1073741824, c->max_output)
    INT_KEY("legacy_pace_ms", 0, 1000, c->legacy_pace_ms)
    INT_KEY("max_members", 8, JSON_SPAN_DUP_MAX, c->max_members)
    INT_KEY("login_part_timeout_ms", 1, 600000, c->login_part_timeout_ms)
    INT_KEY("login_ack_max", 1024, 16777216, c->login_ack_max)
    INT_KEY("threadpool", 1, 1024, c->threadpool_size)
    INT_KEY("worker_nice", 0, 19, c->worker_nice)
    INT_KEY("workers", 1, 256, c->workers)
    STR_KEY("node_id", c->node_id)
    if (strcmp(name, "proxy_protocol") == 0)
        return set_proxy_protocol(p, value);
    return set_err(p, "unknown key \"%s\" in [server]%s", name, "");
}

static int on_plugins(struct parse_ctx *p, const char *name, const char *value)
{
    struct conf *c = p->c;
    if (strcmp(name, "dir") == 0) {
        char *d = abs_path(c, value);
        if (!d)
            return set_err(p, "%s%s", "out of memory", "");
        mem_free(c->plugin_dir);
        c->plugin_dir = d;
        return 1;
    }
    if (strcmp(name, "enabled") == 0) {
        c->plugins_line = p->line;
        if (parse_list(c, value))
            return set_err(p, "%s%s", "out of memory", "");
        for (size_t i = 0; i < c->nplugins; i++) {
            const char *n = c->plugins[i];
            if (strspn(n, "abcdefghijklmnopqrstuvwxyz0123456789_-") != strlen(n))
                return set_err(p, "enabled: bad plugin name \"%s\"%s", n, "");
            for (size_t j = 0; j < i; j++)
                if (strcmp(c->plugins[j], n) == 0)
                    return set_err(p, "enabled: \"%s\" listed twice%s", n, "");
        }
        return 1;
    }
    return set_err(p, "unknown key \"%s\" in [plugins]%s", name, "");
}

static int on_mysql(struct parse_ctx *p, const char *name, const char *value)
{
    struct conf *c = p->c;
    STR_KEY("host", c->my_host)
    STR_KEY("user", c->my_user)
    STR_KEY("password", c->my_password)
    STR_KEY("database", c->my_database)
    INT_KEY("port", 1, 65535, c->my_port)
    INT_KEY("pool_size", 1, 256, c->my_pool_size)
    INT_KEY("queue_max", 1, 10000000, c->my_queue_max)
    INT_KEY("connect_timeout", 1, 3600, c->my_connect_timeout_s)
    if (strcmp(name, "socket") == 0 || strcmp(name, "migrations") == 0) {
        char *d = value[0] ? abs_path(c, value) : mem_strdup("");
        if (!d)
            return set_err(p, "%s%s", "out of memory", "");
        char **f = name[0] == 's' ? &c->my_socket : &c->sql_dir;
        mem_free(*f);
        *f = d;
        return 1;
    }
    return set_err(p, "unknown key \"%s\" in [mysql]%s", name, "");
}

static int on_redis(struct parse_ctx *p, const char *name, const char *value)
{
    struct conf *c = p->c;
    STR_KEY("host", c->rd_host)
    INT_KEY("port", 1, 65535, c->rd_port)
    INT_KEY("heartbeat_ttl", 1, 3600, c->rd_heartbeat_ttl_s)
    return set_err(p, "unknown key \"%s\" in [redis]%s", name, "");
}

static int on_admin(struct parse_ctx *p, const char *name, const char *value)
{
    struct conf *c = p->c;
    if (strcmp(name, "listen") == 0) {
        char *h = NULL;
        int port;
        if (strcmp(value, "off") == 0) {
            c->admin_port = 0;
            return 1;
        }
        if (conf_parse_hostport(value, &h, &port) || !conf_ip_ok(h)) {
            mem_free(h);
            return set_err(p, "listen: expected IP:PORT or off, got \"%s\"%s",
                           value, "");
        }
        mem_free(c->admin_host);
        c->admin_host = h;
        c->admin_port = port;
        return 1;
    }
    STR_KEY("token", c->admin_token)
    return set_err(p, "unknown key \"%s\" in [admin]%s", name, "");
}

static struct conf_section *get_section(struct conf *c, const char *name)
{
    struct conf_section *s;
    for (size_t i = 0; i < c->nsections; i++)
        if (strcmp(c->sections[i].name, name) == 0)
            return &c->sections[i];
    s = mem_realloc(c->sections, (c->nsections + 1) * sizeof *s);
    if (!s)
        return NULL;
    c->sections = s;
    s = &c->sections[c->nsections];
    memset(s, 0, sizeof *s);
    if (!(s->name = mem_strdup(name)))
        return NULL;
    c->nsections++;
    return s;
}

static int on_plugin_section(struct parse_ctx *p, const char *plugin,
                             const char *name, const char *value)
{
    struct conf_section *s = get_section(p->c, plugin);
    struct conf_kv *kv;
    if (!s)
        return set_err(p, "%s%s", "out of memory", "");
    if (!name) /* section header only */
        return 1;
    kv = mem_realloc(s->kv, (s->nkv + 1) * sizeof *kv);
    if (!kv)
        return set_err(p, "%s%s", "out of memory", "");
    s->kv = kv;
    kv = &s->kv[s->nkv];
    kv->key = mem_strdup(name);
    kv->val = mem_strdup(value);
    kv->line = p->line;
    if (!kv->key || !kv->val) {
        mem_free(kv->key);
        mem_free(kv->val);
        return set_err(p, "%s%s", "out of memory", "");
    }
    s->nkv++;
    return 1;
}

/* [limits]: rates parsed by ratelimit.c (docs/operations.md). */
static int on_limits(struct parse_ctx *p, const char *name, const char *value)
{
    struct rl_conf *l = &p->c->limits;
    struct { const char *key; struct rl_rate *r; } keys[] = {
        {"session_msgs", &l->session_msgs}, {"session_bytes", &l->session_bytes},
        {"user_msgs", &l->user_msgs}, {"addr_conns", &l->addr_conns},
        {"addr_regs", &l->addr_regs}, {"addr_login_failures", &l->addr_fails}};
    struct rl_class cl;
    size_t i;

    for (i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (strcmp(name, keys[i].key) == 0) {
            if (rl_parse_rate(value, keys[i].r))
                return set_err(p, "%s: expected RATE/s|m|h [burst N] or off, got \"%s\"",
                               name, value);
            return 1;
        }
    if (strncmp(name, "class.", 6) != 0)
        return set_err(p, "unknown key \"%s\" in [limits]%s", name, "");
    if (rl_parse_class(name + 6, value, &cl))
        return set_err(p, "%s: expected MSGID[,MSGID...] RATE/s|m|h [burst N] (a name "
                       "of a-z0-9_), got \"%s\"", name, value);
    for (i = 0; i < l->ncls && strcmp(l->cls[i].name, cl.name); i++)
        ;
    if (i == RL_CLASS_MAX)
        return set_err(p, "%s: more than 8 classes%s", name, "");
    l->cls[i] = cl;
    if (i == l->ncls)
        l->ncls++;
    return 1;
}

/* ---- [ws] ---------------------------------------------------------------- */

/* An origin as browsers send it: http(s)://host[:port], no path. */
static int ws_origin_ok(const char *o)
{
    const char *h = strncmp(o, "https://", 8) == 0 ? o + 8
                    : strncmp(o, "http://", 7) == 0 ? o + 7 : NULL;
    return h && *h && !strchr(h, '/');
}

/* "origins": origins separated by commas or blanks; replaces the list. */
static int ws_parse_origins(struct conf *c, const char *v, char *bad, size_t badlen)
{
    char *copy = mem_strdup(v), *tok, *save = NULL;
    int r = CHAT_OK;

    if (!copy)
        return CHAT_ERR_NOMEM;
    for (size_t i = 0; i < c->nws_origins; i++)
        mem_free(c->ws_origins[i]);
    c->nws_origins = 0;
    for (tok = strtok_r(copy, ", \t", &save); tok; tok = strtok_r(NULL, ", \t", &save)) {
        char **o = mem_realloc(c->ws_origins, (c->nws_origins + 1) * sizeof *o);
        if (!o) {
            r = CHAT_ERR_NOMEM;
            break;
        }
        c->ws_origins = o;
        if (!ws_origin_ok(tok)) {
            snprintf(bad, badlen, "%s", tok);
            r = CHAT_ERR_INVAL;
            break;
        }
        if (!(o[c->nws_origins] = mem_strdup(tok))) {
            r = CHAT_ERR_NOMEM;
            break;
        }
        c->nws_origins++;
    }
    mem_free(copy);
    return r;
}

static int on_ws(struct parse_ctx *p, const char *name, const char *value)
{
    struct conf *c = p->c;
    if (strcmp(name, "origins") == 0) {
        char bad[128] = "";
        int r = ws_parse_origins(c, value, bad, sizeof bad);
        if (r == CHAT_ERR_NOMEM)
            return set_err(p, "%s%s", "out of memory", "");
        if (r)
            return set_err(p, "origins: \"%s\" is not http://HOST[:PORT] or "
                           "https://HOST[:PORT]%s", bad, "");
        return 1;
    }
    if (strcmp(name, "max_message") == 0)
        p->ws_max_message_set = 1;
    INT_KEY("max_message", 64, 16777216, c->ws_max_message)
    INT_KEY("ping_interval", 0, 86400, c->ws_ping_interval_s)
    INT_KEY("pong_timeout", 1, 3600, c->ws_pong_timeout_s)
    INT_KEY("handshake_timeout", 1, 3600, c->ws_handshake_timeout_s)
    return set_err(p, "unknown key \"%s\" in [ws]%s", name, "");
}

/* [tls]: the certificate and key of the tls (and wss) endpoints. */
static int on_tls(struct parse_ctx *p, const char *name, const char *value)
{
    struct conf *c = p->c;
    char **file = strcmp(name, "cert") == 0  ? &c->tls_cert
                  : strcmp(name, "key") == 0 ? &c->tls_key
                  : strcmp(name, "ca") == 0  ? &c->tls_ca
                                             : NULL;
    if (file) {
        char *d = abs_path(c, value);
        if (!d)
            return set_err(p, "%s%s", "out of memory", "");
        mem_free(*file);
        *file = d;
        return 1;
    }
    if (strcmp(name, "min_version") == 0) {
        if (strcmp(value, "1.2") && strcmp(value, "1.3"))
            return set_err(p, "min_version: \"%s\" is not 1.2 or 1.3%s", value, "");
        c->tls_min_version = value[2] == '3' ? 0x0304 : 0x0303;
        return 1;
    }
    STR_KEY("ciphers", c->tls_ciphers)
    STR_KEY("groups", c->tls_groups)
    INT_KEY("handshake_timeout", 1, 3600, c->tls_handshake_timeout_s)
    return set_err(p, "unknown key \"%s\" in [tls]%s", name, "");
}

/* tls and wss endpoints need [tls] cert and key. */
static int check_tls(const struct conf *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < c->nlistens; i++) {
        const char *sch = c->listens[i].scheme;
        if ((strcmp(sch, "tls") == 0 || strcmp(sch, "wss") == 0) &&
            (!c->tls_cert[0] || !c->tls_key[0])) {
            snprintf(err, errlen, "listen: %s://%s:%d needs [tls] cert and key", sch,
                     c->listens[i].host, c->listens[i].port);
            return -1;
        }
    }
    return 0;
}

/* ---- [web] (webfiles.c) ---------------------------------------------------- */

/* root: a folder, relative to the config file's; "" (the default) is off. */
static int on_web(struct parse_ctx *p, const char *name, const char *value)
{
    struct conf *c = p->c;
    if (strcmp(name, "root") == 0) {
        char *d = abs_path(c, value);
        if (!d)
            return set_err(p, "%s%s", "out of memory", "");
        mem_free(c->web_root);
        c->web_root = d;
        return 1;
    }
    INT_KEY("max_bytes", 1024, 268435456, c->web_max_bytes)
    INT_KEY("max_files", 1, 100000, c->web_max_files)
    return set_err(p, "unknown key \"%s\" in [web]%s", name, "");
}

/* inih handler.  inih (as Debian builds it) does not pass the line number,
 * so on_line() counts lines through a reader callback. */
static int on_entry(void *user, const char *section, const char *name,
                    const char *value)
{
    struct parse_ctx *p = user;
    int ok;
    if (strcmp(section, "server") == 0)
        ok = name ? on_server(p, name, value) : 1;
    else if (strcmp(section, "plugins") == 0)
        ok = name ? on_plugins(p, name, value) : 1;
    else if (strcmp(section, "mysql") == 0) {
        p->seen_mysql = 1;
        ok = name ? on_mysql(p, name, value) : 1;
    } else if (strcmp(section, "redis") == 0) {
        p->seen_redis = 1;
        ok = name ? on_redis(p, name, value) : 1;
    } else if (strcmp(section, "admin") == 0)
        ok = name ? on_admin(p, name, value) : 1;
    else if (strcmp(section, "limits") == 0)
        ok = name ? on_limits(p, name, value) : 1;
    else if (strcmp(section, "ws") == 0)
        ok = name ? on_ws(p, name, value) : 1;
    else if (strcmp(section, "tls") == 0)
        ok = name ? on_tls(p, name, value) : 1;
    else if (strcmp(section, "web") == 0)
        ok = name ? on_web(p, name, value) : 1;
    else if (strncmp(section, "plugin.", 7) == 0 && section[7])
        ok = on_plugin_section(p, section + 7, name, value);
    else
        ok = set_err(p, "unknown section [%s]%s", section, "");
    if (!ok && !p->err_line)
        p->err_line = p->line;
    return ok;
}

struct line_reader {
    FILE *f;
    struct parse_ctx *p;
};

/* A section header is checked here, because inih reports a section only
 * through its keys: an empty unknown section would pass unseen. */
static void check_header(struct parse_ctx *p, const char *s)
{
    const char *end;
    char name[128];
    size_t n;
    while (*s == ' ' || *s == '\t')
        s++;
    if (*s != '[' || !(end = strchr(s, ']')))
        return;
    n = (size_t)(end - s - 1);
    if (n >= sizeof name)
        n = sizeof name - 1;
    memcpy(name, s + 1, n);
    name[n] = '\0';
    if (strcmp(name, "mysql") == 0)
        p->seen_mysql = 1;
    else if (strcmp(name, "redis") == 0)
        p->seen_redis = 1;
    else if (strncmp(name, "plugin.", 7) == 0 && name[7])
        get_section(p->c, name + 7);
    else if (strcmp(name, "server") && strcmp(name, "plugins") &&
             strcmp(name, "admin") && strcmp(name, "limits") &&
             strcmp(name, "ws") && strcmp(name, "tls") &&
             strcmp(name, "web")) {
        set_err(p, "unknown section [%s]%s", name, "");
        if (!p->err_line)
            p->err_line = p->line;
    }
}

static char *read_line(char *buf, int size, void *stream)
{
    struct line_reader *r = stream;
    char *s = fgets(buf, size, r->f);
    if (s) {
        r->p->line++;
        check_header(r->p, s);
    }
    return s;
}

static void set_defaults(struct conf *c)
{
    c->listen_port = 6000;
    c->log_level = CHAT_LOG_INFO;
    c->log_format = LOG_FORMAT_TEXT;
    c->max_connections = 19500;
    c->max_frame = 65536;
    c->idle_timeout_s = 600;
    c->request_timeout_s = 30;
    c->max_conns_per_addr = 512;
    c->max_unauth_per_addr = 64;
    c->keepalive_idle_s = 60;
    c->keepalive_intvl_s = 10;
    c->keepalive_cnt = 6;
    c->user_timeout_s = 120;
    c->max_output = 4u << 20;
    c->legacy_pace_ms = 20;
    c->max_members = DISP_MAX_MEMBERS_DEF;
    c->login_part_timeout_ms = 2000;
    c->login_ack_max = 65536;
    c->threadpool_size = 4;
    c->worker_nice = 10;
    c->workers = 1;
    c->my_port = 3306;
    c->my_pool_size = 4;
    c->my_queue_max = 10000;
    c->my_connect_timeout_s = 2;
    c->rd_port = 6379;
    c->rd_heartbeat_ttl_s = 10;
    c->admin_port = 6080;
    c->ws_ping_interval_s = 30;
    c->ws_pong_timeout_s = 10;
    c->ws_handshake_timeout_s = 10;
    c->tls_min_version = 0x0303;
    c->tls_handshake_timeout_s = 10;
    c->web_max_bytes = 16u << 20;
    c->web_max_files = 1024;
}

static int fill_missing(struct conf *c)
{
    char **strs[] = {&c->listen_host, &c->node_id, &c->my_host, &c->my_user,
                     &c->my_password, &c->my_database, &c->my_socket, &c->rd_host,
                     &c->admin_host, &c->admin_token, &c->log_file,
                     &c->tls_cert, &c->tls_key, &c->tls_ca, &c->tls_ciphers,
                     &c->tls_groups, &c->web_root};
    /* ciphers (TLS 1.2; 1.3 keeps OpenSSL's suites): forward secret AEADs */
    const char *defs[] = {"127.0.0.1", "", "127.0.0.1", "chat", "", "chat", "",
                          "127.0.0.1", "127.0.0.1", "", "", "", "", "",
                          "ECDHE+AESGCM:ECDHE+CHACHA20", "X25519:P-256:P-384", ""};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
        if (!*strs[i] && !(*strs[i] = mem_strdup(defs[i])))
            return -1;
    if (!c->listens) {
        char bad[8];
        if (conf_parse_listen("127.0.0.1:6000", &c->listens, &c->nlistens, bad,
                              sizeof bad))
            return -1;
    }
    mem_free(c->listen_host);
    if (!(c->listen_host = mem_strdup(c->listens[0].host)))
        return -1;
    c->listen_port = c->listens[0].port;
    if (!c->plugin_dir && !(c->plugin_dir = abs_path(c, "plugins")))
        return -1;
    if (!c->sql_dir && !(c->sql_dir = abs_path(c, "../sql")))
        return -1;
    return 0;
}

struct conf *conf_load(const char *path, char *err, size_t errlen)
{
    struct parse_ctx p;
    struct line_reader r;
    struct conf *c;
    const char *slash;
    int rc;

    memset(&p, 0, sizeof p);
    c = mem_calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    p.c = c;
    set_defaults(c);
    rl_conf_defaults(&c->limits);
    c->path = mem_strdup(path);
    slash = strrchr(path, '/');
    if (!slash)
        c->dir = mem_strdup(".");
    else /* "/chat.conf" lives in "/" */
        c->dir = mem_strndup(path, slash == path ? 1 : (size_t)(slash - path));
    if (!c->path || !c->dir)
        goto nomem;
    r.f = fopen(path, "r");
    r.p = &p;
    if (!r.f) {
        snprintf(err, errlen, "%s:0: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    rc = ini_parse_stream(read_line, &r, on_entry, &p);
    fclose(r.f);
    if (rc != 0 || p.err[0]) {
        int line = p.err_line ? p.err_line : rc;
        snprintf(err, errlen, "%s:%d: %s", path, line,
                 p.err[0] ? p.err : "syntax error");
        goto fail;
    }
    if (check_proxy_protocol(&p, err, errlen))
        goto fail;
    if (!p.ws_max_message_set)
        c->ws_max_message = c->max_frame;
    c->have_mysql = p.seen_mysql;
    c->have_redis = p.seen_redis;
    if (fill_missing(c))
        goto nomem;
    if (check_tls(c, p.err, sizeof p.err)) {
        snprintf(err, errlen, "%s: %s", path, p.err);
        goto fail;
    }
    return c;
nomem:
    snprintf(err, errlen, "%s: out of memory", path);
fail:
    conf_free(c);
    return NULL;
}

void conf_free(struct conf *c)
{
    if (!c)
        return;
    char *strs[] = {c->path, c->dir, c->listen_host, c->node_id, c->plugin_dir,
                    c->my_host, c->my_user, c->my_password, c->my_database,
                    c->my_socket, c->sql_dir, c->rd_host, c->admin_host,
                    c->admin_token, c->log_file, c->tls_cert, c->tls_key,
                    c->tls_ca, c->tls_ciphers, c->tls_groups, c->web_root};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++)
        mem_free(strs[i]);
    conf_listen_free(c->listens, c->nlistens);
    for (size_t i = 0; i < c->nplugins; i++)
        mem_free(c->plugins[i]);
    mem_free(c->plugins);
    mem_free(c->trusted);
    for (size_t i = 0; i < c->nws_origins; i++)
        mem_free(c->ws_origins[i]);
    mem_free(c->ws_origins);
    for (size_t i = 0; i < c->nsections; i++) {
        for (size_t j = 0; j < c->sections[i].nkv; j++) {
            mem_free(c->sections[i].kv[j].key);
            mem_free(c->sections[i].kv[j].val);
        }
        mem_free(c->sections[i].kv);
        mem_free(c->sections[i].name);
    }
    mem_free(c->sections);
    mem_free(c);
}

const struct conf_section *conf_section(const struct conf *c, const char *plugin)
{
    for (size_t i = 0; i < c->nsections; i++)
        if (strcmp(c->sections[i].name, plugin) == 0)
            return &c->sections[i];
    return NULL;
}

const char *conf_section_get(const struct conf_section *sec, const char *key)
{
    if (!sec)
        return NULL;
    /* the last assignment wins, as in the other sections */
    for (size_t i = sec->nkv; i-- > 0;)
        if (strcmp(sec->kv[i].key, key) == 0)
            return sec->kv[i].val;
    return NULL;
}

int conf_parse_hostport(const char *s, char **host, int *port)
{
    const char *colon, *h = s;
    size_t hl;
    long long pn;

    if (s[0] == '[') {
        const char *rb = strchr(s, ']');
        if (!rb || rb[1] != ':')
            return CHAT_ERR_INVAL;
        h = s + 1;
        hl = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = strrchr(s, ':');
        if (!colon)
            return CHAT_ERR_INVAL;
        hl = (size_t)(colon - s);
    }
    if (hl == 0 || parse_int(colon + 1, 1, 65535, &pn))
        return CHAT_ERR_INVAL;
    if (!(*host = mem_strndup(h, hl)))
        return CHAT_ERR_NOMEM;
    *port = (int)pn;
    return CHAT_OK;
}
