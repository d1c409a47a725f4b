"""What the server says about itself: its model and max_model_len (/v1/models)
and its KV cache size (vLLM's /metrics)."""
from __future__ import annotations

import json
import re
from typing import Optional, Tuple

from .._redact import redact, redact_url, secrets_of, split_userinfo

# Share of the server's KV cache the default token cap takes: block rounding
# and the answers' own tokens need the rest.
AUTO_TOKEN_CAP_FRACTION = 0.95


class ServerUnreachable(Exception):
    """No usable server at the given base URL."""


def preflight(base_url: str, api_key: Optional[str], timeout: float = 5.0
              ) -> Tuple[Optional[str], Optional[int]]:
    """GET {base_url}/models: the first model's id and max_model_len (vLLM
    lists it), or ServerUnreachable."""
    import urllib.error
    import urllib.request
    url, basic = split_userinfo(base_url)  # urllib takes no credentials from URLs
    shown = redact_url(base_url).rstrip("/")
    req = urllib.request.Request(url.rstrip("/") + "/models")
    auth = f"Bearer {api_key}" if api_key else basic
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        hint = (" (the base URL is the OpenAI-style one, ending in /v1)" if e.code == 404 else
                " (check VLLM_API_KEY)" if e.code in (401, 403) else "")
        raise ServerUnreachable(f"{shown}/models answered HTTP {e.code} "
                                f"{e.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = redact(str(getattr(e, "reason", e)), secrets_of(base_url) + (api_key,))
        raise ServerUnreachable(f"cannot reach the server at {shown}: {reason}") from None
    except ValueError:
        raise ServerUnreachable(f"{shown}/models did not return JSON; is this an "
                                "OpenAI-compatible server (base URL ending in /v1)?") from None
    try:
        first = data["data"][0]
        mml = first.get("max_model_len")
        return str(first["id"]), (mml if isinstance(mml, int) and mml > 0 else None)
    except (KeyError, IndexError, TypeError, AttributeError):
        return None, None


_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def server_kv_tokens(base_url: str, api_key: Optional[str], timeout: float = 5.0
                     ) -> Optional[int]:
    """The server's KV cache in tokens (num_gpu_blocks x block_size) from
    vLLM's ``vllm:cache_config_info`` metric at /metrics, or None."""
    import urllib.error
    import urllib.request
    from urllib.parse import urlsplit
    url, basic = split_userinfo(base_url)
    u = urlsplit(url)
    req = urllib.request.Request(f"{u.scheme}://{u.netloc}/metrics")
    auth = f"Bearer {api_key}" if api_key else basic
    if auth:
        req.add_header("Authorization", auth)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    for m in _CACHE_INFO.finditer(text):
        labels = dict(_LABEL.findall(m.group(1)))
        try:
            blocks, size = int(labels["num_gpu_blocks"]), int(labels["block_size"])
        except (KeyError, ValueError):
            continue
        if blocks > 0 and size > 0:
            return blocks * size
    return None
