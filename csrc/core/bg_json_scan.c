/* bg_json_scan.c - strict one-pass JSON scanner (see bg_json_scan.h). */
#include "bg_json_scan.h"

#include <string.h>

void bg_js_init(bg_js *s, const char *text, size_t len)
{
    s->start = s->p = text ? text : "";
    s->end = s->p + (text ? len : 0);
    s->depth = 0;
    s->err = NULL;
}

int bg_js_fail(bg_js *s, const char *msg)
{
    if (!s->err)
        s->err = msg;
    return -1;
}

size_t bg_js_offset(const bg_js *s)
{
    return (size_t)(s->p - s->start);
}

const char *bg_jt_name(int t)
{
    switch (t) {
    case BG_JT_OBJ: return "object";
    case BG_JT_ARR: return "list";
    case BG_JT_STR: return "string";
    case BG_JT_NUM: return "number";
    case BG_JT_BOOL: return "bool";
    case BG_JT_NULL: return "null";
    default: return "invalid";
    }
}

static void skip_ws(bg_js *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

int bg_js_peek(bg_js *s)
{
    if (s->err)
        return BG_JT_ERR;
    skip_ws(s);
    if (s->p >= s->end)
        return BG_JT_ERR;
    switch (*s->p) {
    case '{': return BG_JT_OBJ;
    case '[': return BG_JT_ARR;
    case '"': return BG_JT_STR;
    case 't':
    case 'f': return BG_JT_BOOL;
    case 'n': return BG_JT_NULL;
    default:
        if (*s->p == '-' || (*s->p >= '0' && *s->p <= '9'))
            return BG_JT_NUM;
        return BG_JT_ERR;
    }
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    *out = v;
    return 0;
}

static int put_utf8(bg_buf *out, unsigned cp)
{
    char u[4];
    size_t n;
    if (cp < 0x80) {
        u[0] = (char)cp;
        n = 1;
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        n = 2;
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        n = 3;
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        n = 4;
    }
    return bg_buf_append(out, u, n);
}

/* Bytes that end a verbatim run inside a string: the quote, the backslash
 * and control characters (one table load per byte instead of three tests). */
#define X4 1, 1, 1, 1
static const unsigned char str_stop[256] = {
    X4, X4, X4, X4, X4, X4, X4, X4, /* 0x00-0x1f */
    0, 0, 1 /* '"' */, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, /* 0x20-0x2f */
    [0x5c] = 1 /* '\\' */,
};
#undef X4

int bg_js_string(bg_js *s, bg_buf *out)
{
    if (bg_js_peek(s) != BG_JT_STR)
        return bg_js_fail(s, "expected a string");
    s->p++;
    const char *run = s->p; /* bytes copied verbatim up to the next escape */
    for (;;) {
        const char *p = s->p, *end = s->end;
        while (p < end && !str_stop[(unsigned char)*p])
            p++;
        s->p = p;
        if (s->p >= s->end)
            return bg_js_fail(s, "unterminated string");
        unsigned char c = (unsigned char)*s->p;
        if (c == '"')
            break;
        if (c < 0x20)
            return bg_js_fail(s, "control character in a string");
        if (c != '\\') {
            s->p++;
            continue;
        }
        if (out && bg_buf_append(out, run, (size_t)(s->p - run)) < 0)
            return bg_js_fail(s, "out of memory");
        if (s->end - s->p < 2)
            return bg_js_fail(s, "unterminated string");
        char e = s->p[1];
        const char *simple = NULL;
        switch (e) {
        case '"': simple = "\""; break;
        case '\\': simple = "\\"; break;
        case '/': simple = "/"; break;
        case 'b': simple = "\b"; break;
        case 'f': simple = "\f"; break;
        case 'n': simple = "\n"; break;
        case 'r': simple = "\r"; break;
        case 't': simple = "\t"; break;
        case 'u': break;
        default: s->p++; return bg_js_fail(s, "bad escape in a string");
        }
        if (simple) {
            if (out && bg_buf_append(out, simple, 1) < 0)
                return bg_js_fail(s, "out of memory");
            s->p += 2;
            run = s->p;
            continue;
        }
        unsigned cp;
        if (s->end - s->p < 6 || hex4(s->p + 2, &cp) < 0)
            return bg_js_fail(s, "bad \\u escape in a string");
        s->p += 6;
        if (cp >= 0xD800 && cp < 0xDC00) {
            unsigned lo;
            if (s->end - s->p >= 6 && s->p[0] == '\\' && s->p[1] == 'u' &&
                hex4(s->p + 2, &lo) == 0 && lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                s->p += 6;
            } else {
                cp = 0xFFFD; /* lone high surrogate */
            }
        } else if (cp >= 0xDC00 && cp < 0xE000) {
            cp = 0xFFFD; /* lone low surrogate */
        }
        if (out && put_utf8(out, cp) < 0)
            return bg_js_fail(s, "out of memory");
        run = s->p;
    }
    if (out && bg_buf_append(out, run, (size_t)(s->p - run)) < 0)
        return bg_js_fail(s, "out of memory");
    if (out && !out->data && bg_buf_append(out, "", 0) < 0) /* "" still gets storage */
        return bg_js_fail(s, "out of memory");
    s->p++; /* closing quote */
    return 0;
}

static bool is_digit(const bg_js *s)
{
    return s->p < s->end && *s->p >= '0' && *s->p <= '9';
}

int bg_js_int(bg_js *s, int64_t *out)
{
    if (bg_js_peek(s) != BG_JT_NUM)
        return bg_js_fail(s, "expected a number");
    bool neg = false, exact = true;
    uint64_t mag = 0;
    if (*s->p == '-') {
        neg = true;
        s->p++;
    }
    if (!is_digit(s))
        return bg_js_fail(s, "bad number");
    if (*s->p == '0') {
        s->p++;
    } else {
        while (is_digit(s)) {
            unsigned d = (unsigned)(*s->p - '0');
            if (mag > (UINT64_MAX - d) / 10)
                exact = false;
            else
                mag = mag * 10 + d;
            s->p++;
        }
    }
    if (s->p < s->end && *s->p == '.') {
        s->p++;
        if (!is_digit(s))
            return bg_js_fail(s, "bad number");
        while (is_digit(s)) {
            if (*s->p != '0')
                exact = false;
            s->p++;
        }
    }
    if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
        s->p++;
        if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
            s->p++;
        if (!is_digit(s))
            return bg_js_fail(s, "bad number");
        while (is_digit(s))
            s->p++;
        exact = false;
    }
    if (!exact || mag > (uint64_t)INT64_MAX + (neg ? 1u : 0u))
        return 1;
    if (out)
        *out = neg ? (int64_t)(0 - mag) : (int64_t)mag;
    return 0;
}

static int word(bg_js *s, const char *w, size_t n)
{
    if ((size_t)(s->end - s->p) < n || memcmp(s->p, w, n) != 0)
        return bg_js_fail(s, "invalid literal");
    s->p += n;
    return 0;
}

int bg_js_literal(bg_js *s, bool *value)
{
    int t = bg_js_peek(s);
    bool v = false;
    int rc;
    if (t == BG_JT_NULL)
        rc = word(s, "null", 4);
    else if (t == BG_JT_BOOL && *s->p == 't')
        rc = word(s, "true", 4), v = true;
    else if (t == BG_JT_BOOL)
        rc = word(s, "false", 5);
    else
        return bg_js_fail(s, "expected true, false or null");
    if (value)
        *value = v;
    return rc;
}

static int member_key(bg_js *s, bg_buf *key)
{
    if (key)
        key->len = 0;
    if (bg_js_peek(s) != BG_JT_STR)
        return bg_js_fail(s, "expected a member name");
    if (bg_js_string(s, key) < 0)
        return -1;
    skip_ws(s);
    if (s->p >= s->end || *s->p != ':')
        return bg_js_fail(s, "expected ':'");
    s->p++;
    return 1;
}

static int open_container(bg_js *s, int type, char close)
{
    if (bg_js_peek(s) != type)
        return bg_js_fail(s, type == BG_JT_OBJ ? "expected an object" : "expected a list");
    if (s->depth >= BG_JS_MAX_DEPTH)
        return bg_js_fail(s, "nested too deeply");
    s->p++;
    s->depth++;
    skip_ws(s);
    if (s->p < s->end && *s->p == close) {
        s->p++;
        s->depth--;
        return 0;
    }
    return 1;
}

/* After a member/element: ',' (then 1) or the closing bracket (then 0). */
static int next_in(bg_js *s, char close)
{
    if (s->err)
        return -1;
    skip_ws(s);
    if (s->p >= s->end)
        return bg_js_fail(s, "unexpected end of input");
    if (*s->p == ',') {
        s->p++;
        return 1;
    }
    if (*s->p == close) {
        s->p++;
        s->depth--;
        return 0;
    }
    return bg_js_fail(s, close == '}' ? "expected ',' or '}'" : "expected ',' or ']'");
}

int bg_js_obj_first(bg_js *s, bg_buf *key)
{
    int rc = open_container(s, BG_JT_OBJ, '}');
    return rc == 1 ? member_key(s, key) : rc;
}

int bg_js_obj_more(bg_js *s, bg_buf *key)
{
    int rc = next_in(s, '}');
    return rc == 1 ? member_key(s, key) : rc;
}

int bg_js_arr_first(bg_js *s)
{
    return open_container(s, BG_JT_ARR, ']');
}

int bg_js_arr_more(bg_js *s)
{
    return next_in(s, ']');
}

int bg_js_skip(bg_js *s)
{
    int rc;
    switch (bg_js_peek(s)) {
    case BG_JT_OBJ:
        for (rc = bg_js_obj_first(s, NULL); rc == 1; rc = bg_js_obj_more(s, NULL))
            if (bg_js_skip(s) < 0)
                return -1;
        return rc;
    case BG_JT_ARR:
        for (rc = bg_js_arr_first(s); rc == 1; rc = bg_js_arr_more(s))
            if (bg_js_skip(s) < 0)
                return -1;
        return rc;
    case BG_JT_STR: return bg_js_string(s, NULL);
    case BG_JT_NUM: return bg_js_int(s, NULL) < 0 ? -1 : 0;
    case BG_JT_BOOL:
    case BG_JT_NULL: return bg_js_literal(s, NULL);
    default:
        return bg_js_fail(s, s->p >= s->end ? "unexpected end of input" : "expected a value");
    }
}

int bg_js_finish(bg_js *s)
{
    if (s->err)
        return -1;
    skip_ws(s);
    return s->p == s->end ? 0 : bg_js_fail(s, "trailing data after the JSON value");
}
