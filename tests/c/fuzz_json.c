/* fuzz_json.c - libFuzzer target over the JSON codec (bg_json*.c):
 *   byte 0 % 4 == 0  response parser (both endpoints, expected count from byte 1)
 *                1  error-message extractor
 *                2  request template + completions body: the rest is split at
 *                   the first 0xFF into params and a prompt; a template that is
 *                   accepted must give a body that is one JSON object (checked
 *                   with cJSON, an independent parser) with exactly one
 *                   "prompt" whose value is the prompt, byte for byte
 *                3  messages check + chat body: accepted messages give a body
 *                   cJSON parses, with "messages" a list
 * Any violated property aborts (libFuzzer reports it with the input). */
#include "bg_json.h"
#include "bg_json_scan.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c)                                                        \
    do {                                                                  \
        if (!(c)) {                                                       \
            fprintf(stderr, "fuzz_json: property failed: %s\n", #c);      \
            abort();                                                      \
        }                                                                 \
    } while (0)

static void fuzz_response(const char *p, size_t n, size_t expected)
{
    char err[256];
    bg_resp r;
    for (int ep = 0; ep < 2; ep++) {
        int rc = bg_json_parse_response(p, n, (enum bg_endpoint)ep, expected, &r, err,
                                        sizeof(err));
        if (rc == 0) {
            REQUIRE(expected == 0 || r.n_choices == expected);
            for (size_t i = 0; i < r.n_choices; i++) {
                REQUIRE(r.choices[i].text != NULL);
                REQUIRE(r.choices[i].text_len <= n);
                REQUIRE(r.choices[i].text[r.choices[i].text_len] == '\0');
            }
            bg_resp_free(&r);
        } else {
            REQUIRE(r.choices == NULL && r.n_choices == 0);
            REQUIRE(strlen(err) < sizeof(err));
        }
    }
    int64_t count, mml;
    if (bg_json_parse_tokenize(p, n, &count, &mml, err, sizeof(err)) == 0)
        REQUIRE(count >= 0 && mml >= -1);
    else
        REQUIRE(count == -1 && strlen(err) > 0 && strlen(err) < sizeof(err));
}

static void fuzz_error_message(const char *p, size_t n, size_t max_len)
{
    char *m = bg_json_error_message(p, n, max_len);
    REQUIRE(m != NULL);
    size_t len = strlen(m);
    REQUIRE(len <= max_len + 3);
    for (size_t i = 0; i < len; i++)
        REQUIRE((unsigned char)m[i] >= 0x20 && (unsigned char)m[i] != 0x7f);
    free(m);
}

static int has_surrogate_escape(const char *p, size_t n)
{
    for (size_t i = 0; i + 3 < n; i++)
        if (p[i] == '\\' && p[i + 1] == 'u' && (p[i + 2] == 'd' || p[i + 2] == 'D') &&
            strchr("89abcdefABCDEF", p[i + 3]))
            return 1;
    return 0;
}

static void fuzz_template(const char *p, size_t n)
{
    const char *sep = memchr(p, 0xFF, n);
    size_t plen = sep ? (size_t)(sep - p) : n;
    const char *prompt = sep ? sep + 1 : "";
    size_t prlen = sep ? n - plen - 1 : 0;
    char err[300];
    bg_tmpl *t = bg_tmpl_new("fuzz-model", p, plen, err, sizeof(err));
    if (!t)
        return;
    bg_str s = {prompt, prlen};
    size_t blen = 0;
    char *body = bg_json_completions_body(t, &s, 1, false, &blen);
    REQUIRE(body != NULL);
    /* cJSON refuses unpaired surrogate escapes ("\udc00"), which JSON's
     * grammar allows (Python's json writes them for lone surrogates): only
     * then is it not an oracle. */
    cJSON *j = cJSON_ParseWithLength(body, blen);
    REQUIRE(cJSON_IsObject(j) || has_surrogate_escape(p, plen));
    int prompts = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, j) {
        if (it->string && strcmp(it->string, "prompt") == 0)
            prompts++;
    }
    REQUIRE(prompts == 1 || !j);
    /* Byte-exact round trip with our scanner (cJSON strings stop at NUL). */
    bg_js js;
    bg_buf key = {0}, val = {0};
    bg_js_init(&js, body, blen);
    int found = 0;
    for (int m = bg_js_obj_first(&js, &key); m == 1; m = bg_js_obj_more(&js, &key)) {
        if (bg_js_key_is(&key, "prompt")) {
            found++;
            REQUIRE(bg_js_string(&js, &val) == 0);
        } else {
            REQUIRE(bg_js_skip(&js) == 0);
        }
    }
    REQUIRE(bg_js_finish(&js) == 0 && found == 1);
    REQUIRE(val.len == prlen && (prlen == 0 || memcmp(val.data, prompt, prlen) == 0));
    bg_buf_free(&key);
    bg_buf_free(&val);
    cJSON_Delete(j);
    free(body);
    bg_tmpl_decref(t);
}

static void fuzz_messages(const char *p, size_t n)
{
    char err[300];
    if (bg_json_check_messages(p, n, err, sizeof(err)) != 0)
        return;
    bg_tmpl *t = bg_tmpl_new("m", NULL, 0, err, sizeof(err));
    REQUIRE(t != NULL);
    size_t blen = 0;
    char *body = bg_json_chat_body(t, p, n, &blen);
    REQUIRE(body != NULL);
    bg_js js;
    bg_js_init(&js, body, blen);
    REQUIRE(bg_js_skip(&js) == 0 && bg_js_finish(&js) == 0);
    free(body);
    bg_tmpl_decref(t);
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    if (size < 2)
        return 0;
    const char *p = (const char *)data + 2;
    size_t n = size - 2;
    switch (data[0] % 4) {
    case 0: fuzz_response(p, n, data[1] % 4); break;
    case 1: fuzz_error_message(p, n, 1 + data[1] % 64); break;
    case 2: fuzz_template(p, n); break;
    default: fuzz_messages(p, n); break;
    }
    return 0;
}
