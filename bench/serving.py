"""Online serving: latency percentiles and requests/s of ``POST /v1/anonymize``, dynamic batching on vs off.

The platform's Serve application (``pprl.serve.app.build_app``: FastAPI ingress with bearer-token auth -> model
deployment with ``@serve.batch``) runs on a local Ray cluster bound to 127.0.0.1 with the same ``cpu-quick`` bundle,
first with the shipped batching settings (``ServeSettings`` defaults: ``max_batch_size`` 16, 10 ms wait), then
redeployed with ``max_batch_size=1`` (every request its own forward pass) as the baseline. At each concurrency
level a closed-loop load generator keeps N requests in flight (each client sends its next request when the last one
returns), for a fixed time and at most a fixed count, after a warm-up. The generator runs on the same cores as the
server, as a client on the same host would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np
from harness import Context, Figure

from pprl import cluster

log = logging.getLogger("bench.serving")
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Load:
    concurrency: int
    seconds: float  # stop sending after this long
    max_requests: int  # ... or after this many, whichever comes first


async def _generate(url: str, body: bytes, headers: dict[str, str], load: Load) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: dict[str, int] = {}
    sent = 0
    limits = httpx.Limits(max_connections=load.concurrency, max_keepalive_connections=load.concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        start = time.perf_counter()
        deadline = start + load.seconds

        async def client_loop() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and sent < load.max_requests:
                sent += 1
                t = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                if r.status_code != 200:
                    errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                    continue
                latencies.append(time.perf_counter() - t)
                batch_sizes.append(int(r.headers.get("X-Batch-Size", 0)))

        await asyncio.gather(*(client_loop() for _ in range(load.concurrency)))
        elapsed = time.perf_counter() - start
    if not latencies:
        raise RuntimeError(f"{url}: no request succeeded at concurrency {load.concurrency} (errors: {errors})")
    ms = np.asarray(latencies) * 1e3
    return {
        "concurrency": load.concurrency,
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_batch": float(np.mean(batch_sizes)),
    }


def generate_load(url: str, body: bytes, headers: dict[str, str], load: Load) -> dict[str, Any]:
    """A closed-loop load of ``load.concurrency`` clients against ``url``, which must be on the loopback interface."""
    if urlparse(url).hostname != LOOPBACK:
        raise ValueError(f"the load generator only targets {LOOPBACK}, not {url}")
    return asyncio.run(_generate(url, body, headers, load))


def wait_ready(base: str, timeout_s: float = 180.0) -> None:
    import httpx

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base}/healthz did not answer 200 within {timeout_s:.0f} s")


def measure_deployment(settings: dict[str, Any], base: str, body: bytes, headers: dict[str, str], loads: list[Load]) -> list[dict]:
    from ray import serve

    from pprl.serve.app import APP_NAME, build_app

    started = time.perf_counter()
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    wait_ready(base)
    log.info("deployed max_batch_size=%d in %.0f s", settings["max_batch_size"], time.perf_counter() - started)
    url = f"{base}/v1/anonymize?identity=0"
    results = []
    for load in loads:
        generate_load(url, body, headers, Load(load.concurrency, 60.0, 2 * load.concurrency + 4))  # warm-up
        result = generate_load(url, body, headers, load)
        log.info("max_batch_size=%d c=%d: %.1f req/s, p50 %.1f ms, p99 %.1f ms, mean batch %.1f", settings["max_batch_size"],
                 load.concurrency, result["requests_per_s"], result["p50_ms"], result["p99_ms"], result["mean_batch"])
        results.append(result)
    return results


def serve_both(ctx: Context, loads: list[Load]) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Deploy with batching (the shipped settings), measure; redeploy with max_batch_size=1, measure."""
    import ray
    from ray import serve

    from pprl import storage
    from pprl.data.dataset import load_dataset
    from pprl.serve.app import ServeSettings

    token = secrets.token_hex(16)
    os.environ["PPRL_API_TOKEN"] = token  # inherited by the local cluster's replicas
    dataset = load_dataset(ctx.dataset())
    png = storage.read_bytes(dataset.uri(dataset.split("test")["path"].iloc[0]))  # a 64 px face; the server resizes it
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "image/png"}
    shipped = ServeSettings(model_uri=ctx.model())
    on = {"model_uri": shipped.model_uri, "model_num_cpus": 1, "ingress_num_cpus": 0.25, "max_batch_size": shipped.max_batch_size}
    off = {**on, "max_batch_size": 1}
    port = cluster.free_port()
    cluster.connect(num_cpus=os.cpu_count(), log_to_driver=False, purpose="the benchmark")
    try:
        serve.start(http_options={"host": LOOPBACK, "port": port})
        base = f"http://{LOOPBACK}:{port}"
        batched = measure_deployment(on, base, png, headers, loads)
        single = measure_deployment(off, base, png, headers, loads)
    finally:
        serve.shutdown()
        ray.shutdown()
    settings = {"max_batch_size": shipped.max_batch_size, "batch_wait_timeout_s": shipped.batch_wait_timeout_s,
                "max_ongoing_requests": shipped.max_ongoing_requests, "request_png_bytes": len(png)}
    return batched, single, settings


def run(ctx: Context) -> list[Figure]:
    seconds = ctx.duration(5.0, 20.0)
    loads = [Load(c, seconds, 20_000) for c in (1, 8, 32)]
    batched, single, shipped = serve_both(ctx, loads)
    on_name = f"batching on (max_batch_size {shipped['max_batch_size']}, wait {shipped['batch_wait_timeout_s'] * 1e3:.0f} ms)"
    figures = []
    for on, off in zip(batched, single, strict=True):
        c = on["concurrency"]
        note = f"{on['requests']} vs {off['requests']} requests; mean batch {on['mean_batch']:.1f} vs {off['mean_batch']:.1f}"
        if on["errors"] or off["errors"]:
            note += f"; errors on {on['errors']} off {off['errors']}"
        figures.append(Figure("serving", f"{on_name}, {c} in flight: requests/s", on["requests_per_s"], "req/s",
                              baseline="batching off (max_batch_size 1)", baseline_value=off["requests_per_s"], note=note,
                              details={"on": on, "off": off, "settings": shipped}))
        for q in ("p50", "p95", "p99"):
            figures.append(Figure("serving", f"{on_name}, {c} in flight: {q} latency", on[f"{q}_ms"], "ms", higher_is_better=False,
                                  baseline="batching off", baseline_value=off[f"{q}_ms"]))
    return figures
