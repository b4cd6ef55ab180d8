"""Which SSE client should the OpenAI executor read streams with? A small benchmark.

    .venv/bin/python scripts/bench_sse.py [--streams 8] [--tokens 300] [--gap-ms 1] [--json]

A server process streams chat-completion chunks, one token an event, ``--gap-ms`` apart, each
stamped with the server's ``perf_counter`` as it is written (CLOCK_MONOTONIC: one clock for
every process on the machine). Each client reads ``--streams`` such streams at once and stamps
every token as it sees it. Reported per client, all within one run (ratios, not absolutes, are
what to compare on a shared machine):

* ``lag_p50_ms``, ``lag_p99_ms``: token seen − token written. What a TTFT or an ITL measured
  by that client carries on top of the server's own timing.
* ``itl_err_p50_us``: |client gap − server gap| between consecutive tokens, the error of each
  inter-token latency sample.
* ``cpu_us_per_token``: the client process's CPU time over the tokens read (parsing the event
  and its JSON included: every client gets the same ``delta.content`` out).
* ``coverage``: the stream shapes of docs/WORKER.md the client handles as it comes, without
  code of ours around it: an ``event: error`` (the event name reaches the caller), a 600 KiB
  event, CR-only line ends, vLLM's ``delta.reasoning`` (reaches the caller).

Clients: ``ours`` (``worker_agent.sse.SSEDecoder`` on aiohttp body chunks, the chat adapter's
msgspec decoding), ``aiohttp-lines`` (aiohttp's line reader, the executor's previous parser),
``httpx-sse`` (on httpx), ``aiohttp-sse-client``, ``openai`` (the official client's
``AsyncOpenAI`` streaming). Missing libraries are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import msgspec
from aiohttp import web

from worker_agent.apis import Generation, StreamFailure, api_named
from worker_agent.sse import SSEDecoder

Stamp = tuple[float, float]
"""(server time written, client time seen) of one token."""


# ---------------------------------------------------------------------- the server


def _chunk(content: str, sent: float, **delta: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "model": "bench",
        "choices": [{"index": 0, "delta": {"content": content, **delta}, "finish_reason": None}],
        "t": sent,
    }


async def _stream(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    tokens, gap = int(body["max_tokens"]), float(body["gap_s"])
    shape = body.get("shape", "plain")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    end = b"\r" if shape == "cr" else b"\n"
    for i in range(tokens):
        if i:
            await asyncio.sleep(gap)
        sent = time.perf_counter()
        content = "x" * (600 << 10) if shape == "long" and i == 1 else f" w{i}"
        extra = {"reasoning": "hmm"} if shape == "reasoning" else {}
        line = b"data: " + json.dumps(_chunk(content, sent, **extra)).encode() + end + end
        if shape == "error" and i == 1:
            line = b"event: error" + end + b'data: {"type": "error", "message": "boom"}' + end * 2
        await response.write(line)
    await response.write(b"data: [DONE]" + end + end)
    return response


def _serve(port: int, ready: Any) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _stream)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


# ---------------------------------------------------------------------- the clients

Client = Callable[[str, dict[str, Any], list[Stamp], list[str]], Awaitable[None]]
"""Read one stream from URL with BODY, append a stamp per token and the events' names."""

_plain: Any = msgspec.json.Decoder()


async def ours(url: str, body: dict[str, Any], stamps: list[Stamp], names: list[str]) -> None:
    api = api_named("chat")
    clock = time.perf_counter
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as r:
        decoder = SSEDecoder()
        gen = Generation()
        async for raw in r.content.iter_any():
            now = clock()
            for event in decoder.feed(raw):
                names.append(event.event)
                seen = gen.content_events + gen.reasoning_events
                try:
                    api.on_event(gen, event, now)
                except StreamFailure:
                    names.append("error")
                    continue
                if gen.content_events + gen.reasoning_events > seen:
                    stamps.append((_plain.decode(event.data)["t"], now))
                    if gen.reasoning_events:
                        names.append("reasoning")


async def aiohttp_lines(
    url: str, body: dict[str, Any], stamps: list[Stamp], names: list[str]
) -> None:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as r:
        async for line in r.content:
            now = time.perf_counter()
            line = line.strip()
            if line.startswith(b"event:"):
                names.append(line[6:].strip().decode())
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            doc = _plain.decode(line[5:])
            if "choices" in doc:
                delta = doc["choices"][0]["delta"]
                if delta.get("reasoning"):
                    names.append("reasoning")
                if delta.get("content"):
                    stamps.append((doc["t"], now))


async def httpx_sse(url: str, body: dict[str, Any], stamps: list[Stamp], names: list[str]) -> None:
    import httpx
    from httpx_sse import aconnect_sse

    async with (
        httpx.AsyncClient(timeout=30) as http,
        aconnect_sse(http, "POST", url, json=body) as source,
    ):
        async for sse in source.aiter_sse():
            now = time.perf_counter()
            names.append(sse.event if sse.event != "message" else "")
            if sse.data == "[DONE]":
                break
            doc = json.loads(sse.data)
            if "choices" in doc:
                delta = doc["choices"][0]["delta"]
                if delta.get("reasoning"):
                    names.append("reasoning")
                if delta.get("content"):
                    stamps.append((doc["t"], now))


async def aiohttp_sse_client(
    url: str, body: dict[str, Any], stamps: list[Stamp], names: list[str]
) -> None:
    from aiohttp_sse_client import client as sse_client

    async with sse_client.EventSource(
        url, option={"method": "POST"}, json=body, timeout=30
    ) as source:
        async for event in source:
            now = time.perf_counter()
            names.append(event.type if event.type != "message" else "")
            if event.data == "[DONE]":
                break
            doc = json.loads(event.data)
            if "choices" in doc:
                delta = doc["choices"][0]["delta"]
                if delta.get("reasoning"):
                    names.append("reasoning")
                if delta.get("content"):
                    stamps.append((doc["t"], now))


async def openai_client(
    url: str, body: dict[str, Any], stamps: list[Stamp], names: list[str]
) -> None:
    import openai

    base = url.removesuffix("/chat/completions")
    async with openai.AsyncOpenAI(base_url=base, api_key="bench", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="bench",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_body={k: v for k, v in body.items() if k not in ("model", "stream")},
        )
        try:
            async for chunk in stream:
                now = time.perf_counter()
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if (delta.model_extra or {}).get("reasoning"):
                    names.append("reasoning")
                if delta.content:
                    stamps.append(((chunk.model_extra or {})["t"], now))
        except openai.APIError:
            names.append("error")


CLIENTS: dict[str, tuple[Client, str | None]] = {
    "ours": (ours, None),
    "aiohttp-lines": (aiohttp_lines, None),
    "httpx-sse": (httpx_sse, "httpx_sse"),
    "aiohttp-sse-client": (aiohttp_sse_client, "aiohttp_sse_client"),
    "openai": (openai_client, "openai"),
}


# ---------------------------------------------------------------------- measuring


async def _run(client: Client, url: str, streams: int, tokens: int, gap_s: float) -> dict[str, Any]:
    body = {"model": "bench", "messages": [], "max_tokens": tokens, "gap_s": gap_s, "stream": True}
    per_stream: list[list[Stamp]] = [[] for _ in range(streams)]
    cpu = time.process_time()
    await asyncio.gather(*(client(url, body, stamps, []) for stamps in per_stream))
    cpu = time.process_time() - cpu
    lags = sorted((seen - sent) * 1e3 for s in per_stream for sent, seen in s)
    itl_err = sorted(
        abs((b[1] - a[1]) - (b[0] - a[0])) * 1e6
        for s in per_stream
        for a, b in itertools.pairwise(s)
    )
    n = len(lags)
    return {
        "tokens": n,
        "lag_p50_ms": round(statistics.median(lags), 3),
        "lag_p99_ms": round(lags[int(0.99 * (n - 1))], 3),
        "itl_err_p50_us": round(statistics.median(itl_err), 1),
        "cpu_us_per_token": round(cpu / n * 1e6, 1),
    }


async def _coverage(client: Client, url: str) -> dict[str, bool | str]:
    out: dict[str, bool | str] = {}
    for shape in ("error", "long", "cr", "reasoning"):
        body = {"model": "bench", "max_tokens": 4, "gap_s": 0.0, "stream": True, "shape": shape}
        stamps: list[Stamp] = []
        names: list[str] = []
        try:
            await asyncio.wait_for(client(url, body, stamps, names), 10)
        except Exception as exc:
            out[shape] = f"raises {type(exc).__name__}"
            continue
        if shape == "error":
            out[shape] = "error" in names
        elif shape == "reasoning":
            out[shape] = "reasoning" in names
        else:
            out[shape] = len(stamps) == 4
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams per client")
    parser.add_argument("--tokens", type=int, default=300, help="tokens per stream")
    parser.add_argument("--gap-ms", type=float, default=1.0, help="server gap between tokens")
    parser.add_argument("--repeat", type=int, default=3, help="runs per client (best CPU kept)")
    parser.add_argument("--json", action="store_true", help="one JSON line per client")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(port, ready), daemon=True)
    server.start()
    ready.wait(10)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        for name, (client, module) in CLIENTS.items():
            if module is not None:
                try:
                    __import__(module)
                except ImportError:
                    print(f"{name}: not installed, skipped", file=sys.stderr)
                    continue
            runs = [
                asyncio.run(_run(client, url, args.streams, args.tokens, args.gap_ms / 1e3))
                for _ in range(args.repeat)
            ]
            row: dict[str, Any] = min(runs, key=lambda r: r["cpu_us_per_token"])
            row = {"client": name, **row, "coverage": asyncio.run(_coverage(client, url))}
            if args.json:
                print(json.dumps(row))
            else:
                cov = " ".join(f"{k}={v}" for k, v in row["coverage"].items())
                print(
                    f"{name:<20} lag p50 {row['lag_p50_ms']:7.3f} ms  p99 "
                    f"{row['lag_p99_ms']:7.3f} ms  itl err p50 {row['itl_err_p50_us']:7.1f} us  "
                    f"cpu {row['cpu_us_per_token']:6.1f} us/token   {cov}"
                )
    finally:
        server.terminate()
        server.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
