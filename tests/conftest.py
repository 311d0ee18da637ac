"""Tests run on 8 simulated CPU devices; the flag must be set before jax is imported.

They use local files only: the Hub is offline, and a connection to anywhere but this machine
fails the test that makes it (the fake Hub of test_hub.py and the multi-host coordinator listen
on 127.0.0.1).
"""

import os
import socket

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  connect = socket.socket.connect

  def local_only(sock, address):
    if isinstance(address, tuple) and address[0] not in LOCAL_HOSTS:
      raise OSError(f"tests use local files only: refused a connection to {address}")
    return connect(sock, address)

  monkeypatch.setattr(socket.socket, "connect", local_only)
