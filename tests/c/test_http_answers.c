/* test_http_answers.c - the libcurl engine (bg_http) against tests/fake_vllm.py:
 * what answers mean. Success at a count cap, lists and chat, retryable
 * statuses and Retry-After, transport faults, malformed answers, headers and
 * per-call options. Usage: test_http_answers [path/to/fake_vllm.py]
 */
#define _GNU_SOURCE
#include "http_fixture.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_many_ok_and_cap(void)
{
    fixture fx;
    fx_open(&fx, 8, NULL, "{\"max_tokens\":8,\"temperature\":0}");
    const size_t n = 600;
    item *v = make_items(&fx, n, "prompt %d [[delay=0.005]]");
    bg_request **rs = malloc(n * sizeof(*rs));
    for (size_t i = 0; i < n; i++)
        rs[i] = &v[i].r;
    double t0 = now_s();
    CHECK(bg_engine_submit_many(fx.e, rs, n) == 0);
    CHECK(wait_done(&coll, n, 60));
    double dt = now_s() - t0;
    CHECK(coll.dup == 0);
    for (size_t i = 0; i < n; i++) {
        CHECK(v[i].seen == 1);
        expect_ok_text(&v[i]);
        CHECK(v[i].r.attempts == 1);
        CHECK(v[i].r.resp.usage.present && v[i].r.resp.usage.total_tokens > 0);
    }
    long maxc = stat_int("max_in_flight");
    long conns = stat_int("connections");
    printf("  %zu requests in %.2fs, server max_in_flight=%ld connections=%ld\n", n, dt, maxc,
           conns);
    CHECK(maxc >= 2 && maxc <= 8);
    CHECK(conns <= 8 + 2); /* keep-alive reuse (+2: the two stats requests) */
    bg_engine_stats st;
    bg_engine_get_stats(fx.e, &st);
    CHECK(st.submitted == n && st.completed == n && st.live == 0 && st.in_flight == 0);
    free(rs);
    fx_close(&fx);
    free_items(v, n);
}

/* Answers read on another thread go back to the engine's to be freed there
 * (bg_request_clear_into + bg_engine_give_back): one block per answer, freed
 * in the engine's next round, the rest when it is destroyed. */
static void test_give_back(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    const size_t n = 40;
    item *v = make_items(&fx, n, "give %d");
    for (size_t i = 0; i < n; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    CHECK(wait_done(&coll, n, 30));
    bg_spent sp = {0};
    for (size_t i = 0; i < n; i++) {
        CHECK(v[i].r.kind == BG_RES_OK && v[i].r.resp.mem != NULL);
        bg_request_clear_into(&v[i].r, &sp);
        CHECK(v[i].r.resp.mem == NULL && v[i].r.resp.n_choices == 0);
    }
    size_t listed = 0;
    for (void *m = sp.head; m; m = *(void **)m)
        listed++;
    CHECK(listed == n);
    CHECK(bg_engine_test_spent_freed(fx.e) == 0);
    bg_engine_give_back(fx.e, &sp);
    CHECK(sp.head == NULL && sp.tail == NULL);
    /* The next round frees them on the engine thread (no wake-up for it:
     * the resubmission below makes the round). */
    for (size_t i = 0; i < n; i++)
        CHECK(bg_engine_submit(fx.e, &v[i].r) == 0);
    CHECK(wait_done(&coll, 2 * n, 30));
    CHECK(bg_engine_test_spent_freed(fx.e) == n);
    /* Given back to a closed engine (its thread is gone): destroy frees them
     * (the leak checkers say). */
    bg_engine_close(fx.e);
    for (size_t i = 0; i < n; i += 2)
        bg_request_clear_into(&v[i].r, &sp);
    bg_engine_give_back(fx.e, &sp);
    bg_spent empty = {0};
    bg_engine_give_back(fx.e, &empty); /* nothing: no-op */
    fx_close(&fx);
    free_items(v, n);
}

static void test_list_and_chat(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    item *it = make_items(&fx, 1, "x");
    bg_str ps[3] = {{"alpha", 5}, {"beta", 4}, {"gamma", 5}};
    it->r.prompts = ps;
    it->r.n_prompts = 3;
    CHECK(bg_engine_submit(fx.e, &it->r) == 0);
    CHECK(wait_done(&coll, 1, 20));
    CHECK(it->r.kind == BG_RES_OK && it->r.resp.n_choices == 3);
    if (it->r.resp.n_choices == 3) {
        /* The fake answers in reverse order; choices come back by index. */
        CHECK(strcmp(it->r.resp.choices[0].text, "echo:alpha") == 0);
        CHECK(strcmp(it->r.resp.choices[2].text, "echo:gamma") == 0);
    }
    free_items(it, 1);

    it = make_items(&fx, 1, "x");
    const char *msgs = "[{\"role\":\"system\",\"content\":\"be brief\"},"
                       "{\"role\":\"user\",\"content\":\"hello\"}]";
    it->r.endpoint = BG_EP_CHAT;
    it->r.messages_json = msgs;
    it->r.messages_len = strlen(msgs);
    CHECK(bg_engine_submit(fx.e, &it->r) == 0);
    CHECK(wait_done(&coll, 2, 20));
    CHECK(it->r.kind == BG_RES_OK && it->r.resp.n_choices == 1 &&
          strcmp(it->r.resp.choices[0].text, "echo:hello") == 0);
    free_items(it, 1);
    fx_close(&fx);
}

static void test_retryable_statuses(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    static const int codes[] = {408, 429, 500, 502, 503, 504};
    for (size_t i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
        char p[100];
        snprintf(p, sizeof(p), "retry %d [[status=%d,times=2]]", codes[i], codes[i]);
        item *it = run_one(&fx, p);
        expect_ok_text(it);
        CHECK(it->r.attempts == 3);
        free_items(it, 1);
    }
    /* Retries exhausted: the last status and the server's message surface. */
    item *it = run_one(&fx, "always [[status=503,msg=engine sleeping]]");
    CHECK(it->r.kind == BG_RES_HTTP && it->r.status == 503 && it->r.attempts == 4);
    CHECK_CONTAINS(it->r.message, "engine sleeping");
    free_items(it, 1);
    /* 400 is final at once, with vLLM's message. */
    it = run_one(&fx, "long [[status=400,msg=maximum context length is 4096 tokens]]");
    CHECK(it->r.kind == BG_RES_HTTP && it->r.status == 400 && it->r.attempts == 1);
    CHECK_CONTAINS(it->r.message, "maximum context length is 4096 tokens");
    free_items(it, 1);
    it = run_one(&fx, "unauth [[status=401]]");
    CHECK(it->r.kind == BG_RES_HTTP && it->r.status == 401 && it->r.attempts == 1);
    free_items(it, 1);
    fx_close(&fx);
}

static void test_retry_after(void)
{
    fixture fx;
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.backoff_base_s = 0.01;
    c.retry_after_max_s = 1.5;
    fx_open(&fx, 4, &c, NULL);
    double t0 = now_s();
    item *it = run_one(&fx, "ra [[status=429,retry_after=1,times=1]]");
    double dt = now_s() - t0;
    expect_ok_text(it);
    CHECK(it->r.attempts == 2 && dt >= 0.95 && dt < 5);
    free_items(it, 1);
    /* An HTTP date: at least one whole second ahead. */
    t0 = now_s();
    it = run_one(&fx, "rad [[status=503,retry_after_date=2,times=1]]");
    dt = now_s() - t0;
    expect_ok_text(it);
    CHECK(it->r.attempts == 2 && dt >= 0.9 && dt < 5);
    free_items(it, 1);
    /* Capped: the server asks for 100 s, the engine waits retry_after_max_s. */
    t0 = now_s();
    it = run_one(&fx, "racap [[status=503,retry_after=100,times=1]]");
    dt = now_s() - t0;
    expect_ok_text(it);
    CHECK(dt >= 1.4 && dt < 5);
    free_items(it, 1);
    fx_close(&fx);
}

/* With a cap of 1, a request backing off must not hold the only permit. */
static void test_permit_released_during_backoff(void)
{
    fixture fx;
    fx_open(&fx, 1, NULL, NULL);
    item *v = make_items(&fx, 2, "b%d");
    snprintf(v[0].text, sizeof(v[0].text), "slow [[status=503,retry_after=1,times=1]]");
    v[0].p.len = strlen(v[0].text);
    CHECK(bg_engine_submit(fx.e, &v[0].r) == 0);
    usleep(200 * 1000); /* A got its 503 and now waits ~1 s */
    double t0 = now_s();
    CHECK(bg_engine_submit(fx.e, &v[1].r) == 0);
    CHECK(wait_done(&coll, 1, 10));
    CHECK(now_s() - t0 < 0.5); /* B ran while A was backing off */
    CHECK(v[1].seen == 1 && v[0].seen == 0);
    CHECK(wait_done(&coll, 2, 10));
    expect_ok_text(&v[0]);
    expect_ok_text(&v[1]);
    CHECK(v[0].r.attempts == 2);
    fx_close(&fx);
    free_items(v, 2);
}

static void test_transport_faults(void)
{
    fixture fx;
    fx_open(&fx, 4, NULL, NULL);
    /* On a fresh engine (no pooled connection) each fault costs exactly one
     * retry of ours. */
    item *it = run_one(&fx, "c [[fault=close,times=1]]");
    expect_ok_text(it);
    CHECK(it->r.attempts == 2);
    free_items(it, 1);
    static const char *const once[] = {"a [[fault=reset,times=1]]", "b [[fault=truncate,times=1]]"};
    for (size_t i = 0; i < 2; i++) {
        it = run_one(&fx, once[i]);
        expect_ok_text(it);
        CHECK(it->r.attempts == 2);
        if (it->r.attempts != 2)
            fprintf(stderr, "  %s: attempts=%d\n", once[i], it->r.attempts);
        free_items(it, 1);
    }
    /* A reused keep-alive connection closed before any byte of the answer:
     * libcurl itself retries once on a new connection, so our attempt count
     * stays 1 while the server sees the request twice. */
    free_items(run_one(&fx, "warm"), 1);
    long before = stat_int("requests");
    it = run_one(&fx, "c2 [[fault=close,times=1]]");
    expect_ok_text(it);
    CHECK(it->r.attempts == 1 && stat_int("requests") - before == 2);
    free_items(it, 1);
    it = run_one(&fx, "d [[fault=reset]]");
    CHECK(it->r.kind == BG_RES_TRANSPORT && it->r.attempts == 4 && it->r.curl_code != 0);
    CHECK_CONTAINS(it->r.message, "curl error");
    free_items(it, 1);
    fx_close(&fx);

    /* Connection refused: a port nobody listens on. */
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.backoff_base_s = 0.01;
    c.max_retries = 1;
    int saved = server_port;
    char saved_url[64];
    memcpy(saved_url, base_url, sizeof(saved_url));
    snprintf(base_url, sizeof(base_url), "http://127.0.0.1:1/v1");
    fixture fx2;
    fx_open(&fx2, 2, &c, NULL);
    it = make_items(&fx2, 1, "refused");
    CHECK(bg_engine_submit(fx2.e, &it->r) == 0);
    CHECK(wait_done(&coll, 1, 20));
    CHECK(it->r.kind == BG_RES_TRANSPORT && it->r.attempts == 2 &&
          it->r.curl_code == CURLE_COULDNT_CONNECT);
    free_items(it, 1);
    fx_close(&fx2);
    memcpy(base_url, saved_url, sizeof(saved_url));
    server_port = saved;
}

static void test_malformed(void)
{
    fixture fx;
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.backoff_base_s = 0.01;
    c.max_response_bytes = 1 << 20;
    c.timeout_ms = 1500; /* stalls time out; slow answers on a loaded box do not */
    fx_open(&fx, 4, &c, NULL);
    static const struct {
        const char *prompt;
        int kind;
        const char *needle;
    } cases[] = {
        {"[[fault=nonjson]]", BG_RES_MALFORMED, "not JSON"},
        {"[[shape=notobj]]", BG_RES_MALFORMED, "must be a JSON object"},
        {"[[shape=nochoices]]", BG_RES_MALFORMED, "no \"choices\""},
        {"[[shape=choices_obj]]", BG_RES_MALFORMED, "must be a list"},
        {"[[shape=text_int]]", BG_RES_MALFORMED, "[\"text\"] must be a string, got number"},
        {"[[shape=index_oob]]", BG_RES_MALFORMED, "out of range"},
        {"[[shape=index_str]]", BG_RES_MALFORMED, "must be an integer"},
        {"[[shape=fewer]]", BG_RES_MALFORMED, "0 choices, expected 1"},
        {"[[shape=extra]]", BG_RES_MALFORMED, "2 choices, expected 1"},
        {"[[shape=choice_str]]", BG_RES_MALFORMED, "must be an object"},
        {"[[shape=finish_int]]", BG_RES_MALFORMED, "finish_reason"},
        {"[[shape=usage_str]]", BG_RES_MALFORMED, "usage"},
        {"[[shape=error200]]", BG_RES_MALFORMED, "engine overloaded"},
        {"[[fault=oversize,size=3000000]]", BG_RES_MALFORMED, "max_response_bytes"},
        {"[[fault=stall]]", BG_RES_TIMEOUT, "timed out"},
        {"[[fault=stall_body]]", BG_RES_TIMEOUT, "timed out"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        coll_reset();
        item *it = run_one(&fx, cases[i].prompt);
        CHECK(it->r.kind == cases[i].kind);
        if (it->r.kind != cases[i].kind)
            fprintf(stderr, "  %s: kind=%s msg=%s\n", cases[i].prompt,
                    bg_result_kind_name(it->r.kind), it->r.message ? it->r.message : "");
        CHECK(it->r.attempts == 1);
        CHECK_CONTAINS(it->r.message, cases[i].needle);
        free_items(it, 1);
    }
    /* index_dup needs two prompts. */
    coll_reset();
    item *it = make_items(&fx, 1, "x");
    bg_str ps[2] = {{"p0 [[shape=index_dup]]", 22}, {"p1", 2}};
    it->r.prompts = ps;
    it->r.n_prompts = 2;
    CHECK(bg_engine_submit(fx.e, &it->r) == 0);
    CHECK(wait_done(&coll, 1, 20));
    CHECK(it->r.kind == BG_RES_MALFORMED);
    CHECK_CONTAINS(it->r.message, "repeats index");
    free_items(it, 1);
    fx_close(&fx);
}

static void test_headers_and_body_passthrough(void)
{
    fixture fx;
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    const char *hdrs[] = {"X-Test: yes"};
    c.api_key = "sk-secret";
    c.headers = hdrs;
    c.n_headers = 1;
    fx_open(&fx, 2, &c,
            "{\"seed\":12345678901234567,\"guided_json\":{\"type\":\"object\"},"
            "\"response_format\":{\"type\":\"json_object\"},\"temperature\":0.25}");
    item *it = run_one(&fx, "hdr");
    expect_ok_text(it);
    free_items(it, 1);
    char *s = control("/_stats", false);
    CHECK_CONTAINS(s, "\"authorization\": \"Bearer sk-secret\"");
    CHECK_CONTAINS(s, "\"x-test\": \"yes\"");
    CHECK_CONTAINS(s, "\"seed\": 12345678901234567");
    CHECK_CONTAINS(s, "\"guided_json\": {\"type\": \"object\"}");
    CHECK_CONTAINS(s, "\"response_format\": {\"type\": \"json_object\"}");
    CHECK_CONTAINS(s, "\"model\": \"fake-model\"");
    free(s);
    fx_close(&fx);
}

/* Per-call options: retries, attempt timeout, replaced headers, query and
 * keeping the answer's bytes, on one engine alongside plain requests. */
static item *run_with(fixture *fx, const char *prompt, const bg_req_opts *o)
{
    item *it = make_items(fx, 1, "%d");
    snprintf(it->text, sizeof(it->text), "%s", prompt);
    it->p.len = strlen(it->text);
    it->r.opts = o;
    size_t before = coll.done;
    CHECK(bg_engine_submit(fx->e, &it->r) == 0);
    CHECK(wait_done(&coll, before + 1, 30));
    return it;
}

static void test_per_request_options(void)
{
    fixture fx;
    bg_engine_config c;
    bg_engine_config_defaults(&c);
    c.api_key = "sk-engine";
    c.max_retries = 3;
    c.backoff_base_s = 0.01;
    c.backoff_max_s = 0.02;
    c.timeout_ms = 30000;
    fx_open(&fx, 2, &c, NULL);
    char err[200];
    const char *hdrs[] = {"authorization: Bearer sk-call", "X-Call: 1"};
    bg_req_opts_spec sp = {.timeout_ms = 300, .max_retries = 0, .headers = hdrs,
                           .n_headers = 2, .keep_raw = true};
    bg_req_opts *o = bg_req_opts_new(fx.e, &sp, err, sizeof(err));
    CHECK(o != NULL);
    const char *bad[] = {"X-Bad: a\r\nX-Evil: b"};
    bg_req_opts_spec spb = {.timeout_ms = -1, .max_retries = -1, .headers = bad, .n_headers = 1};
    CHECK(bg_req_opts_new(fx.e, &spb, err, sizeof(err)) == NULL);
    bg_req_opts_spec spq = {.timeout_ms = -1, .max_retries = -1, .query = "a=1 2"};
    CHECK(bg_req_opts_new(fx.e, &spq, err, sizeof(err)) == NULL);

    item *it = run_with(&fx, "fail [[status=503]]", o);
    CHECK(it->r.kind == BG_RES_HTTP && it->r.attempts == 1); /* the call's 0 retries */
    free_items(it, 1);
    it = run_with(&fx, "fail2 [[status=503,times=2]]", NULL);
    CHECK(it->r.kind == BG_RES_OK && it->r.attempts == 3 && it->r.raw == NULL);
    CHECK(it->r.retry_status == 503 && it->r.retry_wait_s > 0);
    free_items(it, 1);
    double t0 = now_s();
    it = run_with(&fx, "slow [[delay=3]]", o);
    CHECK(it->r.kind == BG_RES_TIMEOUT && now_s() - t0 < 2.5);
    free_items(it, 1);
    it = run_with(&fx, "keep", o);
    expect_ok_text(it);
    CHECK(it->r.raw && it->r.raw_len == strlen(it->r.raw) && strstr(it->r.raw, "echo:keep"));
    free_items(it, 1);
    char *s = control("/_stats", false);
    CHECK_CONTAINS(s, "\"authorization\": \"Bearer sk-call\"");
    CHECK_CONTAINS(s, "\"x-call\": \"1\"");
    free(s);
    it = run_with(&fx, "plain", NULL);
    expect_ok_text(it);
    free_items(it, 1);
    s = control("/_stats", false);
    CHECK_CONTAINS(s, "\"authorization\": \"Bearer sk-engine\"");
    CHECK(strstr(s, "x-call") == NULL);
    free(s);
    fx_close(&fx);
    bg_req_opts_free(o);
}

int main(int argc, char **argv)
{
    static const test_case tests[] = {
        {"many_ok_and_cap", test_many_ok_and_cap},
        {"give_back", test_give_back},
        {"list_and_chat", test_list_and_chat},
        {"retryable_statuses", test_retryable_statuses},
        {"retry_after", test_retry_after},
        {"permit_released_during_backoff", test_permit_released_during_backoff},
        {"transport_faults", test_transport_faults},
        {"malformed", test_malformed},
        {"headers_and_body_passthrough", test_headers_and_body_passthrough},
        {"per_request_options", test_per_request_options},
    };
    return run_tests("test_http_answers", tests, sizeof(tests) / sizeof(tests[0]), argc, argv);
}
