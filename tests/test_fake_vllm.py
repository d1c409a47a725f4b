"""The fake vLLM server itself: stopping it must leave nothing behind.

A handler task or transport left pending when the server's loop stops is
destroyed later, and pytest reports the warning inside whatever test runs
then (CI once failed two unrelated tests that way)."""
import gc
import socket
import sys

from fake_vllm import FakeVLLM
from server_helpers import leftovers_of_stop_in_accept_round


def test_stop_with_connections_in_every_state_leaves_nothing_pending():
    reported = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: reported.append(f"{u.exc_type.__name__}: {u.exc_value}")
    try:
        for _ in range(5):
            srv = FakeVLLM(latency=0.5).start_in_thread()
            socks = []
            try:
                for i in range(30):
                    s = socket.create_connection(("127.0.0.1", srv.port))
                    if i % 3 == 1:  # a head cut short: the handler waits for the rest
                        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
                    elif i % 3 == 2:  # a whole request: the handler sleeps in its answer
                        body = b'{"model":"m","prompt":"hi","max_tokens":4}'
                        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Type: application/json\r\n"
                                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    socks.append(s)  # i % 3 == 0: connected, nothing sent
                srv.stop()  # at once: some connections are accepted but not yet handled
            finally:
                for s in socks:
                    s.close()
            gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert reported == []


def test_stop_in_the_round_that_accepts_leaves_nothing_pending():
    srv = FakeVLLM()

    async def start():
        await srv.start()
        return srv.port

    assert leftovers_of_stop_in_accept_round(start, srv.aclose) == []
