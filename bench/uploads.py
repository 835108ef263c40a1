#!/usr/bin/env python3
"""Early-rejection load: N parallel chunked uploads of SIZE bytes each to POST /tasks, without a
token (or with one: --token), against a running service. Prints the statuses, the time and the
service's peak RSS (VmHWM of --pid) before and after. Usage:

    bench/uploads.py --url http://127.0.0.1:8080 --pid PID [--n 500] [--size 8388608] [--token T]
"""

import argparse
import asyncio
import collections
import time

CHUNK = 64 * 1024


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


async def upload(host: str, port: int, size: int, token: str | None) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    auth = f"authorization: Bearer {token}\r\n" if token else ""
    writer.write(
        (
            f"POST /tasks HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"{auth}transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        ).encode()
    )
    answer = asyncio.ensure_future(reader.readline())
    sent = 0
    chunk = b" " * CHUNK
    try:
        while sent < size and not answer.done():
            writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            await writer.drain()
            sent += len(chunk)
        if not answer.done():
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except OSError:
        pass  # the service answered and closed before the body was sent: that is the point
    try:
        line = await asyncio.wait_for(answer, 60)
        status = line.decode(errors="replace").split(" ")[1] if line else "closed"
    except (OSError, asyncio.TimeoutError, IndexError):
        status = "reset"
    writer.close()
    return f"{status} after {sent // (1024 * 1024)} MiB sent"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=8 * 1024 * 1024)
    ap.add_argument("--token")
    a = ap.parse_args()
    host, port = a.url.split("//")[1].split(":")
    before = peak_rss_mb(a.pid)
    start = time.monotonic()
    results = await asyncio.gather(*(upload(host, int(port), a.size, a.token) for _ in range(a.n)))
    elapsed = time.monotonic() - start
    after = peak_rss_mb(a.pid)
    counts = collections.Counter(r.split(" after")[0] for r in results)
    sent = sorted(int(r.split("after ")[1].split(" MiB")[0]) for r in results)
    print(f"{a.n} uploads of {a.size / 2**20:.0f} MiB {'with' if a.token else 'without'} a token: "
          f"{dict(counts)} in {elapsed:.1f} s; MiB sent per upload: median {sent[len(sent) // 2]}, "
          f"max {sent[-1]}; peak RSS {before:.1f} MB before, {after:.1f} MB after")


asyncio.run(main())
