/*
 * test_jsonstr.c - CUnit tests of the NUL-safe JSON string helpers
 * (core/jsonstr.c).
 *
 * Besides hand-written cases, the tests cross-check against cJSON, the
 * parser the core validates frames with: random literals must be accepted
 * or refused by both and decode to the same bytes (up to cJSON's NUL cut),
 * and json_member_raw must find the value cJSON_GetObjectItemCaseSensitive
 * finds in random objects.  Random data comes from a fixed seed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <CUnit/Basic.h>

#include "core.h"

static unsigned long long rng_state = 88172645463325252ULL;

static unsigned rnd(unsigned n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (unsigned)(rng_state % n);
}

/* Unescape a NUL-terminated literal; compare with exp[0..explen). */
static int unesc_is(const char *lit, const char *exp, size_t explen)
{
    size_t n = 999;
    char *s = json_unescape(lit, strlen(lit), &n);
    int ok = s != NULL && n == explen && memcmp(s, exp, n) == 0 && s[n] == '\0';

    mem_free(s);
    return ok;
}

static int unesc_fails(const char *lit, size_t len)
{
    char *s = json_unescape(lit, len, NULL);

    mem_free(s);
    return s == NULL;
}

static void test_unescape_escapes(void)
{
    CU_ASSERT_TRUE(unesc_is("\"\"", "", 0));
    CU_ASSERT_TRUE(unesc_is("\"abc\"", "abc", 3));
    CU_ASSERT_TRUE(unesc_is("\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\/\b\f\n\r\t", 8));
    CU_ASSERT_TRUE(unesc_is("\"\\u0041\\u00e9\\u20AC\"", "A\xc3\xa9\xe2\x82\xac", 6));
    CU_ASSERT_TRUE(unesc_is("\"\\ud83d\\ude00\"", "\xf0\x9f\x98\x80", 4));
    CU_ASSERT_TRUE(unesc_is("\"\\uDBFF\\uDFFF\"", "\xf4\x8f\xbf\xbf", 4));
    CU_ASSERT_TRUE(unesc_is("\"a\\u0000b\"", "a\0b", 3));
    CU_ASSERT_TRUE(unesc_is("\"\\u07ff\\u0800\\uffff\"", "\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf", 8));
    /* raw bytes are taken as they are, as cJSON does */
    CU_ASSERT_TRUE(unesc_is("\"\x01\x7f\xff\"", "\x01\x7f\xff", 3));
    /* a raw NUL inside (length given explicitly) */
    {
        size_t n;
        char *s = json_unescape("\"a\0b\"", 5, &n);
        CU_ASSERT_PTR_NOT_NULL_FATAL(s);
        CU_ASSERT_EQUAL(n, 3);
        CU_ASSERT_EQUAL(memcmp(s, "a\0b", 3), 0);
        mem_free(s);
    }
}

static void test_unescape_rejects(void)
{
    static const char *bad[] = {
        "", "\"", "abc", "\"abc", "abc\"", "'a'",
        "\"a\"b\"",            /* unescaped quote inside */
        "\"\\\"",              /* the closing quote is escaped */
        "\"\\x41\"", "\"\\U0041\"", "\"\\'\"", "\"\\0\"",
        /* bad hex digits (cJSON 1.7.15 reads \u12G4 as \u0000) */
        "\"\\u12\"", "\"\\u12G4\"", "\"\\u\"", "\"\\u-123\"", "\"\\u 123\"",
        "\"\\ud800\"",         /* lone high surrogate */
        "\"\\udc00\"",         /* lone low surrogate */
        "\"\\udc00\\ud800\"",  /* reversed pair */
        "\"\\ud800\\u0041\"",  /* high + non-surrogate */
        "\"\\ud800\\ud800\"",
        "\"\\ud800x\\udc00\"",
        "\"\\ud800\\udc0\"",
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (!unesc_fails(bad[i], strlen(bad[i])))
            CU_FAIL(bad[i]);
    }
    /* the length is what counts, not a NUL */
    CU_ASSERT_TRUE(unesc_fails("\"ab\"", 3));
}

static int quote_is(const char *s, size_t len, const char *exp)
{
    size_t n = 999;
    char *q = json_quote(s, len, &n);
    int ok = q != NULL && n == strlen(exp) && strcmp(q, exp) == 0;

    mem_free(q);
    return ok;
}

static void test_quote_forms(void)
{
    CU_ASSERT_TRUE(quote_is("", 0, "\"\""));
    CU_ASSERT_TRUE(quote_is("abc", 3, "\"abc\""));
    CU_ASSERT_TRUE(quote_is("\"\\/", 3, "\"\\\"\\\\/\""));
    CU_ASSERT_TRUE(quote_is("\n\r\t\b\f", 5, "\"\\n\\r\\t\\b\\f\""));
    CU_ASSERT_TRUE(quote_is("\0\x01\x1f\x7f", 4, "\"\\u0000\\u0001\\u001f\\u007f\""));
    CU_ASSERT_TRUE(quote_is("\xc3\xa9\xf0\x9f\x98\x80\xff", 7,
                            "\"\xc3\xa9\xf0\x9f\x98\x80\xff\""));
    CU_ASSERT_TRUE(quote_is(" ~", 2, "\" ~\""));
}

/* Random bytes: NULs, controls, ASCII, quotes, backslashes, 2- and 4-byte
 * UTF-8 and stray high bytes. */
static size_t random_bytes(char *b, size_t max)
{
    size_t n = 0, want = rnd((unsigned)max);

    while (n + 4 <= want) {
        switch (rnd(8)) {
        case 0: b[n++] = '\0'; break;
        case 1: b[n++] = (char)rnd(0x20); break;
        case 2: b[n++] = rnd(2) ? '"' : '\\'; break;
        case 3: b[n++] = (char)0x7f; break;
        case 4:
            memcpy(b + n, "\xf0\x9f\x98\x80", 4);
            b[n + 3] = (char)(0x80 + rnd(64));
            n += 4;
            break;
        case 5: memcpy(b + n, "\xc3\xa9", 2); n += 2; break;
        case 6: b[n++] = (char)(0x80 + rnd(128)); break;
        default: b[n++] = (char)(0x20 + rnd(0x5f)); break;
        }
    }
    return n;
}

static void test_roundtrip_random(void)
{
    char b[256];
    size_t bad = 0, bad_cjson = 0;

    for (int iter = 0; iter < 20000; iter++) {
        size_t n = random_bytes(b, sizeof(b)), ql, ul;
        char *q = json_quote(b, n, &ql), *u;
        cJSON *j;
        const char *endp = NULL;

        if (q == NULL) {
            bad++;
            continue;
        }
        for (size_t i = 0; i < ql; i++)
            bad += ((unsigned char)q[i] < 0x20 || q[i] == 0x7f);
        u = json_unescape(q, ql, &ul);
        bad += u == NULL || ul != n || memcmp(u, b, n) != 0;
        /* cJSON reads the same literal up to its first NUL */
        j = cJSON_ParseWithLengthOpts(q, ql, &endp, 0);
        if (j == NULL || !cJSON_IsString(j) || endp != q + ql ||
            strncmp(j->valuestring, b, strnlen(b, n)) != 0 ||
            strlen(j->valuestring) != strnlen(b, n))
            bad_cjson++;
        cJSON_Delete(j);
        mem_free(u);
        mem_free(q);
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_EQUAL(bad_cjson, 0);
}

/* Random literal text, valid or not, to compare with cJSON. */
static size_t random_literal(char *b)
{
    size_t n = 0, parts = rnd(12);

    b[n++] = '"';
    for (size_t i = 0; i < parts; i++) {
        switch (rnd(10)) {
        case 0: n += (size_t)sprintf(b + n, "\\u%04x", rnd(0x10000)); break;
        case 1:
            n += (size_t)sprintf(b + n, "\\u%04X\\u%04x", 0xD800 + rnd(0x400),
                                 0xDC00 + rnd(0x400));
            break;
        case 2: n += (size_t)sprintf(b + n, "\\u%04x", 0xD800 + rnd(0x800)); break;
        case 3: b[n++] = '\\'; b[n++] = "\"\\/bfnrtux0'"[rnd(12)]; break;
        case 4: b[n++] = (char)(0x80 + rnd(128)); break;
        case 5: b[n++] = (char)(1 + rnd(0x1f)); break;
        case 6: n += (size_t)sprintf(b + n, "\\u%04x", rnd(0x80)); break;
        default: b[n++] = (char)('a' + rnd(26)); break;
        }
    }
    b[n++] = '"';
    b[n] = '\0';
    return n;
}

/* Has the literal a \u escape whose 4 hex digits are not all hex? */
static int bad_u_hex(const char *lit, size_t n)
{
    for (size_t i = 1; i + 1 < n; i++) {
        if (lit[i] != '\\')
            continue;
        if (lit[i + 1] == 'u') {
            for (size_t k = i + 2; k < i + 6; k++)
                if (k >= n - 1 || !strchr("0123456789abcdefABCDEF", lit[k]) || !lit[k])
                    return 1;
        }
        i++;
    }
    return 0;
}

static void test_unescape_agrees_with_cjson(void)
{
    char lit[256];
    size_t disagree = 0, valid = 0;

    for (int iter = 0; iter < 50000; iter++) {
        size_t n = random_literal(lit), ul = 0;
        const char *endp = NULL;
        cJSON *j = cJSON_ParseWithLengthOpts(lit, n, &endp, 0);
        char *u = json_unescape(lit, n, &ul);
        int cj_ok = j != NULL && cJSON_IsString(j) && endp == lit + n;

        if (bad_u_hex(lit, n)) {
            /* cJSON takes these as \u0000; we refuse them */
            if (u != NULL)
                disagree++;
        } else if (cj_ok != (u != NULL))
            disagree++;
        else if (u != NULL) {
            valid++;
            if (strlen(j->valuestring) != strnlen(u, ul) ||
                memcmp(j->valuestring, u, strlen(j->valuestring)) != 0)
                disagree++;
        }
        cJSON_Delete(j);
        mem_free(u);
    }
    CU_ASSERT_EQUAL(disagree, 0);
    CU_ASSERT_TRUE(valid > 1000);   /* the generator makes both kinds */
    CU_ASSERT_TRUE(valid < 49000);
}

/* The raw value of key in the NUL-terminated obj equals exp. */
static int member_is(const char *obj, const char *key, const char *exp)
{
    size_t vlen = 0;
    const char *v = json_member_raw(obj, strlen(obj), key, &vlen);

    if (exp == NULL)
        return v == NULL;
    return v != NULL && vlen == strlen(exp) && memcmp(v, exp, vlen) == 0;
}

static void test_member_lookup(void)
{
    static const char o[] =
        "{\"msgid\":6,\"nested\":{\"msg\":\"inner\",\"id\":[1,{\"id\":2}]},"
        "\"s\":\"\\\"id\\\":3,\\\\\",\"arr\":[\"}\",{\"x\":\"]\"}],"
        "\"id\":-12.5e3,\"msg\":\"he\\u0000llo {}\",\"t\":true,\"f\":false,"
        "\"n\":null,\"o\":{},\"a\":[]}";

    CU_ASSERT_TRUE(member_is(o, "msgid", "6"));
    CU_ASSERT_TRUE(member_is(o, "id", "-12.5e3"));      /* not the nested ones */
    CU_ASSERT_TRUE(member_is(o, "msg", "\"he\\u0000llo {}\""));
    CU_ASSERT_TRUE(member_is(o, "nested",
                             "{\"msg\":\"inner\",\"id\":[1,{\"id\":2}]}"));
    CU_ASSERT_TRUE(member_is(o, "arr", "[\"}\",{\"x\":\"]\"}]"));
    CU_ASSERT_TRUE(member_is(o, "s", "\"\\\"id\\\":3,\\\\\""));
    CU_ASSERT_TRUE(member_is(o, "t", "true"));
    CU_ASSERT_TRUE(member_is(o, "f", "false"));
    CU_ASSERT_TRUE(member_is(o, "n", "null"));
    CU_ASSERT_TRUE(member_is(o, "o", "{}"));
    CU_ASSERT_TRUE(member_is(o, "a", "[]"));
    CU_ASSERT_TRUE(member_is(o, "x", NULL));
    CU_ASSERT_TRUE(member_is(o, "", NULL));
    CU_ASSERT_TRUE(member_is(o, "ms", NULL));
    CU_ASSERT_TRUE(member_is(o, "msgidx", NULL));
    CU_ASSERT_TRUE(member_is("{}", "a", NULL));
    CU_ASSERT_TRUE(member_is(" { } ", "a", NULL));
    CU_ASSERT_TRUE(member_is("[1]", "a", NULL));
}

static void test_member_keys_and_whitespace(void)
{
    /* escaped key spellings match */
    CU_ASSERT_TRUE(member_is("{\"m\\u0073g\":1}", "msg", "1"));
    CU_ASSERT_TRUE(member_is("{\"\\u00e9\":1}", "\xc3\xa9", "1"));
    CU_ASSERT_TRUE(member_is("{\"a\\\"b\":2}", "a\"b", "2"));
    CU_ASSERT_TRUE(member_is("{\"\\ud83d\\ude00\":3}", "\xf0\x9f\x98\x80", "3"));
    /* a key with an embedded NUL is not the shorter key */
    CU_ASSERT_TRUE(member_is("{\"msg\\u0000x\":1,\"msg\":2}", "msg", "2"));
    CU_ASSERT_TRUE(member_is("{\"ms\":1}", "msg", NULL));
    /* the first occurrence wins, as in cJSON_GetObjectItemCaseSensitive */
    CU_ASSERT_TRUE(member_is("{\"a\":1,\"a\":2}", "a", "1"));
    CU_ASSERT_TRUE(member_is("{\"\\u0061\":1,\"a\":2}", "a", "1"));
    /* case-sensitive */
    CU_ASSERT_TRUE(member_is("{\"A\":1}", "a", NULL));
    /* whitespace is any byte <= 0x20, as in cJSON */
    CU_ASSERT_TRUE(member_is("\n{ \"a\" \t:\r\n 5 , \"b\"\x01:\x02\"x\"\x03}", "b", "\"x\""));
    CU_ASSERT_TRUE(member_is("{\"a\":1 ,\"b\":[1, 2]}", "b", "[1, 2]"));
}

static void test_member_truncated_stays_inside(void)
{
    static const char o[] = "{\"a\":{\"b\":[1,\"}\\\"\"]},\"c\":\"\\u0041\",\"d\":12}";
    size_t n = sizeof(o) - 1, bad = 0;
    static const char *keys[] = {"a", "c", "d", "zz"};

    for (size_t len = 0; len <= n; len++) {
        char *buf = malloc(len ? len : 1);
        memcpy(buf, o, len);
        for (size_t k = 0; k < 4; k++) {
            size_t vlen = 0;
            const char *v = json_member_raw(buf, len, keys[k], &vlen);
            if (v != NULL && (v < buf || v + vlen > buf + len || vlen == 0))
                bad++;
        }
        free(buf);
    }
    CU_ASSERT_EQUAL(bad, 0);
    /* the full text finds everything */
    CU_ASSERT_TRUE(member_is(o, "d", "12"));
    CU_ASSERT_TRUE(member_is(o, "c", "\"\\u0041\""));
}

static cJSON *random_value(int depth);

static cJSON *random_object(int depth)
{
    static const char *keys[] = {"msgid", "id", "msg", "a", "m\"g", "\xc3\xa9", "x y"};
    cJSON *o = cJSON_CreateObject();
    unsigned n = rnd(6);

    for (unsigned i = 0; i < n; i++)
        cJSON_AddItemToObject(o, keys[rnd(7)], random_value(depth + 1));
    return o;
}

static cJSON *random_value(int depth)
{
    char b[64];
    size_t n;

    switch (rnd(depth > 3 ? 4 : 6)) {
    case 0: return cJSON_CreateNumber((double)(int)rnd(100000) - 500.25);
    case 1:
        n = random_bytes(b, sizeof(b) - 1);
        b[n] = '\0';   /* cJSON strings end at the first NUL anyway */
        return cJSON_CreateString(b);
    case 2: return cJSON_CreateBool(rnd(2));
    case 3: return cJSON_CreateNull();
    case 4: {
        cJSON *a = cJSON_CreateArray();
        unsigned k = rnd(4);
        for (unsigned i = 0; i < k; i++)
            cJSON_AddItemToArray(a, random_value(depth + 1));
        return a;
    }
    default: return random_object(depth);
    }
}

/* cJSON_Compare looks members up by name, so it is wrong on duplicate keys:
 * compare the printed forms instead. */
static int same_json(const cJSON *a, const cJSON *b)
{
    char *x = cJSON_PrintUnformatted(a), *y = cJSON_PrintUnformatted(b);
    int same = x != NULL && y != NULL && strcmp(x, y) == 0;

    free(x);
    free(y);
    return same;
}

static void test_scan_object(void)
{
    struct json_span m[4];
    static const char *bad[] = {
        "", "[]", "{", "{\"a\":}", "{\"a\":1,}", "{\"a\":01}", "{\"a\":-}",
        "{\"a\":1.}", "{\"a\":tru}", "{\"a\":\"x\ty\"}", /* raw tab in string */
        "{\"a\":\"\\q\"}", "{\"a\":\"\\u12g4\"}", "{\"a\":1} x", "{a:1}",
        "{\"a\" 1}", "{\"a\":[1,]}", "{\"a\":\"unterminated}",
    };
    const char *ok = "  {\"msgid\":6, \"id\":-1.5e3,\"n\\u0061me\":\"a\\\"b\","
                     "\"x\":[{},[],null,true,false],\"y\":{\"z\":0}}\n\0\0";
    char deep[300];
    long n;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (json_scan_object(bad[i], strlen(bad[i]), m, 4) != -1)
            fprintf(stderr, "\n  accepted: %s\n", bad[i]);
        CU_ASSERT_EQUAL(json_scan_object(bad[i], strlen(bad[i]), m, 4), -1);
    }
    n = json_scan_object(ok, strlen(ok) + 2, m, 4);
    CU_ASSERT_EQUAL(n, 5); /* five members, four recorded */
    CU_ASSERT(m[0].klen == 5 && !memcmp(m[0].key, "msgid", 5));
    CU_ASSERT(m[0].vlen == 1 && m[0].val[0] == '6');
    CU_ASSERT(m[1].vlen == 6 && !memcmp(m[1].val, "-1.5e3", 6));
    CU_ASSERT_PTR_EQUAL(json_span_find(m, 4, "name"), &m[2]); /* escaped key */
    CU_ASSERT(m[2].vlen == 6);
    CU_ASSERT(m[3].vlen == 23);
    CU_ASSERT_PTR_NULL(json_span_find(m, 4, "y")); /* not recorded */
    /* nesting: 63 levels inside the object pass, 64 do not */
    for (int depth = 63; depth <= 64; depth++) {
        size_t k = 0;
        deep[k++] = '{';
        deep[k++] = '"', deep[k++] = 'a', deep[k++] = '"', deep[k++] = ':';
        for (int i = 0; i < depth; i++)
            deep[k++] = '[';
        for (int i = 0; i < depth; i++)
            deep[k++] = ']';
        deep[k++] = '}';
        CU_ASSERT_EQUAL(json_scan_object(deep, k, m, 4), depth == 63 ? 1 : -1);
    }
}

static void test_scan_utf8(void)
{
    struct json_span m[4];
    static const char *bad[] = {
        "{\"a\":\"evil\xff\xfe\"}",     /* never in UTF-8 */
        "{\"a\":\"\x80\"}",             /* a lone continuation byte */
        "{\"a\":\"\xc3\"}",             /* cut short */
        "{\"a\":\"\xc0\xaf\"}",         /* overlong '/' */
        "{\"a\":\"\xe0\x80\xaf\"}",     /* overlong, three bytes */
        "{\"a\":\"\xed\xa0\x80\"}",     /* a surrogate, U+D800 */
        "{\"a\":\"\xf4\x90\x80\x80\"}", /* past U+10FFFF */
        "{\"k\xff\":1}",                /* in a key */
        "{\"a\":[\"\xfe\"]}",           /* nested */
    };
    static const char *good[] = {
        "{\"a\":\"caf\xc3\xa9\"}", "{\"a\":\"\xe2\x82\xac\"}",
        "{\"a\":\"\xf0\x9f\x98\x80\"}", "{\"a\":\"\xf4\x8f\xbf\xbf\"}",
        "{\"a\":\"\xed\x9f\xbf\"}",
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        CU_ASSERT_EQUAL(json_scan_object(bad[i], strlen(bad[i]), m, 4), JSON_SCAN_UTF8);
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        CU_ASSERT_EQUAL(json_scan_object(good[i], strlen(good[i]), m, 4), 1);
    /* a syntax error is still named as one */
    CU_ASSERT_EQUAL(json_scan_object("{\"a\":1,}", 8, m, 4), JSON_SCAN_SYNTAX);
}

static void test_span_dup(void)
{
    static struct json_span m[JSON_SPAN_DUP_MAX + 1];
    static char big[JSON_SPAN_DUP_MAX * 16 + 16];
    const char *f1 = "{\"msgid\":6,\"id\":1,\"name\":\"a\",\"i\\u0064\":2}";
    const char *f2 = "{\"msgid\":6,\"m\\u0073gid\":10}";
    const char *f3 = "{\"a\":1,\"b\":2,\"a\\u0000\":3,\"\\/\":4,\"/x\":5}";
    const char *f4 = "{\"x\":1,\"\\u002f\":2,\"\\/\":3}";
    size_t k = 0;
    long n;

    n = json_scan_object(f1, strlen(f1), m, 8);
    CU_ASSERT_EQUAL(n, 4);
    CU_ASSERT_EQUAL(json_span_dup(m, (size_t)n), 3);
    n = json_scan_object(f2, strlen(f2), m, 8);
    CU_ASSERT_EQUAL(json_span_dup(m, (size_t)n), 1);
    n = json_scan_object(f3, strlen(f3), m, 8);
    CU_ASSERT_EQUAL(json_span_dup(m, (size_t)n), -1); /* "a\0" is not "a" */
    n = json_scan_object(f4, strlen(f4), m, 8);
    CU_ASSERT_EQUAL(json_span_dup(m, (size_t)n), 2);  /* two spellings of "/" */
    /* many distinct members, then one repeat at the end: still found */
    big[k++] = '{';
    for (int i = 0; i < JSON_SPAN_DUP_MAX - 1; i++)
        k += (size_t)sprintf(big + k, "\"k%d\":%d,", i, i);
    k += (size_t)sprintf(big + k, "\"k\\u0037\":0}"); /* "k7" again */
    n = json_scan_object(big, k, m, JSON_SPAN_DUP_MAX);
    CU_ASSERT_EQUAL(n, JSON_SPAN_DUP_MAX);
    CU_ASSERT_EQUAL(json_span_dup(m, (size_t)n), JSON_SPAN_DUP_MAX - 1);
    CU_ASSERT_EQUAL(json_span_dup(m, JSON_SPAN_DUP_MAX - 1), -1);
    CU_ASSERT_EQUAL(json_span_dup(m, JSON_SPAN_DUP_MAX + 1), -2);
}

static void test_member_agrees_with_cjson(void)
{
    static const char *keys[] = {"msgid", "id", "msg", "a", "m\"g", "\xc3\xa9", "x y", "no"};
    size_t bad = 0, found = 0;

    for (int iter = 0; iter < 3000; iter++) {
        cJSON *o = random_object(0);
        char *text = iter % 2 ? cJSON_PrintUnformatted(o) : cJSON_Print(o);
        size_t len = strlen(text);

        for (size_t k = 0; k < 8; k++) {
            size_t vlen = 0;
            const char *v = json_member_raw(text, len, keys[k], &vlen);
            cJSON *want = cJSON_GetObjectItemCaseSensitive(o, keys[k]);
            if ((v == NULL) != (want == NULL)) {
                bad++;
                continue;
            }
            if (v == NULL)
                continue;
            found++;
            const char *endp = NULL;
            cJSON *got = cJSON_ParseWithLengthOpts(v, vlen, &endp, 0);
            if (got == NULL || endp != v + vlen || !same_json(got, want))
                bad++;
            if (got != NULL && cJSON_IsString(got)) {
                size_t ul;
                char *u = json_unescape(v, vlen, &ul);
                if (u == NULL || ul != strlen(want->valuestring) ||
                    memcmp(u, want->valuestring, ul) != 0)
                    bad++;
                mem_free(u);
            }
            cJSON_Delete(got);
        }
        free(text);
        cJSON_Delete(o);
    }
    CU_ASSERT_EQUAL(bad, 0);
    CU_ASSERT_TRUE(found > 3000);
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    s = CU_add_suite("jsonstr", NULL, NULL);
    CU_add_test(s, "unescape: every escape", test_unescape_escapes);
    CU_add_test(s, "unescape: rejects", test_unescape_rejects);
    CU_add_test(s, "quote: forms", test_quote_forms);
    CU_add_test(s, "quote/unescape round trip, random bytes", test_roundtrip_random);
    CU_add_test(s, "unescape agrees with cJSON", test_unescape_agrees_with_cjson);
    CU_add_test(s, "member lookup, nested", test_member_lookup);
    CU_add_test(s, "member keys and whitespace", test_member_keys_and_whitespace);
    CU_add_test(s, "member on truncated text", test_member_truncated_stays_inside);
    CU_add_test(s, "member agrees with cJSON", test_member_agrees_with_cjson);
    CU_add_test(s, "strict scan: validation and member spans", test_scan_object);
    CU_add_test(s, "strict scan: UTF-8 only", test_scan_utf8);
    CU_add_test(s, "duplicate keys, decoded, linear", test_span_dup);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failed ? 1 : 0;
}
