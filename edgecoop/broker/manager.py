"""Run a private Mosquitto: free loopback port, generated config, readiness by connecting, stop by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from edgecoop.broker.configs import development_config
from edgecoop.errors import BrokerError, ConfigError

__all__ = ["MosquittoProcess", "find_mosquitto", "free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_mosquitto() -> str:
    """Locate the mosquitto binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if not found:
        raise ConfigError("mosquitto is not installed: sudo apt-get install mosquitto (or run ./scripts/setup)")
    return found


class MosquittoProcess:
    """A Mosquitto child process. Use as a (sync) context manager, or ``start()``/``stop()``.

    ``restart()`` keeps the port and the data directory, so tests can kill and revive the broker.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        host: str = "127.0.0.1",
        websockets_port: int | None = None,
        persistence: bool = False,
        config_text: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.websockets_port = websockets_port
        self.persistence = persistence
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="edgecoop-broker-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = self.workdir / "mosquitto.log"
        self.config_file = self.workdir / "mosquitto.conf"
        self.config_file.write_text(
            config_text
            or development_config(
                self.port,
                host=host,
                data_dir=self.workdir,
                websockets_port=websockets_port,
                persistence=persistence,
                log_file=self.log_file,
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        argv = [find_mosquitto(), "-c", str(self.config_file)]
        # As root, Mosquitto drops to the `mosquitto` user and could not write our temp dir: give it to that user.
        if os.geteuid() == 0:
            with contextlib.suppress(KeyError, OSError):
                import pwd

                pw = pwd.getpwnam("mosquitto")
                for path in (self.workdir, *self.workdir.iterdir()):
                    os.chown(path, pw.pw_uid, pw.pw_gid)
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()} {log[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)  # polling a port that is not open yet; not a correctness sleep
        self.stop()
        raise BrokerError(f"mosquitto did not open {self.host}:{self.port} within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()
