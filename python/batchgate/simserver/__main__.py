"""python -m batchgate.simserver: serve the simulated vLLM until Ctrl-C."""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import List, Optional

from .server import (DEFAULT_MODEL, STEP_BASE_S, STEP_DECODE_SEQ_S, STEP_PREFILL_TOKEN_S,
                     SimServer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batchgate.simserver",
        description="A local vLLM look-alike that models KV-cache memory (no GPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--model", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--kv-cache-tokens", type=int, default=131072,
                   help="KV cache size in tokens (the simulated GPU memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, default=32768,
                   help="longest prompt + completion; longer prompts get vLLM's 400")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="most sequences running in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step; None means max(8192, max-model-len)")
    p.add_argument("--mode", choices=("preempt", "naive"), default="preempt",
                   help="preempt (vLLM) or naive (fail with out-of-memory)")
    p.add_argument("--step-base-s", type=float, default=STEP_BASE_S,
                   help="fixed time of one engine step")
    p.add_argument("--step-prefill-token-s", type=float, default=None,
                   help=f"step time per prompt token prefilled (or recomputed after a "
                        f"preemption) in the step; default {STEP_PREFILL_TOKEN_S}, or "
                        f"--step-per-token-s")
    p.add_argument("--step-decode-seq-s", type=float, default=None,
                   help=f"step time per sequence decoding a token in the step; default "
                        f"{STEP_DECODE_SEQ_S}, or --step-per-token-s")
    p.add_argument("--step-per-token-s", type=float, default=None,
                   help="one rate for both of the above (the older step-time model)")
    p.add_argument("--output-len", default="natural",
                   help="length of free-text answers where the model stops by itself: "
                        "natural | fixed:N | uniform:LO:HI | lognormal:MEAN:SIGMA "
                        "(JSON sentiment answers keep their own length)")
    p.add_argument("--output-len-seed", type=int, default=0,
                   help="seed of --output-len draws (same prompt + seed = same length)")
    return p


async def serve(args: argparse.Namespace) -> None:
    server = SimServer(
        kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, mode=args.mode,
        step_base_s=args.step_base_s, step_prefill_token_s=args.step_prefill_token_s,
        step_decode_seq_s=args.step_decode_seq_s, step_per_token_s=args.step_per_token_s,
        output_len=args.output_len, output_len_seed=args.output_len_seed, model=args.model)
    await server.start(args.host, args.port)
    print(f"batchgate simserver: {server.base_url} (model {server.model}, mode {server.mode}, "
          f"KV cache {server.engine.num_blocks} blocks x {server.engine.block_size} tokens, "
          f"output-len {server.output_len.spec})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(serve(args))
    except (TypeError, ValueError, OSError) as e:
        print(f"batchgate simserver: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
