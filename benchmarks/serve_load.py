"""Serving under load: `tinyinfer serve` on loopback against `tinyinfer batch` on the same prompts.

    python3 benchmarks/serve_load.py        # bard, numba, 256 requests from 32 clients, of 32 and of 128 tokens
    python3 benchmarks/serve_load.py --backend numpy --requests 128 --max-tokens 64 --threads auto

One server per --chunk-intervals value is started (`tinyinfer serve`, each a process of its
own) and warmed up. Then each round, taking turns, runs the same requests every way, for each
of the --max-tokens lengths:

- offline: `tinyinfer batch` on a JSONL file of the prompts (the engine given every request at
  once, no HTTP), its throughput as the command reports it (generated tokens over the time it
  stepped the engine);
- online, on each server: --concurrency clients (asyncio tasks in this process) share the
  requests between them, each sending its next one as soon as the last is answered, streamed
  ("stream": true), so each request's time to first token and time per output token are
  measured as a client sees them; throughput is all output tokens over the wall time from the
  first request sent to the last answer received.

Every request is greedy with ignore_eos, so both paths generate exactly its --max-tokens tokens.
The table gives the median round of each, serve's throughput as a share of batch's (of
those medians, and of each round's pair). The
server's cost is mostly per request (HTTP, the handler, tokenizing the prompt), so it is a
larger share of short answers.

The engine gets the same number of threads in both paths: by default serve's own, every core
but one (the one left to the HTTP side: the server's event loop, and here the clients too). In
the offline run that core is idle, so the comparison is of the serving path itself, not of how
many cores the HTTP side takes from the kernels. (With --threads auto, on a machine of two
cores, the batch run takes both and runs faster, while the server's kernels take two threads
too and stall whenever the event loop or a client needs a core: a kernel's threads all wait
for the slowest, tinyinfer/threads.py.) The clients speak HTTP by hand and do not parse the
events, to take as little of the machine as they can.
"""

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tinyinfer.threads import available_cores

NAMES = ("ROMEO", "JULIET", "HAMLET", "OTHELLO", "PROSPERO", "MIRANDA", "KING LEAR", "PORTIA")
LINES = ("Speak.", "Who is there?", "Good morrow, friend.", "Alas, the day!", "Come hither, boy.", "What news?",
         "Peace, I say.", "Farewell, and be gone.", "O, what a night is this!", "Stand, and unfold yourself.",
         "I know not why.", "Give me your hand.", "The king is coming.", "Is it so?", "Where is my lord?",
         "Let us go in.", "How now, what noise?", "Thou art a villain.", "Hark, the bell!", "Sweet, good night.",
         "My lord, I come.", "What is the matter?", "Hence, away!", "Be patient.", "Who calls?", "Wherefore?",
         "I will, my lord.", "Such a night as this.", "Draw, if you be men.", "Good even.", "Tell me, sir.",
         "Here comes the duke.")


def prompts(count: int) -> list[str]:
    """count distinct prompts, a speaker and a first line each."""
    every = [f"{name}.\n{line}" for line in LINES for name in NAMES]
    return [every[i % len(every)] + ("" if i < len(every) else f" ({i // len(every)})") for i in range(count)]


# ---- offline: tinyinfer batch --------------------------------------------------------------
def run_batch(args, max_tokens: int, prompts_file: Path, work: Path) -> float:
    """Output tokens/s of `tinyinfer batch` on the prompts (as it reports them)."""
    out = work / "results.jsonl"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "tinyinfer.cli", "batch", str(prompts_file), "--out", str(out),
               "--backend", args.backend, "--max-num-seqs", str(args.max_num_seqs), "--threads", args.threads]
    report = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.search(r"(\d+) tokens in [\d.]+ s \(([\d.]+) tokens/s\)", report)
    expected = args.requests * max_tokens
    if not match or int(match.group(1)) != expected:
        raise RuntimeError(f"tinyinfer batch generated other than {expected} tokens: {report}")
    return float(match.group(2))


# ---- online: tinyinfer serve ---------------------------------------------------------------
def start_server(args, chunk_interval: float) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "tinyinfer.cli", "serve", "--backend", args.backend, "--port", str(port),
               "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", str(args.requests),
               "--log-level", "warning", "--threads", args.threads, "--chunk-interval", str(chunk_interval)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("tinyinfer serve did not start")
        time.sleep(0.1)


async def one_request(connection, host: str, prompt: str, max_tokens: int) -> dict:
    """Send one streamed request on a kept-alive connection (reader, writer); its time to
    first token, time per output token and token count.

    HTTP/1.1 is spoken by hand here (a request line, headers, then the chunked event stream read
    as it comes): the clients share the machine with the server, and a full client library
    spends about as much CPU per event as the server does, which on a small machine is taken
    from the server. The events are not parsed, only timed; the token count comes from the
    usage chunk at the end."""
    reader, writer = connection
    body = json.dumps({"model": "bard", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    headers = await reader.readuntil(b"\r\n\r\n")
    if not headers.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"the server answered {headers.splitlines()[0].decode()}")
    first = last = None
    tail = b""
    while not tail.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of a chunked response
        data = await reader.read(65536)
        if not data:
            raise RuntimeError("the server closed the connection mid-answer")
        last = time.perf_counter()
        first = first or last
        tail = (tail + data)[-400:]
    tokens = int(re.search(rb'"completion_tokens":(\d+)', tail).group(1))
    return {"ttft": first - start, "tpot": (last - first) / max(1, tokens - 1), "tokens": tokens}


async def load_test(url: str, all_prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """--concurrency clients share the prompts; each sends its next as soon as the last is done."""
    host, port = url.removeprefix("http://").split(":")
    pending = list(reversed(all_prompts))
    results = []

    async def client():  # one connection each, kept alive, as a client library's pool does
        connection = await asyncio.open_connection(host, int(port))
        while pending:
            results.append(await one_request(connection, host, pending.pop(), max_tokens))
        connection[1].close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
        "ttft_p50": statistics.median(r["ttft"] for r in results),
        "ttft_p99": statistics.quantiles([r["ttft"] for r in results], n=100)[98],
        "tpot_p50": statistics.median(r["tpot"] for r in results),
        "seconds": elapsed,
        "requests": len(results),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", default="32,128",
                        help="tokens each request generates, comma-separated: one load test of each (128 is the "
                             "output length of vLLM's benchmark_serving with random prompts)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the engine's, for both paths")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default=str(max(1, available_cores() - 1)),
                        help="the engine's CPU threads, for both paths (default: serve's, every core but one)")
    parser.add_argument("--chunk-intervals", default="0.02,0",
                        help="serve's --chunk-interval for each server, comma-separated (0.02: the default; 0: "
                             "every token its own chunk)")
    args = parser.parse_args()
    intervals = [float(value) for value in args.chunk_intervals.split(",")]
    lengths = [int(value) for value in args.max_tokens.split(",")]

    all_prompts = prompts(args.requests)
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    prompt_files = {}
    for length in lengths:
        prompt_files[length] = work / f"prompts_{length}.jsonl"
        prompt_files[length].write_text("".join(json.dumps({"prompt": p, "max_tokens": length, "temperature": 0,
                                                            "ignore_eos": True}) + "\n" for p in all_prompts))
    servers = []
    try:
        for interval in intervals:
            servers.append(start_server(args, interval))
            asyncio.run(load_test(servers[-1][1], all_prompts[: args.concurrency], args.concurrency,
                                  lengths[0]))  # warm-up
        offline = {length: [] for length in lengths}
        online = {(length, interval): [] for length in lengths for interval in intervals}
        for round_number in range(args.rounds):  # taking turns, so a change in the machine touches every path
            for length in lengths:
                offline[length].append(run_batch(args, length, prompt_files[length], work))
                report = [f"batch {offline[length][-1]:.0f}"]
                for interval, (_, url) in zip(intervals, servers):
                    result = asyncio.run(load_test(url, all_prompts, args.concurrency, length))
                    online[length, interval].append(result)
                    report.append(f"serve {interval * 1000:g} ms {result['tokens_per_s']:.0f}")
                print(f"round {round_number + 1}, {length} tokens: " + ", ".join(report) + " tokens/s",
                      file=sys.stderr, flush=True)
    finally:
        for server, _ in servers:
            server.terminate()
            server.wait(timeout=30)

    print(f"bard, {args.backend}, --threads {args.threads}, {args.requests} requests from {args.concurrency} clients, "
          f"max_num_seqs {args.max_num_seqs}; the median of {args.rounds} rounds\n")
    print("| tokens a request | path | output tok/s | share of batch | each round's share | p50 TTFT | p99 TTFT "
          "| p50 TPOT |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for length in lengths:
        batch_rate = statistics.median(offline[length])
        print(f"| {length} | tinyinfer batch (offline) | {batch_rate:.0f} | 100% | | | | |")
        for interval in intervals:
            runs = online[length, interval]
            median = sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]
            shares = [run["tokens_per_s"] / batch for run, batch in zip(runs, offline[length])]  # side by side
            print(f"| {length} | tinyinfer serve, streamed, --chunk-interval {interval:g} | "
                  f"{median['tokens_per_s']:.0f} | {median['tokens_per_s'] / batch_rate:.0%} | "
                  f"{min(shares):.0%}-{max(shares):.0%} | {1e3 * median['ttft_p50']:.0f} ms | "
                  f"{1e3 * median['ttft_p99']:.0f} ms | {1e3 * median['tpot_p50']:.2f} ms |")


if __name__ == "__main__":
    main()
