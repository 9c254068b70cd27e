"""`dpllama serve`: an OpenAI-compatible HTTP server (app.py) over an engine that runs several requests in the
model's slots (engine.py), with its request bodies (schemas.py), Prometheus metrics (metrics.py) and Ray Serve
replicas (ray_serve.py). FastAPI, uvicorn, prometheus_client and ray are imported here only, so that no other
command loads them."""
from __future__ import annotations

import os

# --reasoning-format's and a chat request's reasoning_format, llama-server's: auto and deepseek take a reply's
# thinking out of its content into reasoning_content (app.Thinking), none leaves it in the content
REASONING_FORMATS = ("auto", "deepseek", "none")


def log(line: str) -> None:
    """One line on stderr in one write, so that a signal's line cannot land inside it; lost, not raised, once
    nobody reads stderr (`dpllama serve 2>&1 | head`, a log shipper gone): the server goes on serving, and a
    SIGTERM still stops it."""
    try:
        os.write(2, (line + "\n").encode(errors="replace"))
    except OSError:
        pass
