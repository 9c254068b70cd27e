"""`dpllama serve --replicas 2`: two engines as Ray Serve replicas behind Ray's HTTP proxy on 127.0.0.1, the same
API; both serve requests. Skips where Ray Serve is not installed (the `ray` extra, about 240 MB, which the
README's set-up leaves out and .ci/run installs)."""
from __future__ import annotations

import socket
import time

import pytest

from tests.serving import Server
from tests.test_serve import MODEL, stories_args

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'dpllama[ray]')")
http = pytest.importorskip("httpx2", reason="openai's HTTP client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_both_serve():
    port = free_port()
    # Ray's proxy takes no --port 0: a port free now
    with Server(*stories_args("--replicas", "2", "--port", str(port)), ready="dpllama: listening",
                timeout=180) as s:
        url = f"http://127.0.0.1:{port}"
        replicas, deadline = set(), time.monotonic() + 120
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        texts = set()
        for _ in range(200):
            if len(replicas) == 2 or time.monotonic() > deadline:
                break
            r = http.post(f"{url}/v1/completions", json=body, timeout=30)
            if r.status_code == 503:        # a replica still loading its model
                time.sleep(0.2)
                continue
            assert r.status_code == 200, r.text
            replicas.add(r.headers["x-dpllama-replica"])
            texts.add(r.json()["choices"][0]["text"])
        assert len(replicas) == 2, f"only {replicas} answered"
        assert len(texts) == 1      # the same greedy text from each
    assert s.proc.returncode == 0
