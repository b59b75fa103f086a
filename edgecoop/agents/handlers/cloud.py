"""The ``cloud`` capability: escalate to any OpenAI-compatible ``/v1/chat/completions`` endpoint.

Options (``[capabilities.options]``): ``url`` (or env ``EDGECOOP_CLOUD_URL``; a base such as
``https://host/v1`` or the full ``.../v1/chat/completions``), ``model``, ``api_key_env`` (the *name* of the
environment variable holding the key; the key itself never goes into a config file), ``cost_per_call`` and
``cost_per_1k_tokens`` (what the result reports as ``cost``), ``timeout_s`` (30), ``max_tokens`` (256),
``temperature`` (0).

Input: ``prompt`` (str) with optional ``system``, or ``messages`` (OpenAI chat messages), and ``max_tokens``.
Result: ``text``, ``model``, ``tokens``, ``cost``, ``bytes_sent``/``bytes_received`` (HTTP bodies) and ``elapsed_ms``.

HTTP is stdlib ``urllib.request`` on dedicated worker threads (one per ``max_concurrency`` slot; a thread goes
back to the pool only when its HTTP call has really finished), bounded by ``timeout_s`` and the request deadline.
Upstream failures become :class:`CloudError` (a :class:`~edgecoop.errors.CapabilityError`) whose ``code`` goes
into the error reply: ``upstream_http`` (with ``status``), ``upstream_unreachable``, ``upstream_timeout``,
``upstream_bad_reply``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from edgecoop.agents.handlers.base import AgentContext, CallContext, Handler
from edgecoop.errors import CapabilityError, CloudError, ConfigError
from edgecoop.worker import Worker

if TYPE_CHECKING:
    from edgecoop.agents.config import AgentConfig, CapabilitySpec

__all__ = ["CloudError", "CloudHandler", "chat_completions_url"]

MAX_REPLY_BYTES = 4 * 1024 * 1024  # an answer larger than this is refused, not buffered
_ROLES = frozenset({"system", "user", "assistant"})


def chat_completions_url(url: str) -> str:
    """Normalise a base URL (``http://h:p``, ``http://h:p/v1``) or a full endpoint to ``.../v1/chat/completions``."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"cloud url must be an http(s) URL, not {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path = path + "/chat/completions" if path.endswith("/v1") else path + "/v1/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _number(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"cloud option {key!r} must be a number >= 0, not {value!r}")
    return float(value)


class CloudHandler(Handler):
    """Escalation to an OpenAI-compatible chat-completions endpoint (cost and bytes reported per call)."""

    kind = "cloud"
    cooperation = "computation"

    def __init__(self, spec: CapabilitySpec, config: AgentConfig) -> None:
        super().__init__(spec, config)
        opts = self.options
        raw_url = opts.get("url") or os.environ.get("EDGECOOP_CLOUD_URL", "")
        if not isinstance(raw_url, str) or not raw_url:
            raise ConfigError("cloud capability needs option 'url' (or env EDGECOOP_CLOUD_URL)")
        self.url = chat_completions_url(raw_url)
        model = opts.get("model", "default")
        key_env = opts.get("api_key_env", "")
        if not isinstance(model, str) or not isinstance(key_env, str):
            raise ConfigError("cloud options 'model' and 'api_key_env' must be strings")
        self.model = model
        self.api_key_env = key_env
        self.cost_per_call = _number(opts, "cost_per_call", 0.0)
        self.cost_per_1k_tokens = _number(opts, "cost_per_1k_tokens", 0.0)
        self.timeout_s = _number(opts, "timeout_s", 30.0) or 30.0
        self.temperature = _number(opts, "temperature", 0.0)
        max_tokens = opts.get("max_tokens", 256)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"cloud option 'max_tokens' must be a positive integer, not {max_tokens!r}")
        self.max_tokens = max_tokens
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # Loopback endpoints (the stand-in cloud) never go through an environment proxy.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(host) else []
        self._opener = urllib.request.build_opener(*handlers)
        self._workers: list[Worker] = []
        self._idle: asyncio.Queue[Worker] | None = None

    async def start(self, ctx: AgentContext) -> None:
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ConfigError(f"cloud capability {self.spec.name!r}: environment variable {self.api_key_env} is empty")
        slots = max(1, self.spec.max_concurrency)
        # One idle entry per thread: the pool bound is the concurrency bound, so put_nowait never fails.
        self._idle = asyncio.Queue(maxsize=slots)
        for i in range(slots):
            w = Worker(f"cloud[{self.spec.name}]{i}")
            self._workers.append(w)
            self._idle.put_nowait(w)

    async def stop(self) -> None:
        workers, self._workers, self._idle = self._workers, [], None
        for w in workers:
            await asyncio.to_thread(w.close)  # waits for an HTTP call still running (bounded by timeout_s)

    def _body(self, request_input: Mapping[str, Any]) -> dict[str, Any]:
        max_tokens = request_input.get("max_tokens", self.max_tokens)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise CapabilityError(f"cloud 'max_tokens' must be a positive integer, not {max_tokens!r}")
        messages: list[dict[str, str]] = []
        if "messages" in request_input:
            raw = request_input["messages"]
            if not isinstance(raw, list) or not raw:
                raise CapabilityError("cloud 'messages' must be a non-empty list of {role, content} objects")
            for m in raw:
                if not (isinstance(m, Mapping) and m.get("role") in _ROLES and isinstance(m.get("content"), str)):
                    raise CapabilityError(f"cloud messages need role in {sorted(_ROLES)} and string content: {m!r}")
                messages.append({"role": str(m["role"]), "content": str(m["content"])})
        else:
            prompt = request_input.get("prompt")
            system = request_input.get("system", "")
            if not isinstance(prompt, str) or not prompt.strip():
                raise CapabilityError("cloud needs a non-empty string 'prompt' (or 'messages')")
            if not isinstance(system, str):
                raise CapabilityError("cloud 'system' must be a string")
            if system:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": prompt})
        return {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": self.temperature}

    async def handle(self, request_input: Mapping[str, Any], call: CallContext) -> Mapping[str, Any]:
        if self._idle is None:
            raise CapabilityError(f"cloud {self.spec.name!r} is not started")
        body = json.dumps(self._body(request_input)).encode()
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        idle = self._idle
        worker = await idle.get()
        timeout = self.timeout_s
        if call.deadline:
            timeout = min(timeout, call.deadline - loop.time())
            if timeout <= 0:
                idle.put_nowait(worker)
                raise TimeoutError(f"{self.spec.name}: deadline passed before the call")
        cfut = worker.submit(self._post, body, timeout)

        def give_back(_: object) -> None:  # runs on the worker thread when the HTTP call has really finished
            with contextlib.suppress(RuntimeError):  # loop closed: the pool is gone with it
                loop.call_soon_threadsafe(idle.put_nowait, worker)

        cfut.add_done_callback(give_back)
        status, raw = await asyncio.wrap_future(cfut)
        try:
            reply = json.loads(raw)
            text = reply["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise CloudError(
                f"{self.url} answered HTTP {status} without a chat completion: {exc}",
                code="upstream_bad_reply",
                url=self.url,
                status=status,
            ) from exc
        usage = reply.get("usage") if isinstance(reply.get("usage"), Mapping) else {}
        tokens = usage.get("total_tokens", 0) if isinstance(usage.get("total_tokens", 0), int) else 0
        return {
            "text": text,
            "model": str(reply.get("model") or self.model),
            "tokens": tokens,
            "cost": round(self.cost_per_call + self.cost_per_1k_tokens * tokens / 1000, 8),
            "bytes_sent": len(body),
            "bytes_received": len(raw),
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    # -- worker thread ---------------------------------------------------------------------------------
    def _post(self, body: bytes, timeout: float) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.api_key_env, '')}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")  # noqa: S310 - http(s) only, checked in chat_completions_url
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                raw: bytes = resp.read(MAX_REPLY_BYTES + 1)
                status = int(resp.status)
        except urllib.error.HTTPError as exc:
            detail = exc.read(2000).decode(errors="replace").strip()
            exc.close()
            raise CloudError(
                f"{self.url} answered HTTP {exc.code} {exc.reason}: {detail[:500]}",
                code="upstream_http",
                url=self.url,
                status=exc.code,
            ) from exc
        except TimeoutError as exc:
            raise CloudError(
                f"{self.url} did not answer within {timeout:.1f}s", code="upstream_timeout", url=self.url
            ) from exc
        except urllib.error.URLError as exc:
            code = "upstream_timeout" if isinstance(exc.reason, TimeoutError) else "upstream_unreachable"
            raise CloudError(f"{self.url} is unreachable: {exc.reason}", code=code, url=self.url) from exc
        except OSError as exc:  # connection reset mid-reply and friends
            raise CloudError(f"{self.url} failed: {exc}", code="upstream_unreachable", url=self.url) from exc
        except http.client.HTTPException as exc:  # malformed HTTP, truncated body
            raise CloudError(f"{self.url} sent broken HTTP: {exc!r}", code="upstream_bad_reply", url=self.url) from exc
        if len(raw) > MAX_REPLY_BYTES:
            raise CloudError(
                f"{self.url} answered more than {MAX_REPLY_BYTES} bytes", code="upstream_bad_reply", url=self.url
            )
        return status, raw
