"""A real local OpenAI-compatible server as the stand-in "cloud": ``python -m llama_cpp.server`` as a child process.

Used by the tests and the demo so that the ``cloud`` capability talks real HTTP to a real server::

    with CloudServer("smollm2-135m") as cloud:
        print(cloud.url)  # http://127.0.0.1:<free port>/v1

Readiness is polled on ``GET /v1/models``; the server is stopped by PID (SIGTERM, then SIGKILL).
Run it alone with ``python -m edgecoop.agents.cloudserver [MODEL]`` (Ctrl-C stops it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from edgecoop.broker import free_port
from edgecoop.errors import CapabilityError, DependencyMissing
from edgecoop.models import DEFAULT_MODEL, resolve_model

__all__ = ["CloudServer"]

# What `llama-cpp-python[server]` adds; checked without importing llama_cpp (which loads the native library).
_SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class CloudServer:
    """``llama_cpp.server`` on a free loopback port; a (sync) context manager, or ``start()``/``stop()``."""

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        n_ctx: int = 2048,
        n_threads: int = 1,
        model_alias: str = "edgecoop-cloud",
        api_key: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        self.model = model
        self.host = host
        self.port = port or free_port(host)
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.model_alias = model_alias
        self.api_key = api_key
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None

    @property
    def url(self) -> str:
        """The OpenAI base URL (``.../v1``) to put in a cloud capability's ``url`` option."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def log_file(self) -> Path | None:
        return self._dir / "server.log" if self._dir else None

    def _log_tail(self) -> str:
        f = self.log_file
        return f.read_text(errors="replace")[-1500:] if f and f.exists() else ""

    def start(self) -> CloudServer:
        if self.proc is not None:
            raise RuntimeError("CloudServer is already running")
        missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
        if missing or importlib.util.find_spec("llama_cpp") is None:
            raise DependencyMissing("llama-cpp-python[server]", "server")
        path = resolve_model(self.model)
        self._dir = Path(tempfile.mkdtemp(prefix="edgecoop-cloud-"))
        argv = [
            sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", self.model_alias,
            "--host", self.host, "--port", str(self.port), "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads), "--verbose", "False",
        ]  # fmt: skip
        if self.api_key:  # requests then need "Authorization: Bearer <key>" (readiness too)
            argv += ["--api_key", self.api_key]
        assert self.log_file is not None
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                tail = self._log_tail()
                self.stop()
                raise CapabilityError(f"llama_cpp.server exited with {code} during startup: {tail}")
            try:
                headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
                probe = urllib.request.Request(f"{self.url}/models", headers=headers)  # noqa: S310 - our own http URL
                with _NO_PROXY.open(probe, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)  # polling a port that is not serving yet; not a correctness sleep
        tail = self._log_tail()
        self.stop()
        raise CapabilityError(f"llama_cpp.server did not answer on {self.url} within {self.startup_timeout}s: {tail}")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> CloudServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with CloudServer(args[0] if args else DEFAULT_MODEL) as server:
        print(f"stand-in cloud (llama_cpp.server pid {server.pid}) at {server.url}", flush=True)
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
