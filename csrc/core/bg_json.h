/* bg_json.h - request/response codec for the OpenAI-compatible API.
 *
 * Pure C (no Python.h); runs on the engine thread without the GIL.
 *
 * Requests: the per-call fields (model, sampling params, guided_json, ...)
 * are validated once into a bg_tmpl; each request body is then that template
 * plus the prompt(s) or messages, written with a plain string builder so a
 * million prompts do not cost a million cJSON trees.
 *
 * Responses: scanned in one pass (bg_json_scan.h: no tree, no global state)
 * into plain C structs, choices ordered by their "index".
 */
#ifndef BATCHGATE_BG_JSON_H
#define BATCHGATE_BG_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum bg_endpoint {
    BG_EP_COMPLETIONS = 0, /* POST {base}/completions, "prompt" */
    BG_EP_CHAT = 1,        /* POST {base}/chat/completions, "messages" */
    BG_EP_TOKENIZE = 2,    /* POST {server root}/tokenize, "prompt" or "messages" (vLLM) */
};

/* Shared, immutable body template: the caller's fields serialized once.
 * Reference counted (atomically) so requests on any thread can share it. */
typedef struct bg_tmpl {
    char *prefix;        /* "{" or "{\"model\":\"m\"," */
    size_t prefix_len;
    char *suffix;        /* "}" or ",<caller fields>}" */
    size_t suffix_len;
    int64_t n_per_prompt; /* the "n" field, 1 if absent */
    int64_t max_tokens;   /* "max_tokens"/"max_completion_tokens", -1 if absent */
    int refcnt;           /* atomic */
} bg_tmpl;

/* Build a template. model may be NULL/"" (then the body has no "model" unless
 * extra_json has one; a "model" in extra_json wins). extra_json is NULL, "" or
 * a serialized JSON object whose fields are copied unchanged; it is checked
 * as strict JSON first (one object, nothing after it), so no params text can
 * close the body's object early. For repeated keys the last one counts, as
 * in the server's Python json. Rejected:
 * non-objects, "prompt"/"messages" fields (they are per request), "stream":
 * true (not supported), a non-positive integer "n". Returns NULL with a
 * message in err on error. */
bg_tmpl *bg_tmpl_new(const char *model, const char *extra_json, size_t extra_len,
                     char *err, size_t errlen);
void bg_tmpl_incref(bg_tmpl *t);
void bg_tmpl_decref(bg_tmpl *t);

typedef struct {
    const char *ptr; /* UTF-8, not NUL-terminated necessarily */
    size_t len;
} bg_str;

/* Completions body: one prompt ("prompt": "...") when as_list is false and
 * n == 1, else a list. Returns malloc'd NUL-terminated body, length in
 * *out_len, or NULL on out of memory. */
char *bg_json_completions_body(const bg_tmpl *t, const bg_str *prompts, size_t n,
                               bool as_list, size_t *out_len);

/* Chat body. messages_json must be a serialized JSON array (copied as is;
 * validate it with bg_json_check_messages first if it is untrusted). */
char *bg_json_chat_body(const bg_tmpl *t, const char *messages_json, size_t mlen,
                        size_t *out_len);

/* 0 if s is a JSON array of objects, each with a string "role"; else -1 and a
 * message naming the bad item. */
int bg_json_check_messages(const char *s, size_t len, char *err, size_t errlen);

/* Append s as a JSON string literal (quotes included) to a growable buffer.
 * Returns 0 or -1 on out of memory. Exposed for tests and the binding. */
typedef struct {
    char *data;
    size_t len, cap;
} bg_buf;
int bg_buf_reserve(bg_buf *b, size_t extra);
int bg_buf_append(bg_buf *b, const char *s, size_t n);
int bg_buf_append_json_string(bg_buf *b, const char *s, size_t n);
void bg_buf_free(bg_buf *b);

typedef struct {
    char *text;          /* owned, NUL-terminated; "" for a null chat content; may
                            contain NUL ("\u0000"): text_len is the length */
    size_t text_len;
    char *finish_reason; /* owned or NULL (JSON null / absent) */
    /* Kept only when the server sent them (rare, so no cost otherwise):
     * serialized JSON, owned, NULL when absent, null or empty. */
    char *tool_calls_json; /* chat: message.tool_calls (a list) */
    char *logprobs_json;   /* choice.logprobs */
} bg_choice;

typedef struct {
    bool present;
    int64_t prompt_tokens, completion_tokens, total_tokens; /* -1 if missing */
} bg_usage;

typedef struct {
    bg_choice *choices; /* n_choices entries, choices[i] has "index" == i */
    size_t n_choices;
    bg_usage usage;
    char *id;    /* owned: top-level "id" string, or NULL */
    char *model; /* owned: top-level "model" string, or NULL */
    /* After a successful parse: one block holding the choices and every
     * string above (NULL if there is nothing, or packing ran out of memory
     * and each is its own allocation). A consumer on another thread then
     * frees one block per answer, not five or more. */
    void *mem;
} bg_resp;

/* Parse a 2xx body: strict JSON, one object and nothing after it but
 * whitespace. expected = number of choices the request must produce
 * (prompts * n); 0 means "whatever is there" (still 0..k-1, no gaps, no
 * duplicates). Returns 0, or -1 with a precise message in err and *out
 * zeroed. Thread-safe: no global state. */
int bg_json_parse_response(const char *body, size_t len, enum bg_endpoint ep,
                           size_t expected, bg_resp *out, char *err, size_t errlen);
void bg_resp_free(bg_resp *r);
/* The packed block, taken out of r (r is left empty): free it later, or on
 * another thread. NULL if r is not packed (then use bg_resp_free). */
void *bg_resp_take_mem(bg_resp *r);

/* vLLM's /tokenize answer, {"count": n, "max_model_len": m, "tokens": [...],
 * ...}: strict JSON, one object. *count gets "count" (or the length of
 * "tokens" if the server sent no count); *max_model_len gets
 * "max_model_len", -1 if absent. Returns 0, or -1 with a message in err. */
int bg_json_parse_tokenize(const char *body, size_t len, int64_t *count,
                           int64_t *max_model_len, char *err, size_t errlen);

/* cJSON_ParseWithLengthOpts (no NUL required, trailing data allowed; *end,
 * if given, is where parsing stopped or failed) under a process-wide lock
 * (cJSON keeps its last error in a global), made safe across fork() with
 * pthread_atfork. For tests and tools: the library's own parsing uses the
 * lock-free scanner in bg_json_scan.h. */
struct cJSON *bg_json_parse(const char *s, size_t len, const char **end);

/* Server message of an error body: {"error": {"message": m}}, {"error": m},
 * {"message": m}, {"detail": m}; otherwise the start of the body itself.
 * Control characters (NUL included) become spaces; at most max_len bytes,
 * cut on a UTF-8 character boundary, then "..." if cut. The bytes are the
 * server's: they may still be invalid UTF-8 (decode with replacement).
 * Returns a malloc'd string (never NULL unless out of memory). */
char *bg_json_error_message(const char *body, size_t len, size_t max_len);

/* Drop a trailing incomplete UTF-8 sequence from a NUL-terminated string
 * (what a byte-limited snprintf leaves when it cuts inside a character). */
void bg_utf8_trim(char *s);

#ifdef __cplusplus
}
#endif
#endif /* BATCHGATE_BG_JSON_H */
