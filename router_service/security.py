"""CurveZMQ keys, the worker allowlist and the ZAP handler that binds a key to a worker name.

Workers connect over TCP across shared cluster networks, so with CURVE on:

* traffic is encrypted (CurveZMQ);
* only keys the operator listed may connect (ZAP, checked on every handshake);
* a key is bound to one worker name — the allowlist file's name (``gpu-7.key`` allows the
  holder of that key to be ``gpu-7`` and nothing else). The ZAP handler sets the connection's
  ``User-Id`` to that name and the transport drops any frame whose routing identity differs,
  so no key can speak or register as another worker;
* the allowlist reloads on SIGHUP: keys that stay are untouched, removed ones are cut off.

Key files are pyzmq's certificate format (``zmq.auth.create_certificates``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` both; ``credit-router keys generate DIR NAME…`` writes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

__all__ = ["ZAP_DOMAIN", "Allowlist", "KeyError_", "ZapHandler", "generate", "load_secret"]

logger = logging.getLogger(__name__)

ZAP_DOMAIN = "credit-router"
"""The ZAP domain the router's sockets ask about (the handler answers for it only)."""


class KeyError_(Exception):
    """A key file is missing or malformed; the message names the file."""


def generate(directory: Path, names: Iterable[str]) -> list[Path]:
    """Write a key pair per name into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        public, secret = zmq.auth.create_certificates(str(directory), name)
        Path(secret).chmod(0o600)
        written += [Path(public), Path(secret)]
    return written


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read key pair {path}: {exc}") from None
    if secret is None:
        raise KeyError_(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


def load_public(path: Path) -> bytes:
    """The Z85 public key of a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyError_(f"cannot read public key {path}: {exc}") from None
    return public


class Allowlist:
    """Public keys allowed to connect, each bound to the worker name of its file."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.names: dict[bytes, str] = {}
        """Z85 public key -> worker name."""
        self.reload()

    def reload(self) -> tuple[set[str], set[str]]:
        """Read the files again; returns ``(added, removed)`` worker names."""
        files = sorted(self.source.glob("*.key")) if self.source.is_dir() else [self.source]
        if not self.source.exists():
            raise KeyError_(f"allowed keys {self.source} do not exist")
        fresh = {load_public(f): f.name.removesuffix(".key") for f in files}
        before = set(self.names.values())
        after = set(fresh.values())
        self.names = fresh
        return after - before, before - after

    def name_of(self, z85_key: bytes) -> str | None:
        """The worker name this key may use, or ``None`` if it is not allowed."""
        return self.names.get(z85_key)


class ZapHandler(AsyncioAuthenticator):
    """ZAP on the router's loop: allow listed keys, name the connection after the key."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], allowlist: Allowlist) -> None:
        super().__init__(context=zmq.asyncio.Context.shadow(context))
        self.allowlist = allowlist
        self.denied = 0

    def start_allowing(self) -> None:
        """Start answering handshakes (call on the running loop)."""
        self.start()
        self.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """Credentials provider hook: is this Z85 key listed?"""
        allowed = self.allowlist.name_of(key) is not None
        if not allowed:
            self.denied += 1
        return allowed

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The connection's User-Id: the worker name its key is bound to."""
        z85 = zmq.utils.z85.encode(client_public_key)
        return self.allowlist.name_of(z85) or ""
