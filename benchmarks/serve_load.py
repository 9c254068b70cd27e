"""Load on `dpllama serve`: 1, 2, 4, 8 and 16 concurrent streaming clients, each a different prompt of about 128
tokens and 128 tokens out (greedy, or sampled with --temperature), and per level the aggregate output tok/s,
p50/p95 time to first token and p50/p95 inter-token latency. With llama-cpp-python's server importable (`pip install 'llama-cpp-python[server]'`),
the same load on it, same GGUF, in the same run.

    python benchmarks/serve_load.py                       # SmolLM2-135M, from dpllama's cache
    python benchmarks/serve_load.py --levels 1,8 --no-llama-cpp --rounds 5
    python benchmarks/serve_load.py --temperature 0.7 --top-p 0.9 # sampled, as chat clients ask
    python benchmarks/serve_load.py --temperature 0.8 --top-k 40 --top-p 0.95     # llama.cpp's way

With --rounds N the levels run N times over (new prompts each time) and the table gives each figure's median; each
level's aggregate is also given against the first level's of the same round (a 2-vCPU VM drifts by 20% from
minute to minute, and a ratio of two runs a minute apart moves with it).

    python benchmarks/serve_load.py --beside 7000 --rounds 2     # a stream, and a 7,000-token prompt beside it

With --beside N, instead of the levels: one stream runs, and once it does a prompt of about N tokens comes (one
token out); how long that prompt takes, and how many tokens the stream got meanwhile and how long it waited for
them (dpllama only: llama-cpp-python's server runs one request at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as http

REPO = Path(__file__).resolve().parents[1]
STORY = ("The old lighthouse keeper climbed the stairs every evening to light the lamp, and every evening he "
         "counted the ships that passed the rocks below, writing their names in a book that nobody read. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(model_path: Path, levels: list[int], tokens: int, rounds: int = 1) -> dict[tuple[int, int], list[str]]:
    """For each round and level (and level 0, the warm-up), as many texts of about `tokens` tokens as the level has
    clients (the model's tokenizer, no device). Each text starts with its own tag, so no request finds its prompt
    in a slot's cache from an earlier one (both servers reuse a cached prefix)."""
    from dpllama.loaders import load_tokenizer, load_weights
    tok = load_tokenizer(load_weights(model_path), None, model_path)
    out = {}
    for r in range(rounds):
        for level in [0, *levels]:
            out[r, level] = [tok.decode(tok.encode(f"Story {r}.{level}-{i + 1}. " + STORY * (tokens // 30 + 2),
                                                   bos=False)[:tokens]) for i in range(max(level, 1))]
    return out


def start(cmd: list[str], url: str, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve_load: {' '.join(cmd)} exited with {proc.returncode}")
        try:
            if http.get(url, timeout=2).status_code == 200:
                return proc
        except http.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"serve_load: {' '.join(cmd)} not ready after {timeout:.0f} s")


def client(session: http.Client, base: str, model: str, prompt: str, max_tokens: int, out: list,
           sampling: dict) -> None:
    """One streaming completion: when it was sent, and when each chunk with text came."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, **sampling}
    sent, times = time.perf_counter(), []
    with session.stream("POST", f"{base}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())
    out.append((sent, times))


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] if values else float("nan")


def level(session: http.Client, base: str, model: str, texts: list[str], n: int, max_tokens: int,
          sampling: dict) -> dict:
    """n concurrent clients, client i sending texts[i], all through `session`, made once for the run: a client of
    its own per stream (httpx's http.stream) builds an SSL context each, ~20 ms of CPU, and at 8 streams that put
    ~150 ms of the benchmark's own set-up inside the measured time, on the cores the server computes on."""
    results: list = []
    threads = [threading.Thread(target=client, args=(session, base, model, texts[i], max_tokens, results, sampling))
               for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [times[0] - sent for sent, times in results if times]
    itl = [b - a for _, times in results for a, b in zip(times, times[1:])]
    tokens = sum(len(times) for _, times in results)
    return {"clients": n, "tokens": tokens, "tok_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "itl_p50": pct(itl, 50), "itl_p95": pct(itl, 95)}


def beside(session: http.Client, base: str, model: str, long_text: str) -> dict:
    """A greedy stream, and `long_text` as a prompt once the stream runs: the prompt's seconds, and the stream's
    tokens while it was read, with their gaps' median and longest. The stream is closed once the prompt is done."""
    done, times = threading.Event(), []

    def stream():
        body = {"model": model, "prompt": "Once upon a time", "max_tokens": 100000, "stream": True, "temperature": 0}
        with session.stream("POST", f"{base}/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
                if done.is_set() or line == "data: [DONE]":
                    return
    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    t1 = time.perf_counter()
    r = session.post(f"{base}/v1/completions", json={"model": model, "prompt": long_text, "max_tokens": 1,
                                                     "temperature": 0})
    t2 = time.perf_counter()
    done.set()
    t.join()
    r.raise_for_status()
    gaps = [b - a for a, b in zip(times, times[1:]) if t1 <= b <= t2]
    return {"prompt_tokens": r.json()["usage"]["prompt_tokens"], "prompt_s": t2 - t1, "stream_tokens": len(gaps),
            "gap_p50": pct(gaps, 50), "gap_max": max(gaps, default=float("nan"))}


def run_server(name: str, cmd: list[str], ready: str, model: str, texts: dict[tuple[int, int], list[str]],
               levels: list[int], max_tokens: int, rounds: int = 1, sampling: dict | None = None) -> list[dict]:
    """The rows of each level on the server `cmd` starts, once `ready` (a URL) answers 200: per level, the medians
    over `rounds` rounds, and `vs_first`, the median over rounds of its aggregate against the first level's."""
    base = ready.rsplit("/", 1)[0].removesuffix("/v1")
    proc = start(cmd, ready)
    session = http.Client(timeout=600, limits=http.Limits(max_connections=max(levels),
                                                          max_keepalive_connections=max(levels)))
    try:
        sampling = sampling or {"temperature": 0}
        level(session, base, model, texts[0, 0], 1, 8, sampling)     # warm up
        runs = []
        for r in range(rounds):
            for n in levels:
                row = {"server": name, "round": r, **level(session, base, model, texts[r, n], n, max_tokens, sampling)}
                print(json.dumps(row), file=sys.stderr, flush=True)
                runs.append(row)
        first = {row["round"]: row["tok_s"] for row in runs if row["clients"] == levels[0]}
        rows = []
        for n in levels:
            mine = [row for row in runs if row["clients"] == n]
            rows.append({"server": name, "clients": n, "rounds": rounds,
                         **{k: statistics.median(row[k] for row in mine) for k in mine[0] if k not in
                            ("server", "round", "clients")},
                         "vs_first": statistics.median(row["tok_s"] / first[row["round"]] for row in mine)})
        return rows
    finally:
        session.close()
        proc.terminate()
        proc.wait(60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default="smollm2-135m", help="dpllama's model name or a GGUF path")
    p.add_argument("--levels", default="1,2,4,8,16", help="concurrent clients per level (default 1,2,4,8,16)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="llama-cpp-python's threads (default 2)")
    p.add_argument("--no-llama-cpp", action="store_true", help="dpllama only")
    p.add_argument("--rounds", type=int, default=1, help="run the levels this many times over; medians (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling's top-p (default 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling's k (default 0: off)")
    p.add_argument("--beside", type=int, default=0, metavar="N",
                   help="instead of the levels: a prompt of about N tokens beside a running stream")
    args = p.parse_args()
    if args.beside:
        return run_beside(args)
    levels = [int(n) for n in args.levels.split(",")]
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": 1} \
        if args.temperature else {"temperature": 0}
    from dpllama.hub import resolve_model
    path = resolve_model(args.model)
    texts = prompts(path, levels, args.prompt_tokens, args.rounds)
    ctx = str(args.prompt_tokens + args.max_tokens + 64)
    port = free_port()
    rows = run_server("dpllama", [sys.executable, "-m", "dpllama.cli", "serve", "-m", str(path), "--port", str(port),
                                  "--parallel", str(max(levels)), "--ctx", ctx, "--model-name", "m"],
                      f"http://127.0.0.1:{port}/health", "m", texts, levels, args.max_tokens, args.rounds, sampling)
    try:
        import llama_cpp.server  # noqa: F401
        have_llama_cpp = not args.no_llama_cpp
    except ImportError as e:
        have_llama_cpp = False
        if not args.no_llama_cpp:
            print(f"serve_load: llama-cpp-python's server is not importable ({e}): dpllama only", file=sys.stderr)
    if have_llama_cpp:
        port = free_port()
        rows += run_server("llama-cpp-python", [sys.executable, "-m", "llama_cpp.server", "--model", str(path),
                                                "--host", "127.0.0.1", "--port", str(port), "--n_threads",
                                                str(args.threads), "--n_ctx", ctx, "--model_alias", "m",
                                                # by default a new request cuts the running stream off
                                                "--interrupt_requests", "False"],
                           f"http://127.0.0.1:{port}/v1/models", "m", texts, levels, args.max_tokens,
                           args.rounds, sampling)  # no /health
    how = f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}" if args.temperature else "greedy"
    print(f"{os.cpu_count()} CPUs, {path.name}, prompts of {args.prompt_tokens} tokens, {args.max_tokens} out, {how}"
          + (f", medians of {args.rounds} rounds" if args.rounds > 1 else "") + "\n")
    print(f"| server | clients | aggregate tok/s | vs {levels[0]} client(s) | TTFT p50 (s) | TTFT p95 (s) | "
          "inter-token p50 (ms) | inter-token p95 (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['tok_s']:.1f} | {r['vs_first']:.2f}x | {r['ttft_p50']:.2f} | "
              f"{r['ttft_p95']:.2f} | {r['itl_p50'] * 1000:.0f} | {r['itl_p95'] * 1000:.0f} |")
    return 0


def run_beside(args) -> int:
    from dpllama.hub import resolve_model
    path = resolve_model(args.model)
    texts = prompts(path, [1], args.beside, args.rounds)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "dpllama.cli", "serve", "-m", str(path), "--port", str(port), "--parallel",
                  "2", "--ctx", str(args.beside + 64), "--model-name", "m"], f"{base}/health")
    rows = []
    try:
        with http.Client(timeout=600) as session:
            for r in range(args.rounds):
                rows.append(beside(session, base, "m", texts[r, 1][0]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"{os.cpu_count()} CPUs, {path.name}, a greedy stream and a prompt beside it\n")
    print("| prompt tokens | prompt s | stream's tokens meanwhile | their gap p50 (s) | longest gap (s) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['prompt_tokens']} | {r['prompt_s']:.1f} | {r['stream_tokens']} | {r['gap_p50']:.2f} | "
              f"{r['gap_max']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
