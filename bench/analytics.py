"""The ``analytics`` entry: ``GET /api/admin/usage`` over a month of a busy service.

The rollup (``usage_rollup``: per user and month, a line per UTC day, model and API key; and
the month's totals per day and model) is seeded with
what a month of 1,000,000 messages leaves in it, written directly with bulk inserts as the
aggregated counters the settlement would have added (nothing is replayed turn by turn): 30 days,
2,000 users, 3 models, with the sparsity of real use (a fifth of the users every day or nearly,
half some days, the rest a few; one model on most active days, two or three on some; a sixth of
the users send part of their turns with an API key), the turns of each line drawn from a
heavy-tailed weight and summing to exactly 1,000,000. Then the month is asked for over HTTP, as
an operator would: JSON and CSV, grouped on all four dimensions (the default: the largest
answer, every line of the month), by day and model (a dashboard's: read from the rollup's
(day, model) totals) and one user's month, each timed several times. Target: < 1 s.
"""

from __future__ import annotations

import random
import statistics
import time
import urllib.request
from datetime import date, timedelta
from typing import Any

MESSAGES = 1_000_000
DAYS = 30
USERS = 2_000
MODELS = ("gpt-4o-mini", "claude-sonnet", "gemini-flash")
# Per million tokens, in nano-units per token: input, output (the cost of each line).
PRICES = {"gpt-4o-mini": (150, 600), "claude-sonnet": (3_000, 15_000), "gemini-flash": (100, 400)}
FIRST_DAY = date(2026, 1, 1)
RUNS = 3
TARGET_S = 1.0
BATCH = 5_000
ANALYTICS_TIMEOUT_MS = 120_000


def rollup_lines(seed: int = 20) -> list[dict[str, Any]]:
    """The month's rollup lines; their ``turns`` sum to ``MESSAGES``."""
    rng = random.Random(seed)
    keys: list[tuple[str, str, str, str | None, float]] = []
    for u in range(USERS):
        user = f"user-{u:05d}"
        kind = rng.random()
        active = 26 if kind < 0.2 else 10 if kind < 0.7 else 3
        weight = rng.lognormvariate(0, 1.2)  # heavy users and light ones
        key = f"key_{u:012x}" if rng.random() < 1 / 6 else None
        favourite = rng.choice(MODELS)
        for day in rng.sample(range(DAYS), k=min(DAYS, max(1, int(rng.gauss(active, 2))))):
            n_models = 1 if rng.random() < 0.7 else 2 if rng.random() < 0.85 else 3
            models = [favourite, *rng.sample([m for m in MODELS if m != favourite], n_models - 1)]
            for model in models:
                share = weight * rng.random()
                day_s = (FIRST_DAY + timedelta(days=day)).isoformat()
                if key is not None and rng.random() < 0.5:  # part of the day's turns by the key
                    keys.append((day_s, user, model, key, share / 2))
                    share /= 2
                keys.append((day_s, user, model, None, share))
    total = sum(k[4] for k in keys)
    turns = [max(1, int(k[4] / total * MESSAGES)) for k in keys]
    by_size = sorted(range(len(keys)), key=lambda i: -turns[i])
    left = MESSAGES - sum(turns)
    i = 0
    while left:  # spread the rounding over the largest lines, one turn each
        j = by_size[i % len(by_size)]
        step = 1 if left > 0 else -1
        if turns[j] + step >= 1:
            turns[j] += step
            left -= step
        i += 1
    return [_line(rng, k, n) for k, n in zip(keys, turns, strict=True)]


def _line(rng: random.Random, key: tuple[Any, ...], turns: int) -> dict[str, Any]:
    day, user, model, key_id, _ = key
    cancelled = round(turns * rng.uniform(0.0, 0.08))
    failed = turns // 60
    interrupted = turns // 150
    completed = turns - cancelled - failed - interrupted
    prompt = turns * rng.randint(300, 1500)
    completion = turns * rng.randint(100, 600)
    cached = prompt * rng.randint(0, 50) // 100
    reasoning = completion // 4 if model == "claude-sonnet" else 0
    price_in, price_out = PRICES[model]
    return {
        "day": day,
        "user_id": user,
        "model": model,
        "key_id": key_id,
        "turns": turns,
        "outcomes": {
            "completed": completed,
            "cancelled": cancelled,
            "failed": failed,
            "interrupted": interrupted,
        },
        "prompt": prompt,
        "completion": completion,
        "cached": cached,
        "reasoning": reasoning,
        "cost": prompt * price_in + completion * price_out,
    }


def seed(uri: str, db: str) -> dict[str, Any]:
    from pymongo import MongoClient

    from service.analytics import rollup_docs

    lines = rollup_lines()
    docs = rollup_docs(lines)  # what settlement leaves for them: per user and month, totals
    started = time.perf_counter()
    with MongoClient(uri, serverSelectionTimeoutMS=10_000) as client:
        coll = client[db]["usage_rollup"]
        coll.delete_many({})
        for i in range(0, len(docs), BATCH):
            coll.insert_many(docs[i : i + BATCH], ordered=False)
    return {
        "lines": len(lines),
        "documents": len(docs),
        "turns": sum(line["turns"] for line in lines),
        "seed_s": round(time.perf_counter() - started, 1),
    }


def _get(url: str, token: str, accept: str) -> tuple[float, int]:
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token}", "Accept": accept}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as resp:
        body = resp.read()
        assert resp.status == 200, resp.status
    return time.perf_counter() - started, len(body)


def _aggregate(uri: str, db: str, query: str) -> float:
    """The same read asked of the database directly: what of the answer's time is the
    database's."""
    from urllib.parse import parse_qsl

    from pymongo import MongoClient

    from service.analytics import UsageQuery

    params = {k: v for k, v in parse_qsl(query) if k != "format"}
    usage = UsageQuery.parse(params, FIRST_DAY + timedelta(days=DAYS))
    with MongoClient(uri, serverSelectionTimeoutMS=10_000) as client:
        coll = client[db]["usage_rollup"]
        started = time.perf_counter()
        for selection in usage.selections():
            coll.find(selection).to_list(None)
        return time.perf_counter() - started


def measure(base_url: str, token: str, uri: str, db: str) -> dict[str, Any]:
    last = FIRST_DAY + timedelta(days=DAYS - 1)
    month = f"from={FIRST_DAY.isoformat()}&to={last.isoformat()}"
    out: dict[str, Any] = {}
    for name, query, accept in (
        ("all_json", month, "application/json"),
        ("all_csv", month + "&format=csv", "text/csv"),
        ("day_model_json", month + "&by=day,model", "application/json"),
        ("user_json", month + "&user=user-00000", "application/json"),
    ):
        url = f"{base_url}/api/admin/usage?{query}"
        _get(url, token, accept)  # warm-up
        runs = [_get(url, token, accept) for _ in range(RUNS)]
        times = [t for t, _ in runs]
        database = statistics.median(_aggregate(uri, db, query) for _ in range(RUNS))
        out[name] = {
            "query": query,
            "runs_s": [round(t, 3) for t in times],
            "p50_s": round(statistics.median(times), 3),
            "max_s": round(max(times), 3),
            "database_p50_s": round(database, 3),
            "bytes": runs[0][1],
        }
        print(f"  analytics {name}: p50 {out[name]['p50_s']} s", flush=True)
    return out


def scenario_analytics(bench: Any) -> dict[str, Any]:
    """5. The month's usage analytics over 1M messages' rollup, JSON and CSV, over HTTP."""
    from bench.run import SECRET
    from service.auth import mint_token
    from service.settings import load_settings

    # A month's report may take longer than one turn's operations (MONGODB_TIMEOUT_MS, 3 s):
    # on SecantusDB it does, so this service process allows it.
    bench.start_service(bench.db, MONGODB_TIMEOUT_MS=str(ANALYTICS_TIMEOUT_MS))
    seeded = seed(bench.mongo_uri, bench.db)
    print(
        f"  analytics: seeded {seeded['lines']} rollup lines in {seeded['documents']} documents"
        f" in {seeded['seed_s']} s",
        flush=True,
    )
    settings = load_settings(jwt_secret=SECRET, environment="production")
    token = mint_token(settings, "bench-admin", ttl_s=3600, extra={"role": "admin"})
    result = {"seed": seeded, **measure(bench.url("service"), token, bench.mongo_uri, bench.db)}
    print("  analytics: done", flush=True)
    return result
