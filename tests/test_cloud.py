"""The ``cloud`` capability against a real OpenAI-compatible server (llama_cpp.server with SmolLM2) and failures."""

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from edgecoop.agents.cloudserver import CloudServer
from edgecoop.agents.handlers.cloud import chat_completions_url
from edgecoop.broker import free_port
from edgecoop.errors import ConfigError, RemoteError, RequestTimeout

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def cloud() -> Iterator[CloudServer]:
    pytest.importorskip("llama_cpp")  # the only reason to skip: the model itself must be installed (scripts/setup)
    with CloudServer("smollm2-135m", api_key=API_KEY) as server:
        yield server


def cloud_caps(url: str, **options):
    return [{"kind": "cloud", "max_concurrency": 2, "options": {"url": url, "max_tokens": 16, **options}}]


@pytest.mark.llm
async def test_cloud_answers_and_reports_cost_and_bytes(cloud, make_agent, client, monkeypatch):
    monkeypatch.setenv("EDGECOOP_TEST_CLOUD_KEY", API_KEY)
    caps = cloud_caps(
        cloud.url, model="gpt-stand-in", api_key_env="EDGECOOP_TEST_CLOUD_KEY", cost_per_call=0.002,
        cost_per_1k_tokens=0.5,
    )  # fmt: skip
    async with make_agent("cloud-1", capabilities=caps):
        resp = await client.req.request(
            "cloud-1", "cloud", {"prompt": "What is the capital of France?", "system": "Be brief."}, timeout=30
        )
        chat = await client.req.request(
            "cloud-1", "cloud", {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}, timeout=30
        )
    r = resp.result
    assert isinstance(r["text"], str) and r["text"].strip()
    assert r["model"] == "gpt-stand-in"
    assert r["tokens"] > 16  # prompt + completion, as the server counts them
    assert r["cost"] == pytest.approx(0.002 + 0.5 * r["tokens"] / 1000)
    assert r["bytes_sent"] > 50 and r["bytes_received"] > 50 and r["elapsed_ms"] > 0
    assert chat.result["text"]


@pytest.mark.llm
async def test_wrong_api_key_is_an_error_reply_with_the_http_status(cloud, make_agent, client, monkeypatch):
    monkeypatch.setenv("EDGECOOP_TEST_CLOUD_KEY", "wrong")
    async with make_agent("cloud-1", capabilities=cloud_caps(cloud.url, api_key_env="EDGECOOP_TEST_CLOUD_KEY")):
        with pytest.raises(RemoteError) as exc:
            await client.req.request("cloud-1", "cloud", {"prompt": "hi"}, timeout=30)
    assert exc.value.code == "upstream_http"
    assert "401" in exc.value.remote_message
    assert "wrong" not in exc.value.remote_message  # the key is never echoed


async def test_endpoint_down_gives_a_clear_error_reply_and_the_agent_keeps_serving(make_agent, client):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    caps = [*cloud_caps(url), {"kind": "echo"}]
    async with make_agent("cloud-1", capabilities=caps):
        for _ in range(2):
            with pytest.raises(RemoteError) as exc:
                await client.req.request("cloud-1", "cloud", {"prompt": "hi"}, timeout=10)
            assert exc.value.code == "upstream_unreachable"
            assert url in exc.value.remote_message
        assert (await client.req.request("cloud-1", "echo", {"ok": 1}, timeout=5)).ok


async def test_silent_endpoint_times_out_with_its_own_error(make_agent, client):
    with socket.socket() as listener:  # accepts connections (kernel backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        async with make_agent("cloud-1", capabilities=cloud_caps(url, timeout_s=0.5)):
            with pytest.raises(RemoteError) as exc:
                await client.req.request("cloud-1", "cloud", {"prompt": "hi"}, timeout=10)
    assert exc.value.code == "upstream_timeout"


async def test_request_deadline_bounds_the_http_call(make_agent, client):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        caps = [{"kind": "cloud", "max_concurrency": 1, "options": {"url": url, "timeout_s": 30}}]
        async with make_agent("cloud-1", capabilities=caps) as agent:
            with pytest.raises(RequestTimeout):
                await client.req.request("cloud-1", "cloud", {"prompt": "hi"}, timeout=0.5)
            # the HTTP call got the request's deadline, not timeout_s: its worker thread is free again soon after
            handler = agent.handlers["cloud"]
            async with asyncio.timeout(5):
                worker = await handler._idle.get()
            handler._idle.put_nowait(worker)
            assert agent.counters["timeouts"] + agent.counters["expired"] == 1


async def test_broken_http_is_a_bad_reply_error(make_agent, client):
    with socket.socket() as listener:  # answers every request with garbage, then hangs up
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def serve() -> None:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:  # read the whole request: closing on unread data resets
                    request += conn.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = next(
                    int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
                )
                while len(body) < length:
                    body += conn.recv(65536)
                conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{"choices"')
                conn.shutdown(socket.SHUT_WR)  # a clean end of stream, 490 bytes short of the announced length
                conn.recv(1)  # until the client hangs up

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        async with make_agent("cloud-1", capabilities=cloud_caps(url, timeout_s=5)):
            with pytest.raises(RemoteError) as exc:
                await client.req.request("cloud-1", "cloud", {"prompt": "hi"}, timeout=10)
        await asyncio.to_thread(server.join, 5)
    assert exc.value.code == "upstream_bad_reply", exc.value.remote_message


async def test_bad_input_gets_error_replies(make_agent, client):
    bad = [{}, {"prompt": ""}, {"prompt": 1}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
           {"prompt": "x", "max_tokens": -1}]  # fmt: skip
    async with make_agent("cloud-1", capabilities=cloud_caps("http://127.0.0.1:9/v1")):
        for request_input in bad:
            with pytest.raises(RemoteError) as exc:
                await client.req.request("cloud-1", "cloud", request_input, timeout=5)
            assert exc.value.code == "capability"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://h:8000", "http://h:8000/v1/chat/completions"),
        ("http://h:8000/v1/", "http://h:8000/v1/chat/completions"),
        ("https://api.example.org/v1/chat/completions", "https://api.example.org/v1/chat/completions"),
        ("https://gw.example.org/openai", "https://gw.example.org/openai/v1/chat/completions"),
    ],
)
def test_chat_completions_url(url, expected):
    assert chat_completions_url(url) == expected


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://h/v1", "h:8000", ""])
def test_non_http_urls_are_refused(make_agent, url, monkeypatch):
    monkeypatch.delenv("EDGECOOP_CLOUD_URL", raising=False)
    with pytest.raises(ConfigError):
        make_agent("cloud-1", capabilities=cloud_caps(url))


def test_url_from_the_environment(make_agent, monkeypatch):
    monkeypatch.setenv("EDGECOOP_CLOUD_URL", "http://10.0.0.1:8080/v1")
    agent = make_agent("cloud-1", capabilities=[{"kind": "cloud"}])
    assert agent.handlers["cloud"].url == "http://10.0.0.1:8080/v1/chat/completions"


async def test_missing_api_key_variable_fails_start(make_agent, monkeypatch):
    monkeypatch.delenv("EDGECOOP_TEST_NO_KEY", raising=False)
    with pytest.raises(ConfigError, match="EDGECOOP_TEST_NO_KEY"):
        async with make_agent(
            "cloud-1", capabilities=cloud_caps("http://127.0.0.1:9", api_key_env="EDGECOOP_TEST_NO_KEY")
        ):
            pass
