/*
 * test_frame.c - CUnit tests of the stream splitter (core/frame.c).
 *
 * The central helper, feed(), plays the part of net.c: it hands a stream to
 * frame_scan in pieces cut at given offsets, keeps the bytes of a partial
 * frame the way the caller must (the last fs.len bytes consumed), and
 * records every event with its absolute offset in the stream, checking that
 * the bytes it assembled for each frame are the stream's bytes.  Tests then
 * compare the events of every way of cutting a stream with the events
 * expected for it.
 */
#include <stdlib.h>
#include <string.h>

#include <CUnit/Basic.h>

#include "core.h"

#define MAXEV 64
#define MAXSTREAM 4096

struct ev {
    int status;
    size_t off;   /* COMPLETE: frame start; else the offending byte */
    size_t len;   /* COMPLETE: frame length */
};

struct run {
    struct ev ev[MAXEV];
    size_t n;
    int bytes_bad;   /* a frame's assembled bytes differed from the stream */
    int api_bad;     /* used/start out of range */
};

static void run_add(struct run *r, int status, size_t off, size_t len)
{
    if (r->n < MAXEV) {
        r->ev[r->n].status = status;
        r->ev[r->n].off = off;
        r->ev[r->n].len = len;
    }
    r->n++;
}

/* Feed s[0..n) cut at the sorted offsets cuts[0..ncuts). */
static void feed(const char *s, size_t n, const size_t *cuts, size_t ncuts,
                 size_t max, struct run *r)
{
    static char kept[MAXSTREAM];
    struct frame_scanner fs;
    size_t nkept = 0, a = 0;

    memset(r, 0, sizeof(*r));
    frame_init(&fs, max);
    for (size_t c = 0; c <= ncuts; c++) {
        size_t b = c < ncuts ? cuts[c] : n, off = 0;
        const char *piece = s + a;
        size_t plen = b - a;

        while (off < plen) {
            size_t used = 12345;
            long start = -7;
            int rc = frame_scan(&fs, piece + off, plen - off, &used, &start);

            if (used > plen - off || (rc != FRAME_TOO_LARGE && used == 0)) {
                r->api_bad = 1;
                return;
            }
            switch (rc) {
            case FRAME_COMPLETE: {
                const char *f;
                size_t flen, abs_end = a + off + used;

                if (start >= 0) {
                    if (nkept != 0 || (size_t)start >= used) {
                        r->api_bad = 1;
                        return;
                    }
                    f = piece + off + start;
                    flen = used - (size_t)start;
                } else {
                    memcpy(kept + nkept, piece + off, used);
                    nkept += used;
                    f = kept;
                    flen = nkept;
                }
                if (memcmp(f, s + abs_end - flen, flen) != 0)
                    r->bytes_bad = 1;
                run_add(r, rc, abs_end - flen, flen);
                nkept = 0;
                break;
            }
            case FRAME_NEED_MORE:
                memcpy(kept + nkept, piece + off, used);
                nkept += used;
                if (fs.len > nkept) {
                    r->api_bad = 1;
                    return;
                }
                memmove(kept, kept + nkept - fs.len, fs.len);
                nkept = fs.len;
                break;
            case FRAME_GARBAGE:
                run_add(r, rc, a + off + used - 1, 0);
                break;
            case FRAME_TOO_LARGE:
                run_add(r, rc, a + off + used - 1, 0);
                return;
            default:
                r->api_bad = 1;
                return;
            }
            off += used;
        }
        a = b;
    }
}

static int run_equal(const struct run *x, const struct run *y)
{
    if (x->n != y->n || x->bytes_bad || y->bytes_bad || x->api_bad || y->api_bad)
        return 0;
    for (size_t i = 0; i < x->n && i < MAXEV; i++) {
        if (x->ev[i].status != y->ev[i].status || x->ev[i].off != y->ev[i].off ||
            x->ev[i].len != y->ev[i].len)
            return 0;
    }
    return 1;
}

/* Check that every cut of s into 1, 2 and 3 pieces (3 only when n <= lim3),
 * and byte-at-a-time feeding, give the events of exp. */
static void check_all_splits(const char *s, size_t n, size_t max,
                             const struct run *exp, size_t lim3)
{
    static size_t cuts[MAXSTREAM];
    struct run r;
    size_t bad = 0;

    feed(s, n, NULL, 0, max, &r);
    CU_ASSERT_TRUE(run_equal(&r, exp));
    for (size_t i = 0; i <= n; i++) {
        cuts[0] = i;
        feed(s, n, cuts, 1, max, &r);
        bad += !run_equal(&r, exp);
        for (size_t j = i; n <= lim3 && j <= n; j++) {
            cuts[1] = j;
            feed(s, n, cuts, 2, max, &r);
            bad += !run_equal(&r, exp);
        }
    }
    for (size_t i = 0; i < n; i++)
        cuts[i] = i + 1;
    feed(s, n, cuts, n, max, &r);
    bad += !run_equal(&r, exp);
    CU_ASSERT_EQUAL(bad, 0);
}

static void expect(struct run *r, int status, size_t off, size_t len)
{
    run_add(r, status, off, len);
}

static const char MSG1[] =
    "{\"msgid\":6,\"id\":1,\"name\":\"al}ce{\",\"toid\":2,"
    "\"msg\":\"he said \\\"{hi}\\\" \\\\ [ok]\",\"time\":\"2024-01-01 12:00:00\"}";

static void test_single_message_every_split(void)
{
    char s[256];
    size_t n = sizeof(MSG1) - 1;
    struct run exp = {0};

    memcpy(s, MSG1, n);
    s[n] = '\0';   /* the legacy terminator */
    expect(&exp, FRAME_COMPLETE, 0, n);
    check_all_splits(s, n + 1, 1024, &exp, 256);
}

static void test_several_messages_every_split(void)
{
    /* legacy NUL-terminated, newline-delimited, back-to-back, CRLF, blanks */
    static const char *msgs[] = {
        "{\"msgid\":1,\"id\":7,\"password\":\"p{a}ss\"}",
        "{\"msgid\":4,\"name\":\"x\\\\\",\"password\":\"]\"}",
        "{}",
        "{\"a\":[1,{\"b\":[\"}\"]}],\"c\":{}}",
        "{\"msgid\":10,\"msg\":\"\\u0000\\\"\"}",
    };
    static const char *seps[] = {"\0", "\n", "", "\r\n", " \t\0"};
    static const size_t seplen[] = {1, 1, 0, 2, 3};
    char s[512];
    size_t n = 0;
    struct run exp = {0};

    for (size_t i = 0; i < 5; i++) {
        size_t l = strlen(msgs[i]);
        memcpy(s + n, msgs[i], l);
        expect(&exp, FRAME_COMPLETE, n, l);
        n += l;
        memcpy(s + n, seps[i], seplen[i]);
        n += seplen[i];
    }
    check_all_splits(s, n, 1024, &exp, 200);
}

static void test_several_in_one_read(void)
{
    static const char s[] = "{\"a\":1}\0{\"b\":2}{\"c\":\"}\"}\n";
    struct frame_scanner fs;
    size_t used, off = 0, n = sizeof(s) - 1;
    long start;

    frame_init(&fs, 100);
    CU_ASSERT_EQUAL(frame_scan(&fs, s, n, &used, &start), FRAME_COMPLETE);
    CU_ASSERT_EQUAL(start, 0);
    CU_ASSERT_EQUAL(used, 7);
    off += used;
    CU_ASSERT_EQUAL(frame_scan(&fs, s + off, n - off, &used, &start), FRAME_COMPLETE);
    CU_ASSERT_EQUAL(start, 1);       /* after the NUL */
    CU_ASSERT_EQUAL(used, 8);
    off += used;
    CU_ASSERT_EQUAL(frame_scan(&fs, s + off, n - off, &used, &start), FRAME_COMPLETE);
    CU_ASSERT_EQUAL(start, 0);
    CU_ASSERT_EQUAL(used, 9);
    off += used;
    CU_ASSERT_EQUAL(frame_scan(&fs, s + off, n - off, &used, &start), FRAME_NEED_MORE);
    CU_ASSERT_EQUAL(used, 1);
    CU_ASSERT_EQUAL(fs.len, 0);
}

static void test_separators(void)
{
    static const char s[] = "\0\n\r \t{}\0\0\n{ }\t\t{\n\"a\" :\r\n1 }   ";
    struct run exp = {0};

    expect(&exp, FRAME_COMPLETE, 5, 2);
    expect(&exp, FRAME_COMPLETE, 10, 3);
    expect(&exp, FRAME_COMPLETE, 15, 12);
    check_all_splits(s, sizeof(s) - 1, 1024, &exp, 100);
}

static void test_strings_and_escapes(void)
{
    static const char *frames[] = {
        "{\"a\":\"\\\\\"}",                 /* escaped backslash before the quote */
        "{\"a\":\"\\\\\\\"}\"}",            /* \\ then \" then } inside */
        "{\"{\":\"[\",\"]\":\"}}}}\"}",
        "{\"a\":\"\\u007d\\u005d\"}",
        "{\"\\\"\":{\"\\\\\":[\"\\\"}\"]}}",
        "{\"a\":\"\x01\x7f\xff\xf0\x9f\x98\x80\"}",
    };
    char s[512];
    size_t n = 0;
    struct run exp = {0};

    for (size_t i = 0; i < sizeof(frames) / sizeof(frames[0]); i++) {
        size_t l = strlen(frames[i]);
        memcpy(s + n, frames[i], l);
        expect(&exp, FRAME_COMPLETE, n, l);
        n += l;
        s[n++] = '\0';
    }
    check_all_splits(s, n, 1024, &exp, 160);
}

static void test_nested_brackets(void)
{
    static const char s[] = "{\"a\":[[[{}]]],\"b\":{\"c\":[1,2,{\"d\":\"]}\"}]}}"
                            "[{}]";
    size_t l1 = strlen("{\"a\":[[[{}]]],\"b\":{\"c\":[1,2,{\"d\":\"]}\"}]}}");
    struct run exp = {0};

    expect(&exp, FRAME_COMPLETE, 0, l1);
    expect(&exp, FRAME_GARBAGE, l1, 0);          /* a top-level '[' */
    expect(&exp, FRAME_COMPLETE, l1 + 1, 2);
    expect(&exp, FRAME_GARBAGE, l1 + 3, 0);
    check_all_splits(s, sizeof(s) - 1, 1024, &exp, 100);
}

static void test_mismatched_kinds_end_at_depth_zero(void)
{
    /* Not JSON: the scanner only counts depth, cJSON rejects it later. */
    static const char s[] = "{]{[}}";
    struct run exp = {0};

    expect(&exp, FRAME_COMPLETE, 0, 2);
    expect(&exp, FRAME_COMPLETE, 2, 4);
    check_all_splits(s, sizeof(s) - 1, 1024, &exp, 100);
}

static void test_garbage_between_frames(void)
{
    static const char s[] = "x{}]\0{\"a\":1}  [1]\n\"s\"{}}";
    struct run exp = {0};

    expect(&exp, FRAME_GARBAGE, 0, 0);     /* x */
    expect(&exp, FRAME_COMPLETE, 1, 2);
    expect(&exp, FRAME_GARBAGE, 3, 0);     /* ] */
    expect(&exp, FRAME_COMPLETE, 5, 7);
    expect(&exp, FRAME_GARBAGE, 14, 0);    /* [ */
    expect(&exp, FRAME_GARBAGE, 15, 0);    /* 1 */
    expect(&exp, FRAME_GARBAGE, 16, 0);    /* ] */
    expect(&exp, FRAME_GARBAGE, 18, 0);    /* " */
    expect(&exp, FRAME_GARBAGE, 19, 0);    /* s */
    expect(&exp, FRAME_GARBAGE, 20, 0);    /* " */
    expect(&exp, FRAME_COMPLETE, 21, 2);
    expect(&exp, FRAME_GARBAGE, 23, 0);    /* } */
    check_all_splits(s, sizeof(s) - 1, 1024, &exp, 100);
}

static void test_garbage_consumes_one_byte(void)
{
    struct frame_scanner fs;
    size_t used;
    long start;

    frame_init(&fs, 100);
    CU_ASSERT_EQUAL(frame_scan(&fs, "\n\nab{}", 6, &used, &start), FRAME_GARBAGE);
    CU_ASSERT_EQUAL(used, 3);
    CU_ASSERT_EQUAL(frame_scan(&fs, "b{}", 3, &used, &start), FRAME_GARBAGE);
    CU_ASSERT_EQUAL(used, 1);
    CU_ASSERT_EQUAL(fs.len, 0);
}

/* A frame of exactly n bytes: {"a":"xxx...x"} */
static size_t make_frame(char *buf, size_t n)
{
    memcpy(buf, "{\"a\":\"", 6);
    memset(buf + 6, 'x', n - 8);
    memcpy(buf + n - 2, "\"}", 2);
    return n;
}

static void test_max_size_boundary(void)
{
    char s[256];
    struct run exp = {0}, exp2 = {0};
    size_t n;

    /* exactly max passes, also with separators before and a second frame */
    s[0] = s[1] = '\0';
    n = 2 + make_frame(s + 2, 40);
    n += make_frame(s + n, 40);
    expect(&exp, FRAME_COMPLETE, 2, 40);
    expect(&exp, FRAME_COMPLETE, 42, 40);
    check_all_splits(s, n, 40, &exp, 120);

    /* max + 1 fails, at the byte that passes the limit */
    n = make_frame(s, 41);
    expect(&exp2, FRAME_TOO_LARGE, 40, 0);
    check_all_splits(s, n, 40, &exp2, 120);
}

static void test_too_large_without_waiting_for_end(void)
{
    struct frame_scanner fs;
    char s[128];
    size_t used;
    long start;

    memset(s, 'x', sizeof(s));
    s[0] = '{';
    frame_init(&fs, 50);
    /* 50 bytes of an unfinished frame: fine, wants more */
    CU_ASSERT_EQUAL(frame_scan(&fs, s, 50, &used, &start), FRAME_NEED_MORE);
    CU_ASSERT_EQUAL(used, 50);
    CU_ASSERT_EQUAL(fs.len, 50);
    /* the 51st byte is refused at once */
    CU_ASSERT_EQUAL(frame_scan(&fs, s + 50, 1, &used, &start), FRAME_TOO_LARGE);
    CU_ASSERT_EQUAL(used, 1);
    /* sticky until frame_init */
    CU_ASSERT_EQUAL(frame_scan(&fs, "{}", 2, &used, &start), FRAME_TOO_LARGE);
    CU_ASSERT_EQUAL(used, 0);
    frame_init(&fs, 50);
    CU_ASSERT_EQUAL(frame_scan(&fs, "{}", 2, &used, &start), FRAME_COMPLETE);

    /* inside a string, in one read of a larger buffer */
    frame_init(&fs, 50);
    memcpy(s, "{\"a\":\"", 6);
    CU_ASSERT_EQUAL(frame_scan(&fs, s, sizeof(s), &used, &start), FRAME_TOO_LARGE);
    CU_ASSERT_EQUAL(used, 51);

    /* max 0: nothing fits */
    frame_init(&fs, 0);
    CU_ASSERT_EQUAL(frame_scan(&fs, " {}", 3, &used, &start), FRAME_TOO_LARGE);
    CU_ASSERT_EQUAL(used, 2);
}

static void test_frame_at_buffer_end(void)
{
    static const char s[] = "\0{\"a\":\"b\"}";
    struct frame_scanner fs;
    size_t used, n = sizeof(s) - 1;
    long start;

    frame_init(&fs, 100);
    CU_ASSERT_EQUAL(frame_scan(&fs, s, n, &used, &start), FRAME_COMPLETE);
    CU_ASSERT_EQUAL(used, n);
    CU_ASSERT_EQUAL(start, 1);
    CU_ASSERT_EQUAL(fs.len, 0);
    CU_ASSERT_EQUAL(frame_scan(&fs, s + n, 0, &used, &start), FRAME_NEED_MORE);
    CU_ASSERT_EQUAL(used, 0);

    /* the closing brace alone in the next read: the frame began earlier */
    CU_ASSERT_EQUAL(frame_scan(&fs, s, n - 1, &used, &start), FRAME_NEED_MORE);
    CU_ASSERT_EQUAL(used, n - 1);
    CU_ASSERT_EQUAL(fs.len, n - 2);
    CU_ASSERT_EQUAL(frame_scan(&fs, s + n - 1, 1, &used, &start), FRAME_COMPLETE);
    CU_ASSERT_EQUAL(used, 1);
    CU_ASSERT_EQUAL(start, -1);
}

static void test_escape_cut_after_backslash(void)
{
    struct frame_scanner fs;
    size_t used;
    long start;

    frame_init(&fs, 100);
    CU_ASSERT_EQUAL(frame_scan(&fs, "{\"a\":\"\\", 7, &used, &start), FRAME_NEED_MORE);
    CU_ASSERT_EQUAL(fs.esc, 1);
    /* the escaped quote must not end the string */
    CU_ASSERT_EQUAL(frame_scan(&fs, "\"}", 2, &used, &start), FRAME_NEED_MORE);
    CU_ASSERT_EQUAL(frame_scan(&fs, "\"}", 2, &used, &start), FRAME_COMPLETE);
    CU_ASSERT_EQUAL(fs.len, 0);
}

static void test_random_streams_against_whole_read(void)
{
    static const char *parts[] = {
        "{\"msgid\":6,\"msg\":\"a\\\"}\"}", "\0", "\n", " ", "{}", "[", "x",
        "{\"a\":[{\"b\":\"\\\\\"}]}", "\"", "}", "{\"u\":\"\\ud83d\\ude00\"}",
    };
    char s[1024];
    size_t cuts[64];
    struct run whole, r;
    size_t bad = 0;

    srand(12345);
    for (int iter = 0; iter < 2000; iter++) {
        size_t n = 0, nc = 0;
        while (n < 900) {
            const char *p = parts[rand() % 11];
            size_t l = p[0] ? strlen(p) : 1;
            if (n + l > sizeof(s))
                break;
            memcpy(s + n, p, l);
            n += l;
            if (rand() % 8 == 0)
                break;
        }
        for (size_t i = 0; i < n && nc < 64; i++)
            if (rand() % 10 == 0)
                cuts[nc++] = i;
        size_t max = 10 + (size_t)(rand() % 60);
        feed(s, n, NULL, 0, max, &whole);
        feed(s, n, cuts, nc, max, &r);
        bad += !run_equal(&whole, &r);
    }
    CU_ASSERT_EQUAL(bad, 0);
}

int main(void)
{
    CU_pSuite s;
    unsigned failed;

    if (CU_initialize_registry() != CUE_SUCCESS)
        return 2;
    s = CU_add_suite("frame", NULL, NULL);
    CU_add_test(s, "single message, every split", test_single_message_every_split);
    CU_add_test(s, "several messages, every split", test_several_messages_every_split);
    CU_add_test(s, "several messages in one read", test_several_in_one_read);
    CU_add_test(s, "separators", test_separators);
    CU_add_test(s, "braces and escapes in strings", test_strings_and_escapes);
    CU_add_test(s, "nested brackets, top-level array", test_nested_brackets);
    CU_add_test(s, "mismatched bracket kinds", test_mismatched_kinds_end_at_depth_zero);
    CU_add_test(s, "garbage between frames", test_garbage_between_frames);
    CU_add_test(s, "garbage consumes one byte", test_garbage_consumes_one_byte);
    CU_add_test(s, "max size boundary", test_max_size_boundary);
    CU_add_test(s, "too large at once, sticky", test_too_large_without_waiting_for_end);
    CU_add_test(s, "frame at buffer end", test_frame_at_buffer_end);
    CU_add_test(s, "escape cut after backslash", test_escape_cut_after_backslash);
    CU_add_test(s, "random streams, split == whole", test_random_streams_against_whole_read);
    CU_basic_set_mode(CU_BRM_VERBOSE);
    CU_basic_run_tests();
    failed = CU_get_number_of_failures();
    CU_cleanup_registry();
    return failed ? 1 : 0;
}
