"""FakeVLLM (its fault directives, stats, echo answers) answering sentiment
prompts the way the simulated server does (batchgate.simserver.answers), and recording every
request body in arrival order (``bodies``)."""
from __future__ import annotations

import threading
from typing import Any, Dict, List

from batchgate.simserver.answers import answer_for, is_sentiment_prompt
from fake_vllm import FakeVLLM


class SentimentServer(FakeVLLM):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.bodies: List[Dict[str, Any]] = []
        self._blk = threading.Lock()

    async def _answer(self, writer, reader, chat, req, prompts, n, d, attempt):  # type: ignore[override]
        with self._blk:
            self.bodies.append(req)
        return await super()._answer(writer, reader, chat, req, prompts, n, d, attempt)

    def _ok_body(self, chat, req, prompts, n):  # type: ignore[override]
        body = super()._ok_body(chat, req, prompts, n)
        for c in body["choices"]:
            prompt = prompts[c["index"] // max(1, n)]
            if not is_sentiment_prompt(prompt):
                continue  # FakeVLLM's echo
            text = answer_for(prompt)
            if chat:
                c["message"]["content"] = text
            else:
                c["text"] = text
        return body
