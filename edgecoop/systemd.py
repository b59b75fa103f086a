"""sd_notify readiness and watchdog without a dependency: a datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import socket

__all__ = ["notify", "notify_ready", "watchdog_loop"]


def notify(state: str) -> bool:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True


def notify_ready() -> bool:
    return notify("READY=1")


async def watchdog_loop() -> None:
    """Ping systemd's watchdog at half its interval while the event loop is alive (or just wait forever)."""
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec <= 0:
        await asyncio.Event().wait()
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(usec / 2_000_000)
