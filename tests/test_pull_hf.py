"""`dpllama pull hf:OWNER/REPO/FILE.gguf` and `-m hf:...` against a stand-in for the Hugging Face Hub: an HTTP
server on 127.0.0.1, in a thread of the test, answering the requests huggingface_hub makes for a file (HEAD, then
GET, of /OWNER/REPO/resolve/REVISION/FILE) the way the Hub does (its X-Repo-Commit, ETag and X-Error-Code
headers, ranges), and told to fail: cut a download mid-file, answer 500, refuse a gated repository without a
token. dpllama runs as a user runs it, in a process of its own, with HF_ENDPOINT naming the server."""
from __future__ import annotations

import functools
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
from gguf import GGUFReader, GGUFWriter

import helpers
from dpllama import hub
from dpllama.errors import DpllamaError
from helpers import llama2c_dir, random_weights, write_test_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MAX_REQUESTS = 50       # a retry loop gone wild fails the test instead of running on
RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Answer)
        self.files: dict[str, dict[str, bytes]] = {}    # repository -> {path: content}
        self.tokens: dict[str, str] = {}                # gated repository -> the token that opens it
        self.faults: list[str] = []     # what the next GETs do instead: "cut" (half the rest, then the
        self.log: list[tuple] = []      # connection closes), "stall" (half, then silence), "500"; and
        self.stalled = threading.Event()    # (method, path, Range) of each request
        self.ended = threading.Event()      # the test's end, which a stalled answer waits for
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        """A client that gives up on an answer (the faults' timeouts, retries) resets its connection: expected here,
        where socketserver would print a traceback into the test run's output."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class Answer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10        # seconds a connection may stay silent

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def reply(self, status: int, headers: dict[str, str] = {}, length: int = 0):
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(length)}.items():
            self.send_header(k, v)
        self.end_headers()

    def answer(self, body: bool):
        hub_, path = self.server, unquote(urlsplit(self.path).path)
        hub_.log.append((self.command, path, self.headers.get("Range")))
        m = RESOLVE.fullmatch(path)
        if len(hub_.log) > MAX_REQUESTS or m is None:
            return self.reply(500 if m else 404)
        repo, _, file = m.groups()
        if repo not in hub_.files:
            return self.reply(401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if repo in hub_.tokens and self.headers.get("Authorization") != f"Bearer {hub_.tokens[repo]}":
            return self.reply(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to it is restricted"})
        data = hub_.files[repo].get(file)
        if data is None:
            return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Accept-Ranges": "bytes"}
        if not body:
            return self.reply(200, headers, len(data))
        fault = hub_.faults.pop(0) if hub_.faults else None
        if fault == "500":
            return self.reply(500)
        start = int(re.fullmatch(r"bytes=(\d+)-", self.headers["Range"])[1]) if self.headers.get("Range") else 0
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self.reply(206 if start else 200, headers, len(data) - start)
        rest = data[start:]
        if fault == "stall":      # half the rest, then nothing until the test ends
            self.wfile.write(rest[:len(rest) // 2])
            self.wfile.flush()
            hub_.stalled.set()
            hub_.ended.wait(30)
        elif fault == "cut":
            self.wfile.write(rest[:len(rest) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            self.wfile.write(rest)


@pytest.fixture
def fake_hub():
    """The stand-in Hub, serving until the test ends."""
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.ended.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture
def models(tmp_path, monkeypatch):
    """A tiny random model (vocabulary 512, for llama2.c's tok512.bin) as one GGUF, and as the three parts
    gguf-py's writer makes of it with split_max_tensors (llama.cpp's gguf-split format)."""
    weights = random_weights(vocab=512)
    write_test_gguf(tmp_path / "model.gguf", weights)
    (tmp_path / "split").mkdir()
    monkeypatch.setattr(helpers, "GGUFWriter", functools.partial(GGUFWriter, split_max_tensors=8))
    write_test_gguf(tmp_path / "split" / "model.gguf", weights)
    parts = sorted((tmp_path / "split").iterdir())
    assert [p.name for p in parts] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    return tmp_path / "model.gguf", parts


@pytest.fixture
def dpllama(tmp_path, fake_hub, repo_root):
    """Run `dpllama ARGS` against the stand-in Hub (no token unless given), with caches in tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"), DPLLAMA_HOME=str(tmp_path / "home"),
               HF_HUB_DISABLE_TELEMETRY="1")

    def run(*args, **extra):
        return subprocess.run([sys.executable, "-m", "dpllama.cli", *map(str, args)], capture_output=True,
                              text=True, cwd=repo_root, env=dict(env, **extra), timeout=120)
    run.env = env
    return run


def served(tmp_path) -> list:
    """What huggingface_hub's cache holds as files, names only: its blobs, snapshots and refs, not its locks nor
    its records of files the Hub said it lacks (.no_exist)."""
    return sorted(p.name for p in (tmp_path / "hf").rglob("*")
                  if p.is_file() and not {".locks", ".no_exist"} & set(p.parts))


def test_pull_downloads_into_huggingface_hubs_cache(fake_hub, models, dpllama, tmp_path):
    single, _ = models
    fake_hub.files["me/tiny"] = {"sub/model.gguf": single.read_bytes()}
    r = dpllama("pull", "hf:me/tiny/sub/model.gguf")
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    assert path == str(tmp_path / "hf" / "hub" / "models--me--tiny" / "snapshots" / COMMIT / "sub" / "model.gguf")
    assert open(path, "rb").read() == single.read_bytes()
    assert [(m, p) for m, p, _ in fake_hub.log] == [("HEAD", "/me/tiny/resolve/main/sub/model.gguf"),
                                                    ("GET", "/me/tiny/resolve/main/sub/model.gguf")]
    r = dpllama("pull", "hf:me/tiny/sub/model.gguf")            # pulled again: the Hub is asked, nothing sent
    assert r.returncode == 0 and r.stdout.strip() == path and [m for m, _, _ in fake_hub.log] == ["HEAD", "GET", "HEAD"]


def test_cut_connection_resumes(fake_hub, models, dpllama, tmp_path):
    """The connection cut mid-file: huggingface_hub asks again, for the rest of what it had written (Range), or for
    all of it when it had written nothing (it writes 10 MB at a time: so with this file), and the file comes out
    whole."""
    single, _ = models
    data = single.read_bytes()
    fake_hub.files["me/tiny"] = {"model.gguf": data}
    fake_hub.faults = ["cut"]
    r = dpllama("pull", "hf:me/tiny/model.gguf")
    assert r.returncode == 0, r.stderr
    assert open(r.stdout.strip(), "rb").read() == data
    assert [(m, rng) for m, _, rng in fake_hub.log] == [("HEAD", None), ("GET", None), ("GET", None)]


def test_ctrl_c_mid_download_leaves_nothing(fake_hub, models, tmp_path, repo_root, dpllama):
    """Ctrl-C while the file comes: `dpllama: interrupted`, 130, and huggingface_hub's temporary file removed."""
    fake_hub.files["me/tiny"] = {"model.gguf": models[0].read_bytes()}
    fake_hub.faults = ["stall"]
    p = subprocess.Popen([sys.executable, "-m", "dpllama.cli", "pull", "hf:me/tiny/model.gguf"], cwd=repo_root,
                         env=dpllama.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert fake_hub.stalled.wait(60)
        blobs = tmp_path / "hf" / "hub" / "models--me--tiny" / "blobs"
        assert [p.suffix for p in blobs.iterdir()] == [".incomplete"]
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130 and err.endswith("dpllama: interrupted\n") and out == "", err
    assert served(tmp_path) == ["CACHEDIR.TAG", "main"]


def test_failed_download_leaves_nothing_and_the_next_pull_starts_over(fake_hub, models, dpllama, tmp_path):
    single, _ = models
    data = single.read_bytes()
    fake_hub.files["me/tiny"] = {"model.gguf": data}
    fake_hub.faults = ["cut", "500"]
    r = dpllama("pull", "hf:me/tiny/model.gguf")
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
        f"dpllama: error: hf:me/tiny/model.gguf: HTTP 500 from {fake_hub.url}"), r.stderr
    assert r.stdout == "" and served(tmp_path) == ["CACHEDIR.TAG", "main"]     # a ref, no file
    r = dpllama("pull", "hf:me/tiny/model.gguf")
    assert r.returncode == 0 and open(r.stdout.strip(), "rb").read() == data


@pytest.mark.parametrize("name, why", [
    ("hf:me/tiny/nope.gguf", "me/tiny has no file nope.gguf"),
    ("hf:me/other/model.gguf", "no repository me/other on {url} (or it is private: set HF_TOKEN)"),
])
def test_not_found_is_one_line_naming_it(fake_hub, models, dpllama, tmp_path, name, why):
    fake_hub.files["me/tiny"] = {"model.gguf": models[0].read_bytes()}
    r = dpllama("pull", name)
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == f"dpllama: error: {name}: {why.format(url=fake_hub.url)}"
    assert not (tmp_path / "home").exists() and not [f for f in served(tmp_path) if f.endswith(".gguf")]


def test_gated_repository_takes_hf_token(fake_hub, models, dpllama):
    fake_hub.files["me/gated"] = {"model.gguf": models[0].read_bytes()}
    fake_hub.tokens["me/gated"] = "hf_secret"
    r = dpllama("pull", "hf:me/gated/model.gguf")
    assert r.returncode == 1 and r.stderr.splitlines()[-1] == (
        "dpllama: error: hf:me/gated/model.gguf: me/gated is gated: accept its terms on its page, then set HF_TOKEN to "
        "a token of yours"), r.stderr
    r = dpllama("pull", "hf:me/gated/model.gguf", HF_TOKEN="hf_secret")
    assert r.returncode == 0, r.stderr


def test_split_gguf_is_merged_into_one_file(fake_hub, models, dpllama, tmp_path):
    """Any part names them all; the merge is the file gguf-py writes unsplit, byte for byte, and the parts are
    removed once it is in place. Used again, it is read from the cache with no request."""
    single, parts = models
    fake_hub.files["me/tiny"] = {p.name: p.read_bytes() for p in parts}
    r = dpllama("pull", "hf:me/tiny/model-00002-of-00003.gguf")
    assert r.returncode == 0, r.stderr
    merged = tmp_path / "home" / "models" / "hf" / "me" / "tiny" / "model.gguf"
    assert r.stdout == f"{merged}\n" and merged.read_bytes() == single.read_bytes()
    assert "split.count" not in GGUFReader(merged).fields
    assert sorted(p.name for p in merged.parent.iterdir()) == ["model.gguf"]
    assert sorted(p for m, p, _ in fake_hub.log if m == "GET") == [f"/me/tiny/resolve/main/{p.name}" for p in parts]
    requests = len(fake_hub.log)
    r = dpllama("tokenize", "-m", "hf:me/tiny/model-00001-of-00003.gguf", "-z", llama2c_dir() / "tok512.bin", "hi")
    assert r.returncode == 0 and len(fake_hub.log) == requests, r.stderr


def test_split_interrupted_keeps_the_parts_it_has(fake_hub, models, dpllama, tmp_path):
    """A split pull that fails at part 3 keeps parts 1 and 2; the next pull fetches part 3 only."""
    _, parts = models
    fake_hub.files["me/tiny"] = {p.name: p.read_bytes() for p in parts[:2]}
    r = dpllama("pull", "hf:me/tiny/model-00001-of-00003.gguf")
    assert r.returncode == 1 and r.stderr.endswith(": me/tiny has no file model-00003-of-00003.gguf\n"), r.stderr
    folder = tmp_path / "home" / "models" / "hf" / "me" / "tiny"
    assert [p.name for p in folder.iterdir()] == [".parts.model.gguf"]
    fake_hub.files["me/tiny"][parts[2].name] = parts[2].read_bytes()
    fake_hub.log.clear()
    r = dpllama("pull", "hf:me/tiny/model-00001-of-00003.gguf")
    assert r.returncode == 0, r.stderr
    assert [p for m, p, _ in fake_hub.log if m == "GET"] == [f"/me/tiny/resolve/main/{parts[2].name}"]


def merge_error(tmp_path, parts) -> str:
    dest = tmp_path / "merged.gguf"
    with pytest.raises(DpllamaError) as e:
        hub.merge_split(parts, dest)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")) == [] and not dest.exists()
    return str(e.value)


def test_merge_checks_the_split_metadata(models, tmp_path):
    _, parts = models
    assert merge_error(tmp_path, [parts[1], parts[0], parts[2]]) == (
        "model-00002-of-00003.gguf: its split.no and split.count are 1 and 3, expected 0 and 3 (part 1 of 3)")
    assert merge_error(tmp_path, parts[:2]).startswith("model-00001-of-00003.gguf: its split.no and split.count "
                                                       "are 0 and 3, expected 0 and 2")
    cut = tmp_path / parts[2].name
    cut.write_bytes(parts[2].read_bytes()[:-100])
    assert merge_error(tmp_path, [*parts[:2], cut]).startswith(f"{cut.name}: not a whole GGUF (a part cut short?): ")


@pytest.mark.parametrize("split", [False, True])
def test_generate_from_hf(fake_hub, models, dpllama, split):
    single, parts = models
    fake_hub.files["me/tiny"] = {p.name: p.read_bytes() for p in [single, *parts]}
    name = f"hf:me/tiny/{parts[0].name if split else single.name}"
    r = dpllama("generate", "-m", name, "-z", llama2c_dir() / "tok512.bin", "-p", "Once", "-n", 8, "-t", 0)
    assert r.returncode == 0 and r.stdout.startswith("Once") and len(r.stdout) > len("Once"), r.stderr
    assert "tok/s" in r.stderr


@pytest.mark.parametrize("name, message", [
    ("hf:me/tiny", "hf:me/tiny: give hf:OWNER/REPO/FILE.gguf"),
    ("hf:me/tiny/", "hf:me/tiny/: give hf:OWNER/REPO/FILE.gguf"),
    ("hf:me/tiny/../x.gguf", "hf:me/tiny/../x.gguf: '.', '..' and '\\' have no place in a Hugging Face path"),
    ("hf:me/tiny/model.bin", "hf:me/tiny/model.bin: not a .gguf file (dpllama loads GGUF models)"),
    ("hf:me/tiny/m-00004-of-00003.gguf", "hf:me/tiny/m-00004-of-00003.gguf: part 4 of 3?"),
    ("tiny-llama", "unknown model 'tiny-llama' (known: smollm2-135m, qwen2.5-coder-0.5b; or hf:OWNER/REPO/FILE.gguf)"),
])
def test_bad_names_are_one_line_and_ask_nothing(fake_hub, dpllama, tmp_path, name, message):
    r = dpllama("pull", name)
    assert r.returncode == 1 and r.stderr == f"dpllama: error: {message}\n", r.stderr
    r = dpllama("generate", "-m", name)
    assert r.returncode == 1 and r.stderr.startswith(f"dpllama: error: {name if 'known' in message else message}")
    assert fake_hub.log == [] and not (tmp_path / "home").exists() and not (tmp_path / "hf").exists()
