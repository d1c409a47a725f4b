/* bg_notify.c - native event queue + wakeup fd (see bg_notify.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* pipe2, eventfd */
#endif
#include "bg_notify.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/eventfd.h>
#define BG_HAVE_EVENTFD 1
#endif

struct bg_notify {
    pthread_mutex_t mu;
    bg_notify *all_prev, *all_next; /* every live queue, for fork() */
    bg_fifo q;
    int rfd, wfd; /* equal for eventfd */
};

static int set_nonblock_cloexec(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    int fdfl = fcntl(fd, F_GETFD);
    if (fdfl < 0 || fcntl(fd, F_SETFD, fdfl | FD_CLOEXEC) < 0)
        return -1;
    return 0;
}

static int open_fds(bg_notify *n)
{
#ifdef BG_HAVE_EVENTFD
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd >= 0) {
        n->rfd = n->wfd = fd;
        return 0;
    }
#endif
    int p[2];
    if (pipe(p) < 0)
        return -1;
    if (set_nonblock_cloexec(p[0]) < 0 || set_nonblock_cloexec(p[1]) < 0) {
        int e = errno;
        close(p[0]);
        close(p[1]);
        errno = e;
        return -1;
    }
    n->rfd = p[0];
    n->wfd = p[1];
    return 0;
}

/* Fork: a pushing thread (engine, or a semaphore grant made under the
 * semaphore's lock) may hold a queue's lock at fork(). Taking these locks in
 * a prepare handler could deadlock against that grant path, so the child
 * re-creates them instead: only the forking thread exists there, so nobody
 * can be inside. */
static pthread_mutex_t all_mu = PTHREAD_MUTEX_INITIALIZER;
static bg_notify *all_head;
static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void fork_prepare(void)
{
    pthread_mutex_lock(&all_mu);
}

static void fork_parent(void)
{
    pthread_mutex_unlock(&all_mu);
}

static void fork_child(void)
{
    for (bg_notify *n = all_head; n; n = n->all_next)
        (void)pthread_mutex_init(&n->mu, NULL);
    pthread_mutex_unlock(&all_mu);
}

static void fork_register(void)
{
    (void)pthread_atfork(fork_prepare, fork_parent, fork_child);
}

bg_notify *bg_notify_create(void)
{
    bg_notify *n = calloc(1, sizeof *n);
    if (n == NULL)
        return NULL;
    int rc = pthread_mutex_init(&n->mu, NULL);
    if (rc != 0) {
        free(n);
        errno = rc;
        return NULL;
    }
    if (open_fds(n) < 0) {
        int e = errno;
        pthread_mutex_destroy(&n->mu);
        free(n);
        errno = e;
        return NULL;
    }
    pthread_once(&fork_once, fork_register);
    pthread_mutex_lock(&all_mu);
    n->all_next = all_head;
    if (all_head)
        all_head->all_prev = n;
    all_head = n;
    pthread_mutex_unlock(&all_mu);
    return n;
}

void bg_notify_destroy(bg_notify *n)
{
    if (n == NULL)
        return;
    pthread_mutex_lock(&all_mu);
    if (n->all_prev)
        n->all_prev->all_next = n->all_next;
    else
        all_head = n->all_next;
    if (n->all_next)
        n->all_next->all_prev = n->all_prev;
    pthread_mutex_unlock(&all_mu);
    close(n->rfd);
    if (n->wfd != n->rfd)
        close(n->wfd);
    pthread_mutex_destroy(&n->mu);
    free(n);
}

int bg_notify_fd(const bg_notify *n)
{
    return n->rfd;
}

void bg_notify_wake(bg_notify *n)
{
    ssize_t r;
    if (n->wfd == n->rfd) {
        uint64_t one = 1;
        do {
            r = write(n->wfd, &one, sizeof one);
        } while (r < 0 && errno == EINTR);
    } else {
        char c = 1;
        do {
            r = write(n->wfd, &c, 1);
        } while (r < 0 && errno == EINTR);
    }
    /* EAGAIN: counter saturated / pipe full, so the fd is readable anyway. */
    (void)r;
}

int bg_notify_push(bg_notify *n, bg_notify_node *node)
{
    pthread_mutex_lock(&n->mu);
    int was_empty = bg_fifo_empty(&n->q);
    bg_fifo_push(&n->q, node);
    pthread_mutex_unlock(&n->mu);
    /* Outside the lock: at worst the consumer already took this node and
     * sees one spurious wakeup with an empty queue. */
    if (was_empty)
        bg_notify_wake(n);
    return was_empty;
}

static void clear_fd(bg_notify *n)
{
    if (n->wfd == n->rfd) {
        uint64_t cnt;
        ssize_t r;
        do {
            r = read(n->rfd, &cnt, sizeof cnt);
        } while (r < 0 && errno == EINTR);
    } else {
        char buf[256];
        for (;;) {
            ssize_t r = read(n->rfd, buf, sizeof buf);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < (ssize_t)sizeof buf)
                break;
        }
    }
}

int bg_notify_pending(bg_notify *n)
{
    pthread_mutex_lock(&n->mu);
    int p = !bg_fifo_empty(&n->q);
    pthread_mutex_unlock(&n->mu);
    return p;
}

bg_notify_node *bg_notify_drain(bg_notify *n)
{
    /* Read the fd before taking the list: a push racing with us either lands
     * in this list or writes the fd again for the next drain. */
    clear_fd(n);
    pthread_mutex_lock(&n->mu);
    bg_notify_node *list = bg_fifo_take(&n->q);
    pthread_mutex_unlock(&n->mu);
    return list;
}

int bg_notify_wait(bg_notify *n, int timeout_ms)
{
    struct pollfd p = {.fd = n->rfd, .events = POLLIN};
    for (;;) {
        int r = poll(&p, 1, timeout_ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        return r > 0;
    }
}
