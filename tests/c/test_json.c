/* test_json.c - the request/response codec (bg_json), no network. */
#define _GNU_SOURCE
#include "bg_json.h"
#include "check.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void test_escape(void)
{
    bg_buf b = {0};
    const char in[] = "a\"b\\c\n\t\x01\xc3\xa9z";
    CHECK(bg_buf_append_json_string(&b, in, sizeof(in) - 1) == 0);
    CHECK(strcmp(b.data, "\"a\\\"b\\\\c\\n\\t\\u0001\xc3\xa9z\"") == 0);
    /* Round trip through cJSON. */
    cJSON *v = bg_json_parse(b.data, b.len, NULL);
    CHECK(cJSON_IsString(v) && strcmp(v->valuestring, in) == 0);
    cJSON_Delete(v);
    bg_buf_free(&b);
}

static void test_template_and_bodies(void)
{
    char err[256];
    const char *extra = " { \"temperature\": 0.5, \"seed\": 12345678901234567, "
                        "\"guided_json\": {\"type\": \"object\"}, \"max_tokens\": 64 } ";
    bg_tmpl *t = bg_tmpl_new("qwen", extra, strlen(extra), err, sizeof(err));
    CHECK(t != NULL);
    if (!t)
        return;
    CHECK(t->max_tokens == 64 && t->n_per_prompt == 1);
    bg_str p[2] = {{"hi \"there\"", 10}, {"second", 6}};
    size_t len = 0;
    char *body = bg_json_completions_body(t, p, 1, false, &len);
    CHECK(body && len == strlen(body));
    /* Big integers pass through as written (not rounded through a double). */
    CHECK_CONTAINS(body, "12345678901234567");
    cJSON *j = bg_json_parse(body, strlen(body), NULL);
    CHECK(cJSON_IsObject(j));
    CHECK(strcmp(cJSON_GetObjectItem(j, "model")->valuestring, "qwen") == 0);
    CHECK(strcmp(cJSON_GetObjectItem(j, "prompt")->valuestring, "hi \"there\"") == 0);
    CHECK(cJSON_GetObjectItem(j, "temperature")->valuedouble == 0.5);
    CHECK(cJSON_IsObject(cJSON_GetObjectItem(j, "guided_json")));
    cJSON_Delete(j);
    free(body);

    body = bg_json_completions_body(t, p, 2, false, &len);
    j = bg_json_parse(body, strlen(body), NULL);
    cJSON *arr = cJSON_GetObjectItem(j, "prompt");
    CHECK(cJSON_IsArray(arr) && cJSON_GetArraySize(arr) == 2);
    cJSON_Delete(j);
    free(body);

    body = bg_json_completions_body(t, p, 1, true, &len);
    j = bg_json_parse(body, strlen(body), NULL);
    CHECK(cJSON_IsArray(cJSON_GetObjectItem(j, "prompt")));
    cJSON_Delete(j);
    free(body);

    const char *msgs = "[{\"role\":\"user\",\"content\":\"hey\"}]";
    CHECK(bg_json_check_messages(msgs, strlen(msgs), err, sizeof(err)) == 0);
    body = bg_json_chat_body(t, msgs, strlen(msgs), &len);
    j = bg_json_parse(body, strlen(body), NULL);
    CHECK(cJSON_IsArray(cJSON_GetObjectItem(j, "messages")));
    cJSON_Delete(j);
    free(body);
    bg_tmpl_decref(t);

    /* No extras, no model: just the prompt. */
    t = bg_tmpl_new(NULL, NULL, 0, err, sizeof(err));
    body = bg_json_completions_body(t, p, 1, false, &len);
    CHECK(strcmp(body, "{\"prompt\":\"hi \\\"there\\\"\"}") == 0);
    free(body);
    bg_tmpl_decref(t);

    /* A model in the params wins over the argument. */
    const char *m2 = "{\"model\":\"other\",\"n\":3}";
    t = bg_tmpl_new("qwen", m2, strlen(m2), err, sizeof(err));
    CHECK(t && t->n_per_prompt == 3);
    body = bg_json_completions_body(t, p, 1, false, &len);
    j = bg_json_parse(body, strlen(body), NULL);
    CHECK(strcmp(cJSON_GetObjectItem(j, "model")->valuestring, "other") == 0);
    cJSON_Delete(j);
    free(body);
    bg_tmpl_decref(t);
}

static void expect_tmpl_error(const char *extra, const char *needle)
{
    char err[256] = "";
    bg_tmpl *t = bg_tmpl_new("m", extra, strlen(extra), err, sizeof(err));
    CHECK(t == NULL);
    bg_tmpl_decref(t);
    CHECK_CONTAINS(err, needle);
}

static void test_template_errors(void)
{
    expect_tmpl_error("[1]", "must be a JSON object, got list");
    expect_tmpl_error("{\"a\":", "not valid JSON");
    expect_tmpl_error("{} x", "trailing data");
    expect_tmpl_error("{\"prompt\":\"x\"}", "\"prompt\"");
    expect_tmpl_error("{\"messages\":[]}", "\"messages\"");
    expect_tmpl_error("{\"stream\":true}", "stream");
    expect_tmpl_error("{\"n\":0}", "\"n\"");
    expect_tmpl_error("{\"model\":5}", "\"model\" must be a string");
    expect_tmpl_error("{\"max_tokens\":\"ten\"}", "max_tokens");
    char err[256];
    CHECK(bg_json_check_messages("{}", 2, err, sizeof(err)) < 0);
    CHECK_CONTAINS(err, "must be a list");
    CHECK(bg_json_check_messages("[{\"content\":\"x\"}]", 17, err, sizeof(err)) < 0);
    CHECK_CONTAINS(err, "messages[0][\"role\"]");
    CHECK(bg_json_check_messages("[]", 2, err, sizeof(err)) < 0);
}

static void expect_parse_error(const char *body, enum bg_endpoint ep, size_t expected,
                               const char *want);

/* openai-shaped extras: id, model, tool calls and logprobs kept only when sent. */
static void test_parse_openai_fields(void)
{
    char err[256];
    bg_resp r;
    const char *b = "{\"id\":\"chatcmpl-1\",\"model\":\"m\",\"choices\":[{\"index\":0,"
                    "\"message\":{\"role\":\"assistant\",\"content\":null,\"tool_calls\":"
                    "[{\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\","
                    "\"arguments\":\"{\\\"a\\\":1}\"}}]},\"logprobs\":{\"content\":[]},"
                    "\"finish_reason\":\"tool_calls\"}]}";
    CHECK(bg_json_parse_response(b, strlen(b), BG_EP_CHAT, 1, &r, err, sizeof(err)) == 0);
    CHECK(r.id && strcmp(r.id, "chatcmpl-1") == 0 && r.model && strcmp(r.model, "m") == 0);
    CHECK(r.n_choices == 1 && r.choices[0].tool_calls_json &&
          strstr(r.choices[0].tool_calls_json, "\"arguments\":\"{\\\"a\\\":1}\""));
    CHECK(r.choices[0].logprobs_json &&
          strcmp(r.choices[0].logprobs_json, "{\"content\":[]}") == 0);
    bg_resp_free(&r);
    const char *c = "{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":\"x\","
                    "\"tool_calls\":[]},\"logprobs\":null}]}";
    CHECK(bg_json_parse_response(c, strlen(c), BG_EP_CHAT, 1, &r, err, sizeof(err)) == 0);
    CHECK(!r.id && !r.model && !r.choices[0].tool_calls_json && !r.choices[0].logprobs_json);
    bg_resp_free(&r);
    expect_parse_error("{\"choices\":[{\"message\":{\"role\":\"assistant\",\"content\":null,"
                       "\"tool_calls\":\"f()\"}}]}",
                       BG_EP_CHAT, 1, "[\"tool_calls\"] must be a list, got string");
}

static void test_parse_ok(void)
{
    char err[256];
    bg_resp r;
    const char *b = "{\"choices\":[{\"index\":1,\"text\":\"B\",\"finish_reason\":\"length\"},"
                    "{\"index\":0,\"text\":\"A\",\"finish_reason\":null}],"
                    "\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}";
    CHECK(bg_json_parse_response(b, strlen(b), BG_EP_COMPLETIONS, 2, &r, err, sizeof(err)) == 0);
    CHECK(r.n_choices == 2);
    CHECK(strcmp(r.choices[0].text, "A") == 0 && r.choices[0].finish_reason == NULL);
    CHECK(strcmp(r.choices[1].text, "B") == 0 &&
          strcmp(r.choices[1].finish_reason, "length") == 0);
    CHECK(r.usage.present && r.usage.prompt_tokens == 3 && r.usage.completion_tokens == 4 &&
          r.usage.total_tokens == 7);
    bg_resp_free(&r);

    const char *c = "{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
                    "\"content\":null},\"finish_reason\":\"tool_calls\"}]}";
    CHECK(bg_json_parse_response(c, strlen(c), BG_EP_CHAT, 1, &r, err, sizeof(err)) == 0);
    CHECK(r.n_choices == 1 && strcmp(r.choices[0].text, "") == 0 && !r.usage.present);
    bg_resp_free(&r);

    /* A repeated "content": the last one wins, and a null one leaves no old text
     * behind the terminator (found by fuzz_json). */
    const char *d = "{\"choices\":[{\"message\":{\"content\":\"old\"},"
                    "\"message\":{\"content\":null}}]}";
    CHECK(bg_json_parse_response(d, strlen(d), BG_EP_CHAT, 1, &r, err, sizeof(err)) == 0);
    CHECK(r.n_choices == 1 && r.choices[0].text_len == 0 && r.choices[0].text[0] == '\0');
    bg_resp_free(&r);
}

/* A parsed answer lives in one block (choices first, then every string), so
 * the thread that reads it frees one allocation; take_mem hands it over. */
static int in_block(const bg_resp *r, const void *p)
{
    const char *m = r->mem;
    return p && (const char *)p >= m + r->n_choices * sizeof(bg_choice) &&
           (const char *)p < m + 4096;
}

static void test_parse_packed(void)
{
    char err[256];
    bg_resp r;
    const char *b = "{\"id\":\"cmpl-7\",\"model\":\"m1\",\"choices\":[{\"index\":1,"
                    "\"text\":\"B\\u0000b\",\"finish_reason\":\"length\",\"logprobs\":"
                    "{\"tokens\":[\"B\"]}},{\"index\":0,\"text\":\"A\",\"finish_reason\":null}]}";
    CHECK(bg_json_parse_response(b, strlen(b), BG_EP_COMPLETIONS, 2, &r, err, sizeof(err)) == 0);
    CHECK(r.mem != NULL && (void *)r.choices == r.mem && r.n_choices == 2);
    if (!r.mem)
        return;
    CHECK(in_block(&r, r.choices[0].text) && strcmp(r.choices[0].text, "A") == 0);
    CHECK(in_block(&r, r.choices[1].text) && r.choices[1].text_len == 3 &&
          memcmp(r.choices[1].text, "B\0b", 4) == 0);
    CHECK(!r.choices[0].finish_reason && in_block(&r, r.choices[1].finish_reason) &&
          strcmp(r.choices[1].finish_reason, "length") == 0);
    CHECK(in_block(&r, r.choices[1].logprobs_json) &&
          strcmp(r.choices[1].logprobs_json, "{\"tokens\":[\"B\"]}") == 0);
    CHECK(in_block(&r, r.id) && strcmp(r.id, "cmpl-7") == 0);
    CHECK(in_block(&r, r.model) && strcmp(r.model, "m1") == 0);
    void *m = bg_resp_take_mem(&r);
    CHECK(m != NULL && !r.mem && !r.choices && r.n_choices == 0 && !r.id && !r.model);
    CHECK(bg_resp_take_mem(&r) == NULL);
    bg_resp_free(&r); /* empty: nothing left to free */
    free(m);

    /* Nothing to keep (no choices, no id or model): no block at all. */
    const char *e = "{\"choices\":[]}";
    CHECK(bg_json_parse_response(e, strlen(e), BG_EP_COMPLETIONS, 0, &r, err, sizeof(err)) == 0);
    CHECK(r.n_choices == 0 && r.mem == NULL && bg_resp_take_mem(&r) == NULL);
    bg_resp_free(&r);
}

static void expect_parse_error(const char *body, enum bg_endpoint ep, size_t expected,
                               const char *needle)
{
    char err[256] = "";
    bg_resp r;
    CHECK(bg_json_parse_response(body, strlen(body), ep, expected, &r, err, sizeof(err)) < 0);
    CHECK(r.choices == NULL && r.n_choices == 0);
    CHECK_CONTAINS(err, needle);
}

static void test_parse_errors(void)
{
    const enum bg_endpoint C = BG_EP_COMPLETIONS;
    expect_parse_error("<html>oops</html>", C, 1, "not JSON");
    expect_parse_error("", C, 1, "not JSON");
    expect_parse_error("{\"choices\":[{\"index\":0,\"text\":\"a\"}", C, 1, "not JSON");
    expect_parse_error("[1,2]", C, 1, "must be a JSON object, got list");
    expect_parse_error("{\"id\":1}", C, 1, "no \"choices\"");
    expect_parse_error("{\"error\":{\"message\":\"overloaded\"}}", C, 1, "overloaded");
    expect_parse_error("{\"choices\":{}}", C, 1, "must be a list, got object");
    expect_parse_error("{\"choices\":[]}", C, 1, "0 choices, expected 1");
    expect_parse_error("{\"choices\":[\"x\"]}", C, 1, "choices[0] must be an object, got string");
    expect_parse_error("{\"choices\":[{\"index\":0,\"text\":5}]}", C, 1,
                       "choices[0][\"text\"] must be a string, got number");
    expect_parse_error("{\"choices\":[{\"index\":0}]}", C, 1,
                       "choices[0][\"text\"] must be a string, got missing");
    expect_parse_error("{\"choices\":[{\"index\":\"0\",\"text\":\"a\"}]}", C, 1,
                       "[\"index\"] must be an integer, got string");
    expect_parse_error("{\"choices\":[{\"index\":0.5,\"text\":\"a\"}]}", C, 1,
                       "must be an integer");
    expect_parse_error("{\"choices\":[{\"index\":3,\"text\":\"a\"}]}", C, 1,
                       "index 3, out of range 0..0");
    expect_parse_error("{\"choices\":[{\"index\":0,\"text\":\"a\"},{\"index\":0,\"text\":\"b\"}]}",
                       C, 2, "choices[1] repeats index 0");
    expect_parse_error("{\"choices\":[{\"index\":0,\"text\":\"a\",\"finish_reason\":7}]}", C, 1,
                       "finish_reason");
    expect_parse_error("{\"choices\":[{\"index\":0,\"text\":\"a\"}],\"usage\":\"x\"}", C, 1,
                       "\"usage\" must be an object");
    expect_parse_error("{\"choices\":[{\"index\":0,\"message\":\"hi\"}]}", BG_EP_CHAT, 1,
                       "[\"message\"] must be an object, got string");
    expect_parse_error("{\"choices\":[{\"index\":0,\"message\":{\"content\":1}}]}", BG_EP_CHAT,
                       1, "[\"message\"][\"content\"] must be a string, got number");
}

static void expect_msg(const char *body, const char *want)
{
    char *m = bg_json_error_message(body, strlen(body), 50);
    CHECK(m && strcmp(m, want) == 0);
    if (m && strcmp(m, want) != 0)
        fprintf(stderr, "  got \"%s\", want \"%s\"\n", m, want);
    free(m);
}

static void test_error_messages(void)
{
    expect_msg("{\"error\":{\"message\":\"This model's maximum context length is 4096\"}}",
               "This model's maximum context length is 4096");
    expect_msg("{\"object\":\"error\",\"message\":\"bad\",\"code\":400}", "bad");
    expect_msg("{\"error\":\"plain\"}", "plain");
    expect_msg("{\"detail\":\"Not Found\"}", "Not Found");
    expect_msg("{\"detail\":[{\"loc\":1}]}", "[{\"loc\":1}]");
    expect_msg("<html>\n502</html>", "<html> 502</html>");
    expect_msg("", "");
    char big[200];
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    char *m = bg_json_error_message(big, strlen(big), 50);
    CHECK(m && strlen(m) == 53 && strcmp(m + 50, "...") == 0);
    free(m);
}

/* Found under fault injection (issue 9): each of these was wrong once. */
static void test_hardening(void)
{
    char err[256];
    bg_resp r;
    /* \u0000 inside an answer is kept: the length is not taken with strlen. */
    const char *nul = "{\"choices\":[{\"index\":0,\"text\":\"a\\u0000b\"}]}";
    CHECK(bg_json_parse_response(nul, strlen(nul), BG_EP_COMPLETIONS, 1, &r, err, sizeof(err)) == 0);
    CHECK(r.n_choices == 1 && r.choices[0].text_len == 3 && memcmp(r.choices[0].text, "a\0b", 3) == 0);
    bg_resp_free(&r);
    /* Escapes and surrogate pairs decode to UTF-8; lone surrogates to U+FFFD. */
    const char *esc = "{\"choices\":[{\"text\":\"\\ud83d\\ude00\\u00e9\\n\\/\\udc00\"}]}";
    CHECK(bg_json_parse_response(esc, strlen(esc), BG_EP_COMPLETIONS, 1, &r, err, sizeof(err)) == 0);
    CHECK(r.n_choices == 1 && strcmp(r.choices[0].text, "\xf0\x9f\x98\x80\xc3\xa9\n/\xef\xbf\xbd") == 0);
    bg_resp_free(&r);
    /* Trailing garbage after the object is not an answer. */
    expect_parse_error("{\"choices\":[{\"index\":0,\"text\":\"a\"}]} trailing", BG_EP_COMPLETIONS, 1,
                       "trailing data");
    expect_parse_error("{\"choices\":[{\"text\":\"a\"}],}", BG_EP_COMPLETIONS, 1, "not JSON");
    expect_parse_error("{\"choices\":[{\"text\":\"a\x01\"}]}", BG_EP_COMPLETIONS, 1, "control character");
    expect_parse_error("{\"choices\":[{\"text\":\"a\"}],\"x\":01}", BG_EP_COMPLETIONS, 1, "not JSON");
    expect_parse_error("{\"choices\":[{\"index\":9223372036854775808,\"text\":\"a\"}]}",
                       BG_EP_COMPLETIONS, 1, "must be an integer");
    /* Deep nesting is refused, not a stack overflow. */
    static char deep[20000];
    size_t k = 0;
    k += (size_t)sprintf(deep, "{\"choices\":[],\"x\":");
    for (int i = 0; i < 5000; i++)
        deep[k++] = '[';
    deep[k] = '\0';
    expect_parse_error(deep, BG_EP_COMPLETIONS, 0, "nested too deeply");
    /* Usage fields that are not integers read as missing. */
    const char *u = "{\"choices\":[],\"usage\":{\"prompt_tokens\":1.5,\"total_tokens\":7}}";
    CHECK(bg_json_parse_response(u, strlen(u), BG_EP_COMPLETIONS, 0, &r, err, sizeof(err)) == 0);
    CHECK(r.usage.present && r.usage.prompt_tokens == -1 && r.usage.total_tokens == 7);
    bg_resp_free(&r);

    /* Params can never break out of the body's object. */
    expect_tmpl_error("{\"a\":1},{\"b\":2}", "trailing data");
    expect_tmpl_error("{\"a\":1}}", "trailing data");
    expect_tmpl_error("{\"a\":\"x\"", "not valid JSON");
    expect_tmpl_error("{\"a\":[1,}", "not valid JSON");
    expect_tmpl_error("{\"a\":1,}", "not valid JSON");
    expect_tmpl_error("{\"max_tokens\":1e3}", "max_tokens");
    expect_tmpl_error("{\"stream\":\"yes\"}", "stream");
    const char *okp = "{\"n\":2.0,\"stream\":false,\"max_completion_tokens\":9}";
    bg_tmpl *t = bg_tmpl_new("m", okp, strlen(okp), err, sizeof(err));
    CHECK(t && t->n_per_prompt == 2 && t->max_tokens == 9);
    bg_tmpl_decref(t);

    /* Error messages are cut on a character boundary. */
    const char *ko = "{\"error\":{\"message\":\"\xea\xb0\x80\xea\xb0\x80\xea\xb0\x80\"}}";
    char *m = bg_json_error_message(ko, strlen(ko), 4); /* inside the 2nd character */
    CHECK(m && strcmp(m, "\xea\xb0\x80...") == 0);
    free(m);
    const char *nm = "{\"message\":\"a\\u0000b\"}";
    m = bg_json_error_message(nm, strlen(nm), 50);
    CHECK(m && strcmp(m, "a b") == 0);
    free(m);
    char cut[16] = "ab\xea\xb0";
    bg_utf8_trim(cut);
    CHECK(strcmp(cut, "ab") == 0);
    strcpy(cut, "ab\xea\xb0\x80");
    bg_utf8_trim(cut);
    CHECK(strcmp(cut, "ab\xea\xb0\x80") == 0);
}

static void test_parse_tokenize(void)
{
    char err[256];
    int64_t count = 0, mml = 0;
    /* vLLM's shape */
    const char *ok = "{\"count\": 5, \"max_model_len\": 4096, \"tokens\": [1,2,3,4,5], "
                     "\"token_strs\": null}";
    CHECK(bg_json_parse_tokenize(ok, strlen(ok), &count, &mml, err, sizeof(err)) == 0);
    CHECK(count == 5 && mml == 4096);
    /* No count: the tokens list's length; no max_model_len: -1 */
    const char *nocount = "{\"tokens\": [7, 8, 9]}";
    CHECK(bg_json_parse_tokenize(nocount, strlen(nocount), &count, &mml, err, sizeof(err)) == 0);
    CHECK(count == 3 && mml == -1);
    const char *zero = " {\"count\":0,\"tokens\":[],\"max_model_len\":null} ";
    CHECK(bg_json_parse_tokenize(zero, strlen(zero), &count, &mml, err, sizeof(err)) == 0);
    CHECK(count == 0 && mml == -1);
    /* Errors say what is wrong */
    const char *none = "{\"detail\": \"Not Found\"}";
    CHECK(bg_json_parse_tokenize(none, strlen(none), &count, &mml, err, sizeof(err)) < 0);
    CHECK(count == -1);
    CHECK_CONTAINS(err, "no \"count\"");
    const char *neg = "{\"count\": -1}";
    CHECK(bg_json_parse_tokenize(neg, strlen(neg), &count, &mml, err, sizeof(err)) < 0);
    CHECK_CONTAINS(err, "non-negative");
    const char *str = "{\"count\": \"5\"}";
    CHECK(bg_json_parse_tokenize(str, strlen(str), &count, &mml, err, sizeof(err)) < 0);
    CHECK_CONTAINS(err, "must be an integer, got string");
    const char *arr = "[1, 2]";
    CHECK(bg_json_parse_tokenize(arr, strlen(arr), &count, &mml, err, sizeof(err)) < 0);
    CHECK_CONTAINS(err, "must be a JSON object, got list");
    const char *trail = "{\"count\": 2} x";
    CHECK(bg_json_parse_tokenize(trail, strlen(trail), &count, &mml, err, sizeof(err)) < 0);
    CHECK_CONTAINS(err, "not JSON");
    const char *html = "<html>502</html>";
    CHECK(bg_json_parse_tokenize(html, strlen(html), &count, &mml, err, sizeof(err)) < 0);
    CHECK_CONTAINS(err, "starts with \"<html>");
    const char *badtok = "{\"count\": 2, \"tokens\": [1, }";
    CHECK(bg_json_parse_tokenize(badtok, strlen(badtok), &count, &mml, err, sizeof(err)) < 0);
    CHECK(count == -1);
}

int main(void)
{
    test_hardening();
    test_escape();
    test_template_and_bodies();
    test_template_errors();
    test_parse_ok();
    test_parse_packed();
    test_parse_openai_fields();
    test_parse_errors();
    test_error_messages();
    test_parse_tokenize();
    if (failures) {
        fprintf(stderr, "test_json: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_json: ok\n");
    return 0;
}
