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
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from credit_common.keys import KeyError_, generate, load_public, load_secret

__all__ = ["ZAP_DOMAIN", "Allowlist", "KeyError_", "ZapHandler", "generate", "load_secret"]

logger = logging.getLogger(__name__)

ZAP_DOMAIN = "credit-router"
"""The ZAP domain the router's sockets ask about (the handler answers for it only)."""


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
