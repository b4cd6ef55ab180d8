"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from router_service import sdnotify


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket on a filesystem path, as systemd's /run/systemd/notify."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def test_ready_reaches_a_path_socket(receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.notify(sdnotify.READY) is True
    assert sock.recv(4096) == b"READY=1"


def test_several_assignments_in_one_datagram(receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    message = "\n".join([sdnotify.STOPPING, sdnotify.status("draining\n12 credits open")])
    assert sdnotify.notify(message) is True
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=draining 12 credits open"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"credit-router-test-{os.getpid()}-{id(monkeypatch)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("STATUS=serving") is True
        assert sock.recv(4096) == b"STATUS=serving"
    finally:
        sock.close()


def test_not_under_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify(sdnotify.READY) is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify(sdnotify.READY) is False


def test_unreachable_socket_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="router_service.sdnotify"):
        assert sdnotify.notify(sdnotify.READY) is False
    assert "failed" in caplog.text


def test_unsupported_socket_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify(sdnotify.READY) is False
