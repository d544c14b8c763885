"""Key-service benchmarks: cache hit and miss latency, HSM unwrap throughput, cold start.

Run: .venv/bin/python bench/bench_keys.py [--tenants 10000] [--dsn DSN]

Starts a throwaway PostgreSQL (or uses --dsn, a superuser DSN) and a SoftHSM2 token in a
scratch folder; the audit trail is a jsonl file there, fsync'd as in production.
Targets (issue 3): a cached seal or open of a 64-byte value in at most 10 µs, including
the key lookup; zero HSM calls in steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from bench.common import Cleanup, scratch_dir, start_postgres, write_results
from proxy.config import (
    AuditConfig,
    AuditSinkConfig,
    CacheConfig,
    Config,
    HsmConfig,
    KeystoreConfig,
    default_softhsm_module,
)
from proxy.keys.hsm import HsmClient, dek_aad, ensure_softhsm_token
from proxy.keys.service import KeyService

COLUMN = "public.patients.ssn"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.2f} µs"


async def per_op(fn: Callable[[], Awaitable[Any]], number: int, repeat: int = 5) -> float:
    """Best of `repeat` runs of `number` awaited calls, seconds per call."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            await fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def make_config(folder: Path, dsn: str, tenants: int) -> Config:
    conf = folder / "softhsm2.conf"
    (folder / "tokens").mkdir(exist_ok=True)
    conf.write_text(
        f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\n"
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    os.environ["PGSEAL_BENCH_PIN"] = secrets.token_hex(8)
    os.environ["PGSEAL_BENCH_SO_PIN"] = secrets.token_hex(8)
    config = Config(
        hsm=HsmConfig(
            module=default_softhsm_module(),
            token_label="pgseal-bench",
            pin="env:PGSEAL_BENCH_PIN",
            so_pin="env:PGSEAL_BENCH_SO_PIN",
            master_key_label="pgseal-bench-master",
            softhsm_dir=str(folder),
        ),
        keystore=KeystoreConfig(dsn=dsn, schema=f"pgseal_bench_{secrets.token_hex(3)}"),
        cache=CacheConfig(
            ttl_seconds=3600, max_entries=max(10000, tenants + 100), max_uses=1 << 40
        ),
        audit=AuditConfig(sinks=(AuditSinkConfig("jsonl", path=str(folder / "audit.jsonl")),)),
        base_dir=str(folder),
    )
    ensure_softhsm_token(config)
    HsmClient(config.hsm).ensure_master_sync()
    return config


async def bench_hits(service: KeyService, results: dict[str, Any]) -> None:
    key = await service.current_key("hot")
    await service.key_by_id(key.key_id)
    value = os.urandom(64)
    cell = key.cell_key.seal(COLUMN, value, deterministic=False)
    calls = service.hsm.calls

    async def current() -> Any:
        return await service.current_key("hot")

    async def by_id() -> Any:
        return await service.key_by_id(key.key_id)

    async def seal64() -> Any:
        return (await service.current_key("hot")).cell_key.seal(COLUMN, value, deterministic=False)

    async def open64() -> Any:
        return (await service.key_by_id(key.key_id)).cell_key.open(COLUMN, cell)

    async def seal64_siv() -> Any:
        return (await service.current_key("hot")).cell_key.seal(COLUMN, value, deterministic=True)

    n = 50000
    rows = {
        "cache hit: current_key(tenant)": await per_op(current, n),
        "cache hit: key_by_id(id)": await per_op(by_id, n),
        "cached seal 64 B (lookup + GCM)": await per_op(seal64, n),
        "cached seal 64 B (lookup + SIV)": await per_op(seal64_siv, n),
        "cached open 64 B (lookup + GCM)": await per_op(open64, n),
    }
    start = time.perf_counter()
    for _ in range(n):
        service.cache.hit_by_tenant("hot")
    rows["sync peek: cache.hit_by_tenant"] = (time.perf_counter() - start) / n
    for name, seconds in rows.items():
        print(f"  {name:<36} {us(seconds)}")
    hsm_calls = service.hsm.calls - calls
    print(f"  HSM calls during {6 * n:,} cached uses: {hsm_calls}")
    results["hits_us"] = {k: round(v * 1e6, 3) for k, v in rows.items()}
    results["hits_hsm_calls"] = hsm_calls


async def bench_misses(service: KeyService, results: dict[str, Any], rounds: int = 300) -> None:
    key = await service.current_key("cold")
    times = []
    for _ in range(rounds):
        service.cache.clear()
        start = time.perf_counter()
        await service.key_by_id(key.key_id)
        times.append(time.perf_counter() - start)
    times.sort()
    p50, p99 = times[len(times) // 2], times[int(len(times) * 0.99)]
    print(
        f"  cache miss key_by_id (keystore read + HSM unwrap + audit fsync): "
        f"p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"
    )
    results["miss_ms"] = {
        "p50": round(p50 * 1e3, 3),
        "p99": round(p99 * 1e3, 3),
        "mean": round(statistics.mean(times) * 1e3, 3),
    }


async def bench_unwrap(service: KeyService, results: dict[str, Any], n: int = 5000) -> None:
    hsm = service.hsm
    (master,) = await hsm.list_masters()
    aad = dek_aad("t", 1, master.kek)
    nonce, wrapped = await hsm.wrap(master.kek, os.urandom(32), aad)
    start = time.perf_counter()
    for _ in range(n):
        await hsm.unwrap(master.kek, nonce, wrapped, aad)
    sequential = n / (time.perf_counter() - start)
    start = time.perf_counter()
    await asyncio.gather(*(hsm.unwrap(master.kek, nonce, wrapped, aad) for _ in range(n)))
    concurrent = n / (time.perf_counter() - start)
    print(
        f"  HSM unwrap (C_Decrypt AES-GCM on the PKCS#11 thread): {sequential:,.0f}/s "
        f"one at a time, {concurrent:,.0f}/s with {n} in flight"
    )
    results["unwrap_per_s"] = {"sequential": round(sequential), "concurrent": round(concurrent)}


async def fill_keystore(config: Config, service: KeyService, tenants: int) -> None:
    """Write `tenants` wrapped keys straight into the keystore (setup, not measured)."""
    (master,) = await service.hsm.list_masters()
    await service.current_key("bootstrap")  # registers the master key in the keystore
    rows = []
    for i in range(tenants):
        tenant = f"tenant-{i:05d}"
        nonce, wrapped = await service.hsm.wrap(
            master.kek, os.urandom(32), dek_aad(tenant, 1, master.kek)
        )
        rows.append((tenant, 1, "active", master.kek, nonce, wrapped))
    conn = await asyncpg.connect(config.keystore.dsn)
    try:
        await conn.copy_records_to_table(
            "keys",
            schema_name=config.keystore.schema,
            columns=["tenant", "version", "state", "kek", "nonce", "wrapped"],
            records=rows,
        )
    finally:
        await conn.close()


async def bench_cold_start(
    config: Config, tenants: int, results: dict[str, Any], concurrency: int = 64
) -> None:
    start = time.perf_counter()
    service = await KeyService.open(config)
    opened = time.perf_counter() - start
    try:
        names = [f"tenant-{i:05d}" for i in range(tenants)]
        todo = iter(names)

        async def worker() -> None:
            # `concurrency` connections, each needing its tenant's key in turn (a
            # Semaphore over 10,000 tasks would measure asyncio's wake-up scan instead).
            for tenant in todo:
                await service.current_key(tenant)

        unwraps, batches = service.hsm.unwraps, service.audit.batches
        hsm_trips, miss_batches = service.hsm.calls, service._misses.batches
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        warm = time.perf_counter() - start
        unwraps = service.hsm.unwraps - unwraps
        batches = service.audit.batches - batches
        hsm_trips = service.hsm.calls - hsm_trips
        miss_batches = service._misses.batches - miss_batches
        calls = service.hsm.calls
        start = time.perf_counter()
        for t in names:
            await service.current_key(t)
        steady = time.perf_counter() - start
        steady_calls = service.hsm.calls - calls
    finally:
        await service.close()
    print(
        f"  service open: {opened * 1e3:.0f} ms; first use of {tenants:,} tenants "
        f"({concurrency} at a time): {warm:.2f} s = {tenants / warm:,.0f} keys/s "
        f"({unwraps:,} unwraps in {hsm_trips:,} HSM trips, {miss_batches:,} keystore "
        f"queries, {batches:,} audit group commits)"
    )
    print(
        f"  second pass over the same {tenants:,} tenants: {steady * 1e3:.1f} ms, "
        f"{steady_calls} HSM calls"
    )
    results[f"cold_start_{concurrency}"] = {
        "tenants": tenants,
        "concurrency": concurrency,
        "hsm_trips": hsm_trips,
        "keystore_queries": miss_batches,
        "open_ms": round(opened * 1e3, 1),
        "first_use_s": round(warm, 3),
        "keys_per_s": round(tenants / warm),
        "unwraps": unwraps,
        "audit_batches": batches,
        "steady_pass_ms": round(steady * 1e3, 2),
        "steady_hsm_calls": steady_calls,
    }


async def run(config: Config, tenants: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    service = await KeyService.open(config)
    try:
        print("cache hits (best of 5 runs)")
        await bench_hits(service, results)
        print("cache misses")
        await bench_misses(service, results)
        print("HSM")
        await bench_unwrap(service, results)
        print(f"cold start: filling the keystore with {tenants:,} tenants (not measured)...")
        await fill_keystore(config, service, tenants)
    finally:
        await service.close()
    print("cold start (a fresh service each time)")
    for concurrency in (64, 1024):
        await bench_cold_start(replace(config), tenants, results, concurrency)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tenants", type=int, default=10000)
    parser.add_argument("--dsn", help="superuser DSN of a PostgreSQL to use (default: start one)")
    args = parser.parse_args()
    with Cleanup() as cleanup:
        folder = scratch_dir(cleanup, "pgseal-bench-keys-")
        dsn = args.dsn
        if dsn is None:
            pg, _ = start_postgres(cleanup, folder)
            dsn = pg.dsn()
        config = make_config(folder, dsn, args.tenants)
        results = asyncio.run(run(config, args.tenants))
        path = write_results("keys", {"tenants": args.tenants, **results})
        print(f"results: {path}")


if __name__ == "__main__":
    main()
