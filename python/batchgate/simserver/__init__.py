"""An embedded vLLM look-alike for runs and demos without a GPU.

It speaks vLLM's OpenAI-compatible API (/v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics with vLLM's metric names) and models what
matters for GPU memory: a paged KV cache of ``kv_cache_tokens`` allocated in
blocks of ``block_size`` (the tail of a sequence's last block is wasted, as in
vLLM; ``vllm:cache_config_info`` says num_gpu_blocks and block_size),
``max_model_len`` (vLLM's 400 error for over-long prompts), ``max_num_seqs``,
continuous batching with vLLM's step-time shape (a fixed cost per step + a cost
per prefilled token + a cost per decoding sequence), and either recompute
preemption (``mode="preempt"``, counted in ``vllm:num_preemptions_total``; the
preempted sequence's tokens are prefilled again, which costs step time) or
out-of-memory failures (``mode="naive"``, HTTP 500). Requests may set vLLM's
``ignore_eos`` and ``min_tokens``; free-text answers get a seeded length
distribution (``output_len``, see ``lengths``). Answers are deterministic; the
built-in sentiment prompt gets valid JSON counts.

Pure Python (asyncio), no third-party dependency::

    async with SimServer(kv_cache_tokens=65536) as srv:
        ...  # POST srv.base_url + "/v1/completions"

    with SimServerThread(mode="naive") as srv:   # own loop in a thread
        ...

    python -m batchgate.simserver --port 8000 --kv-cache-tokens 65536
"""
from .engine import OutOfMemory, Timeline
from .server import DEFAULT_MODEL, SimServer, SimServerThread

__all__ = ["DEFAULT_MODEL", "OutOfMemory", "SimServer", "SimServerThread", "Timeline"]
