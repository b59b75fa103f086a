"""The loopback TCP proxy used by the network-fault tests: forwarding, pause/resume, reset, throttle, latency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.netproxy import NetProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def echo_proxy() -> AsyncIterator[NetProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with NetProxy(port) as proxy:
        yield proxy
    server.close()
    await server.wait_closed()


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await reader.readexactly(len(data))


async def test_forwards_both_ways_and_counts_bytes(echo_proxy: NetProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    payload = bytes(range(256)) * 1000
    assert await _roundtrip(reader, writer, payload) == payload
    assert echo_proxy.stats.bytes_up == echo_proxy.stats.bytes_down == len(payload)
    assert echo_proxy.open_connections == 1
    writer.close()
    await writer.wait_closed()


async def test_pause_holds_bytes_with_sockets_open_and_resume_delivers_them_in_order(echo_proxy: NetProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    assert await _roundtrip(reader, writer, b"before") == b"before"
    echo_proxy.pause()
    writer.write(b"during-1 ")
    writer.write(b"during-2")
    await writer.drain()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):  # nothing may come through while paused
            await reader.read(1)
    assert echo_proxy.open_connections == 1
    echo_proxy.resume()
    assert await reader.readexactly(17) == b"during-1 during-2"
    writer.close()
    await writer.wait_closed()


async def test_reset_aborts_open_connections_with_rst_and_new_ones_still_work(echo_proxy: NetProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    assert await _roundtrip(reader, writer, b"x") == b"x"
    echo_proxy.pause()  # a reset while paused must not wait for the resume
    assert echo_proxy.reset() == 1
    with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
        await reader.readexactly(1)
    writer.close()
    echo_proxy.resume()
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    assert await _roundtrip(reader, writer, b"again") == b"again"
    await echo_proxy.wait_accepted(2)
    assert echo_proxy.stats.resets == 1
    writer.close()
    await writer.wait_closed()


async def test_throttle_limits_the_rate_and_adds_latency(echo_proxy: NetProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", echo_proxy.port)
    echo_proxy.throttle(None, latency_s=0.2)
    t0 = time.monotonic()
    assert await _roundtrip(reader, writer, b"ping") == b"ping"
    assert 0.4 <= time.monotonic() - t0 < 1.0  # 0.2 s each way
    echo_proxy.throttle(20_000)
    t0 = time.monotonic()
    payload = b"z" * 10_000
    assert await _roundtrip(reader, writer, payload) == payload
    # 10 kB at 20 kB/s each way; both directions pipeline, so about 0.5 s, never loopback speed
    assert 0.4 <= time.monotonic() - t0 < 2.0
    echo_proxy.throttle(None)
    t0 = time.monotonic()
    assert await _roundtrip(reader, writer, payload) == payload
    assert time.monotonic() - t0 < 0.3
    writer.close()
    await writer.wait_closed()
