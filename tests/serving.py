"""A `dpllama serve` process on 127.0.0.1 for the tests: started on a free port, its stderr collected, stopped
(SIGTERM, then SIGKILL) by the test that started it."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


class Server:
    def __init__(self, *args: str, ready: str = "dpllama: ready", timeout: float = 120, env: dict | None = None):
        """`dpllama serve --host 127.0.0.1 --port 0 ARGS`, waited for until a stderr line starts with `ready`."""
        self.proc = subprocess.Popen([sys.executable, "-m", "dpllama.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                                      *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.ended = False      # stderr closed: the process is gone
        self._seen = threading.Condition()
        threading.Thread(target=self._drain, daemon=True).start()
        line = self.wait_for(ready, timeout)
        self.port = int(re.search(r"127\.0\.0\.1:(\d+)", self.wait_for("dpllama: listening", 1)).group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        assert line

    def _drain(self) -> None:
        for line in self.proc.stderr:
            with self._seen:
                self.lines.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self.ended = True
            self._seen.notify_all()

    def wait_for(self, start: str, timeout: float) -> str:
        """The first stderr line that starts with `start`; fails after `timeout` seconds or when the process
        has ended without it."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                found = next((line for line in self.lines if line.startswith(start)), None)
                if found:
                    return found
                if self.ended or time.monotonic() > deadline:
                    pytest.fail(f"no {start!r} from dpllama serve; its stderr:\n" + "\n".join(self.lines[-30:]))
                self._seen.wait(0.2)

    def client(self, api_key: str = "none"):
        import openai
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
