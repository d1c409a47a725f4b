/* http_fixture.h - what the engine tests share: tests/fake_vllm.py as a child
 * process on a free loopback port, its control endpoints, a completion
 * collector, a plain engine fixture with prompt items, and a test runner.
 * Link http_fixture.c; include check.h for CHECK. */
#ifndef BATCHGATE_TEST_HTTP_FIXTURE_H
#define BATCHGATE_TEST_HTTP_FIXTURE_H

#include "bg_http.h"
#include "check.h"

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>

double now_s(void);
void sleep_s(double s);

/* ---- fake server process ---- */
extern int server_port;     /* of the running fake server */
extern char base_url[64];   /* "http://127.0.0.1:PORT/v1"; tests may point it elsewhere */
void start_server(const char *script); /* exits the test on failure */
void stop_server(void);
/* GET (or POST with an empty body) a control path; malloc'd answer or NULL. */
char *control(const char *path, bool post);
void reset_server(void);                /* POST /_reset */
long stat_int(const char *name);        /* a number from GET /_stats, -1 if absent */

/* ---- completions ---- */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    size_t done;
    size_t dup; /* a request completed twice */
} collector;
extern collector coll;
/* on_done for engines: counts, and r->user (an int, if set) counts per request. */
void on_done(bg_request *r, void *ctx);
bool wait_done(collector *c, size_t n, double timeout_s);
size_t coll_done(void);
void coll_reset(void);

/* ---- a plain engine (count cap, optional token semaphore) ---- */
typedef struct {
    bg_engine *e;
    bg_sem *count, *tokens;
    bg_tmpl *tmpl;
    int64_t cap;
} fixture;

/* cap count permits; `over` (or fast-backoff defaults) with base_url, the
 * count semaphore and the collector filled in; `extra` is the template's JSON. */
void fx_open(fixture *fx, int64_t cap, bg_engine_config *over, const char *extra);
/* Destroys the engine and checks every permit came back. */
void fx_close(fixture *fx);
/* Creates an engine on the collector (base_url if c->base_url is NULL);
 * exits the test on failure. */
bg_engine *engine_on_collector(bg_engine_config *c);

typedef struct {
    bg_request r;
    bg_str p;
    char text[160];
    int seen;
} item;

item *make_items(fixture *fx, size_t n, const char *fmt); /* ids 1..n */
void free_items(item *v, size_t n);
item *run_one(fixture *fx, const char *prompt);           /* submit one and wait */
void expect_ok_text(item *it);                            /* OK with "echo:" + text */

/* ---- runner ---- */
typedef struct {
    const char *name;
    void (*fn)(void);
} test_case;
/* Starts the fake server (argv[1] or ../fake_vllm.py), runs the tests whose
 * name contains $TEST_ONLY (all without it), stops it; main's exit code. */
int run_tests(const char *prog, const test_case *tests, size_t n, int argc, char **argv);

#endif /* BATCHGATE_TEST_HTTP_FIXTURE_H */
