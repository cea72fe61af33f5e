"""A closed-loop HTTP load generator (used by `shoprec bench serve` when wrk is not installed).

``python -m pipelines.bench.loadgen URL CONCURRENCY SECONDS [API_KEY]`` with a JSON list of request bodies on
stdin; prints ``{"rps", "p50_ms", "p99_ms", "errors", "requests", "fallback"}`` (``fallback``: 200 answers
whose ``source`` is the fallback, ``cached``: those from the cache).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import httpx
import numpy as np


async def _main(url: str, concurrency: int, seconds: float, bodies: list[dict], key: str | None = None) -> dict:
    lat: list[float] = []
    errors = fallback = cached = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with httpx.AsyncClient(limits=limits, timeout=5, headers=headers) as client:
        end = time.perf_counter() + seconds

        async def worker():
            nonlocal errors, fallback, cached
            while time.perf_counter() < end:
                t = time.perf_counter()
                try:
                    r = await client.post(url, json=random.choice(bodies))
                    if r.status_code >= 300:
                        errors += 1
                    elif b'"source":"fallback"' in r.content:
                        fallback += 1
                    elif b'"source":"cache"' in r.content:
                        cached += 1
                except httpx.HTTPError:
                    errors += 1
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        took = time.perf_counter() - t0
    a = np.array(lat) * 1000
    return {"rps": round(len(a) / took, 1), "p50_ms": round(float(np.percentile(a, 50)), 2),
            "p99_ms": round(float(np.percentile(a, 99)), 2), "errors": errors,
            "requests": len(a), "fallback": fallback, "cached": cached}


if __name__ == "__main__":
    url, conc, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    key = sys.argv[4] if len(sys.argv) > 4 else None  # the API key (Authorization: Bearer)
    print(json.dumps(asyncio.run(_main(url, conc, secs, json.load(sys.stdin), key))))
