"""Where and how to reach the broker: the URL, credentials, TLS files, and the TLS context built from them."""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from edgecoop.errors import ConfigError

__all__ = ["BrokerSettings", "TlsContext"]


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive: int = 10
    session_expiry_s: int = 3600
    #: ``mqtts://``: TLS with the broker's certificate checked against ``ca_file`` (else the system's CAs) and
    #: its host name; never a fallback to plain text
    tls: bool = False
    ca_file: str | None = None
    #: a client certificate and its key, for brokers that require one (``require_certificate true``)
    cert_file: str | None = None
    key_file: str | None = None
    #: where these settings came from ("--broker", "/etc/edgecoop/x.toml [broker] url", ...), for messages
    origin: str = field(default="", compare=False)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> BrokerSettings:
        """Parse ``mqtt://[user:pass@]host[:port]`` (plain, default port 1883) or ``mqtts://...`` (TLS, 8883).

        Raises :class:`~edgecoop.errors.ConfigError` for anything else: another scheme, a bad port, a path.
        """
        from urllib.parse import unquote, urlsplit

        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        scheme = parts.scheme.lower()
        if scheme not in ("mqtt", "mqtts"):
            raise ConfigError(f"{url!r}: the scheme must be mqtt:// (plain) or mqtts:// (TLS), not {scheme}://")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{url!r}: the port must be a number 1..65535") from exc
        if not parts.hostname:
            raise ConfigError(f"{url!r}: no host name")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{url!r}: a broker URL has no path or query (mqtt://host:port)")
        tls = scheme == "mqtts"
        if not tls:
            for key in ("ca_file", "cert_file", "key_file"):
                kw.pop(key, None)  # TLS files for a plain-text URL: kept out, so the URL alone says what happens
        user = kw.pop("username", None)
        password = kw.pop("password", None)
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            username=unquote(parts.username) if parts.username else user,
            password=unquote(parts.password) if parts.password else password,
            tls=tls,
            **kw,
        )

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def describe(self) -> str:
        """The URL, the user and where it came from: what commands print at start."""
        user = f" as {self.username}" if self.username else ""
        tls = f", CA {self.ca_file or 'system'}" if self.tls else ""
        return f"{self.url}{user} (from {self.origin or 'code'}{tls})"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for ``mqtts``: certificate and host name always checked. ``None`` for plain ``mqtt``."""
        if not self.tls:
            return None
        context = TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED: never turned off
        try:
            if self.ca_file:
                context.load_verify_locations(cafile=self.ca_file)
            else:
                context.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"TLS CA file {self.ca_file}: {exc}") from exc
        if self.cert_file or self.key_file:
            try:
                context.load_cert_chain(self.cert_file or "", self.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"TLS client certificate {self.cert_file} / key {self.key_file}: {exc}") from exc
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


class TlsContext(ssl.SSLContext):
    """An SSL context that remembers the sockets it wrapped, so that a connection attempt can close them.

    paho leaves the socket of a failed TLS handshake (a certificate that does not verify, a plain-text listener)
    open for the garbage collector; every retry would leak one.
    """

    def __init__(self, protocol: int) -> None:
        super().__init__()
        self.wrapped: list[ssl.SSLSocket] = []

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(sock, *args, **kwargs)
        self.wrapped.append(wrapped)  # list.append is atomic: paho connects in an executor thread
        return wrapped

    def close_wrapped(self) -> None:
        """The connection attempt is over: close what it opened (closing twice is harmless)."""
        while self.wrapped:
            self.wrapped.pop().close()
