"""Tests run on 8 simulated CPU devices; the flag must be set before jax is imported.

They use local files only: the Hub is offline, its download functions refuse, and a name lookup
or connection beyond this machine fails the test that makes it (the fake Hub of test_hub.py and
the multi-host coordinator listen on 127.0.0.1).
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

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", socket.gethostname())

# What the guard lets through to; a test of the guard swaps these for recorders.
real_connect = socket.socket.connect
real_getaddrinfo = socket.getaddrinfo


def _refuse_unless_local(host) -> None:
  if host not in LOCAL_HOSTS:
    raise OSError(f"tests use local files only: refused to reach {host!r}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Refuses name lookups and connections beyond this machine, before any packet is sent."""
  def connect(sock, address):
    if isinstance(address, tuple):
      _refuse_unless_local(address[0])
    return real_connect(sock, address)

  def getaddrinfo(host, *args, **kwargs):
    if host is not None:
      _refuse_unless_local(host.decode() if isinstance(host, bytes) else host)
    return real_getaddrinfo(host, *args, **kwargs)

  monkeypatch.setattr(socket.socket, "connect", connect)
  monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.fixture(autouse=True)
def no_hub_downloads(monkeypatch):
  """Makes huggingface_hub's download functions refuse, whatever the offline mode: flax-sum
  downloads through them, and a test of that code replaces them with a local fake."""
  import huggingface_hub

  def refuse(repo_id, *args, **kwargs):
    raise OSError(f"tests use local files only: refused to download {repo_id!r} from the Hub")

  for name in ("snapshot_download", "hf_hub_download"):
    monkeypatch.setattr(huggingface_hub, name, refuse)
