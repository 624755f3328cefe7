/*
 * frame.c - splitting a TCP byte stream into top-level JSON objects.
 *
 * The legacy client ends each object with a NUL byte, newer clients may use
 * '\n' or nothing at all, and TCP may cut an object anywhere.  The scanner
 * therefore finds the end of each object by matching braces itself, aware of
 * strings and of escapes inside them, and accepts NUL, '\n', '\r', ' ' and
 * '\t' between objects.  It does not validate JSON: that is cJSON's job once
 * a frame is complete (an object with mismatched bracket kinds still ends
 * where its depth returns to zero, and cJSON then rejects it).
 *
 * Design: the whole state (depth, inside-a-string, pending escape, bytes of
 * the current frame) lives in struct frame_scanner, so a frame cut across
 * reads costs nothing more than one that is not: every byte is looked at
 * once, never rescanned, and nothing is allocated.  The caller owns the
 * bytes; after FRAME_NEED_MORE the partial frame is the last fs->len bytes it
 * has consumed.  The inner loop is a table lookup per byte that skips
 * ordinary bytes in a tight loop (one table for bytes outside strings, one
 * for inside); the size limit is turned into an end pointer once per call
 * instead of a check per byte.
 *
 * Once a frame exceeds max the scanner stays in that state (every further
 * call returns FRAME_TOO_LARGE and consumes nothing) until frame_init: the
 * rest of an oversized object cannot be told apart from new frames, so the
 * caller is expected to drop the connection.
 */
#include <limits.h>
#include <stdint.h>

#include "core.h"

/* Bytes with a meaning outside strings (inside an object). */
enum { C_PLAIN = 0, C_OPEN, C_CLOSE, C_QUOTE, C_BSLASH };

static const unsigned char cls_obj[256] = {
    ['{'] = C_OPEN, ['['] = C_OPEN, ['}'] = C_CLOSE, [']'] = C_CLOSE,
    ['"'] = C_QUOTE,
};

/* Bytes with a meaning inside strings. */
static const unsigned char cls_str[256] = {
    ['"'] = C_QUOTE, ['\\'] = C_BSLASH,
};

/* Bytes accepted between objects. */
static const unsigned char cls_sep[256] = {
    ['\0'] = 1, ['\n'] = 1, ['\r'] = 1, [' '] = 1, ['\t'] = 1,
};

void frame_init(struct frame_scanner *fs, size_t max)
{
    /* max + 1 must fit: it marks the sticky too-large state */
    fs->max = max < SIZE_MAX ? max : SIZE_MAX - 1;
    fs->len = 0;
    fs->depth = 0;
    fs->in_str = 0;
    fs->esc = 0;
}

/* Between frames: skip separators.  Returns the first byte of a frame, or
 * NULL with *status set (NEED_MORE: all consumed; GARBAGE: *used counts the
 * bad byte). */
static const unsigned char *frame_begin(const unsigned char *p,
                                        const unsigned char *end,
                                        const unsigned char *base,
                                        size_t *used, int *status)
{
    while (p < end && cls_sep[*p])
        p++;
    if (p == end) {
        *used = (size_t)(end - base);
        *status = FRAME_NEED_MORE;
        return NULL;
    }
    if (*p != '{') {
        *used = (size_t)(p - base) + 1;
        *status = FRAME_GARBAGE;
        return NULL;
    }
    return p;
}

int frame_scan(struct frame_scanner *fs, const char *buf, size_t len,
               size_t *used, long *start)
{
    const unsigned char *base = (const unsigned char *)buf;
    const unsigned char *p = base, *end = base + len, *first, *stop;
    int depth, in_str, status = FRAME_NEED_MORE;
    size_t room;

    *start = -1;
    if (fs->len > fs->max) {        /* sticky: see the top of the file */
        *used = 0;
        return FRAME_TOO_LARGE;
    }
    if (fs->len == 0) {
        p = frame_begin(p, end, base, used, &status);
        if (p == NULL)
            return status;
        *start = (long)(p - base);
        fs->depth = 0;
        fs->in_str = 0;
        fs->esc = 0;
    }
    first = p;
    depth = fs->depth;
    in_str = fs->in_str;

    /* The frame may take at most room more bytes; stop is where the scan
     * must end (the buffer end, or the first byte past the limit). */
    room = fs->max - fs->len;
    stop = (size_t)(end - p) > room ? p + room : end;

    if (fs->esc && p < stop) {      /* the escaped byte was cut off */
        p++;
        fs->esc = 0;
    }
    for (;;) {
        if (in_str) {
            while (p < stop && cls_str[*p] == C_PLAIN)
                p++;
            if (p == stop)
                break;
            if (*p == '\\') {
                if (p + 1 == stop) {
                    fs->esc = 1;
                    p++;
                    break;
                }
                p += 2;
                continue;
            }
            in_str = 0;
            p++;
            continue;
        }
        while (p < stop && cls_obj[*p] == C_PLAIN)
            p++;
        if (p == stop)
            break;
        switch (cls_obj[*p++]) {
        case C_QUOTE:
            in_str = 1;
            break;
        case C_OPEN:
            if (depth == INT_MAX) {
                p--;
                goto too_large;
            }
            depth++;
            break;
        default: /* C_CLOSE */
            if (--depth == 0) {
                fs->len = 0;
                fs->depth = 0;
                fs->in_str = 0;
                *used = (size_t)(p - base);
                return FRAME_COMPLETE;
            }
            break;
        }
    }
    fs->len += (size_t)(p - first);
    fs->depth = depth;
    fs->in_str = (unsigned char)in_str;
    if (stop < end)
        goto too_large;
    *used = len;
    return FRAME_NEED_MORE;

too_large: /* p is at the byte that broke the limit */
    fs->len = fs->max + 1;
    *used = (size_t)(p - base) + 1;
    return FRAME_TOO_LARGE;
}
