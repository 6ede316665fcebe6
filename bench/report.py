"""The bench's verdicts and its terminal table (from the result dict that also goes to JSON)."""

from __future__ import annotations

from typing import Any

ROUTES = ("sse", "openai")
TARGETS = ("direct", "relay", "sse", "openai")
LABEL = {"direct": "direct", "relay": "thin relay", "sse": "service SSE", "openai": "service /v1"}


def derive(r: dict[str, Any]) -> None:
    """Add the figures computed from two scenarios, and the verdicts."""
    cost, turn = r.get("relay_cost"), r.get("turn_cost")
    if cost and turn:  # (CPU/turn at N=200 - CPU/turn at N=1) / 199
        r["marginal_us_per_chunk"] = {
            t: (cost[t]["cpu_ms_per_request"] - turn[t]["cpu_ms_per_request"]) * 1000 / 199
            for t in ("relay", *ROUTES)
        }
    r["verdicts"] = verdicts(r)


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: str, limit: str, met: bool | None) -> None:
        out.append({"target": name, "value": value, "limit": limit, "met": met})

    lat = r.get("latency", {})
    for route in ROUTES:
        v = lat.get("C=1", {}).get("targets", {}).get(route, {}).get("overhead_p50_ms")
        met = None if v is None else v <= 2
        add(f"TTFT overhead p50 at C=1, {LABEL[route]}", _f(v, " ms"), "<= 2 ms", met)
    for route in ROUTES:
        v = lat.get("C=200", {}).get("targets", {}).get(route, {}).get("overhead_vs_relay")
        met = None if v is None else v <= 3
        add(f"TTFT overhead p50 at C=200 / relay's, {LABEL[route]}", _f(v, "x"), "<= 3x", met)
    cost = r.get("relay_cost", {})
    for route in ROUTES:
        v = cost.get(route, {}).get("ratio_to_relay")
        met = None if v is None else v <= 1.0
        add(f"CPU per relayed chunk / relay's, {LABEL[route]}", _f(v, "x"), "<= 1.0x", met)
    marginal = r.get("marginal_us_per_chunk", {})
    for route in ROUTES:
        relay, v = marginal.get("relay"), marginal.get(route)
        name = f"marginal CPU per relayed chunk / relay's, {LABEL[route]}"
        if v is not None and relay is not None and (v < 0 or relay <= 0):
            # N=200 cost less per turn than N=1: the difference is below the runs' spread
            add(name, f"below the runs' spread ({v:.2f} / {relay:.2f} us)", "<= 1.2x", None)
            continue
        ratio = v / relay if v is not None and relay else None
        met = None if ratio is None else ratio <= 1.2
        add(name, _f(ratio, "x"), "<= 1.2x", met)
    caps = [v for v in r.get("capacity", {}).values() if v.get("target") in ROUTES]
    for at_least in (5000, 10000):  # the second: the admission issue's, run on demand
        runs = [v for v in caps if v["concurrency"] >= at_least] or (
            caps if at_least == 5000 else []
        )
        limit = f">= {at_least} live, <= 30 KB each, 0 errors"
        if not runs:
            add(f"concurrent live streams in one process ({at_least})", "-", limit, None)
            continue
        big = max(runs, key=lambda v: (v["concurrency"], v["target"] == "sse"))
        errs = sum(big["errors"].values())
        kb = big["rss_kb_per_stream"]
        value = f"{big['concurrency']} streams, {errs} errors, {_n(kb, '.1f')} KB each"
        met = big["all_live"] and not errs and kb is not None and kb <= 30
        met = None if big["concurrency"] < at_least and met else met  # quick: not at scale
        name = f"concurrent live streams in one process{'' if at_least == 5000 else ' (10000)'}"
        add(f"{name}, {LABEL[big['target']]}", value, limit, met)
    turn = r.get("turn_cost", {})
    for route in ROUTES:
        v = turn.get(route, {}).get("ops_per_turn")
        met = None if v is None else v <= 2
        own = turn.get(route, {}).get("replica_ops_per_s")
        value = _f(v, "") + (f" (+ the replica's own {own:g}/s)" if own is not None else "")
        add(f"MongoDB operations per turn, {LABEL[route]}", value, "<= 2", met)
    for route in ROUTES:
        v = turn.get(route, {}).get("cpu_ms_per_request")
        met = None if v is None else v <= 1
        add(f"service CPU per turn, {LABEL[route]}", _f(v, " ms"), "<= 1 ms", met)
    ana = r.get("analytics", {})
    for name, what in (
        ("day_model_json", "by day and model"),
        ("user_json", "one user's"),
        ("all_json", "every line, JSON"),
        ("all_csv", "every line, CSV"),
    ):
        v = ana.get(name, {}).get("p50_s")
        met = None if v is None else v < 1.0
        add(f"admin usage analytics, a month of 1M messages, {what}", _f(v, " s"), "< 1 s", met)
    return out


def _f(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def _n(v: float | None, fmt: str = ".2f", unit: str = "") -> str:
    return "-" if v is None else format(v, fmt) + unit


def grid(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Columns sized to fit: the first left-aligned, the last (notes) too, the rest right."""
    widths = [max(len(x) for x in col) for col in zip(headers, *rows, strict=True)]
    last = len(headers) - 1

    def line(cells: list[str]) -> str:
        out = []
        for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
            out.append(cell.ljust(width) if i in (0, last) else cell.rjust(width))
        return "   " + "  ".join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items())


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"chat-gateway bench ({'quick' if r['quick'] else 'full'}): {m['cpu']}, {m['cores']} "
        f"cores, Python {m['python']}, aiohttp {m['aiohttp']}, event loop {r['loop']}, "
        f"database {r.get('database', {}).get('server', 'SecantusDB')}"
    ]
    w = lines.append
    lat = r.get("latency")
    if lat:
        w("\n1. Latency: N=50, D=20 ms. Time to first delta (ms); overhead = target - direct")
        rows = []
        for c, block in lat.items():
            for t in TARGETS:
                s = block["targets"][t]
                rows.append(
                    [
                        c[2:],
                        LABEL[t],
                        str(s["n"]),
                        _n(s["ttft_p50_ms"]),
                        _n(s["ttft_p99_ms"]),
                        _n(s.get("overhead_p50_ms")),
                        _n(s.get("overhead_p99_ms")),
                        _n(s.get("overhead_vs_relay"), unit="x"),
                        _errors(s["errors"]),
                    ]
                )
        head = ["C", "target", "n", "p50", "p99", "over p50", "over p99", "/ relay's", "errors"]
        lines += grid(head, rows)
        if "C=1+f20" in lat:
            w(
                "   C=1+f20: C=1 with an upstream 20 ms to its first token (any real model is"
                " slower): what the service runs beside the upstream's opening is hidden"
            )
        for c, block in lat.items():
            mo = block["mongo"]
            w(
                f"   C={c[2:]}: MongoDB per service turn (1 s turns): {_n(mo['ops_per_turn'])} "
                f"ops, {_n(mo['mongo_ms_per_turn'])} ms; the replica's own (watcher): "
                f"{_n(mo.get('replica_ops_per_s'))} commands/s"
            )
    cost = r.get("relay_cost")
    if cost:
        w("\n2. Relay cost: N=200, D=0, C=50. CPU of the relaying process (direct: the upstream)")
        rows = [
            [
                LABEL[t],
                str(cost[t]["requests"]),
                _n(cost[t]["cpu_us_per_chunk"]),
                _n(cost[t].get("ratio_to_relay"), unit="x"),
                _n(cost[t]["chunks_per_s"], ".0f"),
                _n(cost[t]["cpu_ms_per_request"]),
                " ".join(f"{x:.1f}" for x in cost[t]["cpu_us_per_chunk_runs"]),
                _errors(cost[t]["errors"]),
            ]
            for t in TARGETS
        ]
        head = ["target", "req", "us/chunk", "/ relay's", "chunks/s", "ms/req", "runs", "errors"]
        lines += grid(head, rows)
    turn = r.get("turn_cost")
    if turn:
        w("\n3. Per-turn fixed cost: N=1, C=50")
        rows = [
            [
                LABEL[t],
                str(turn[t]["requests"]),
                _n(turn[t]["requests_per_cpu_s"], ".0f"),
                _n(turn[t]["cpu_ms_per_request"], ".3f"),
                _n(turn[t]["requests_per_s"], ".0f"),
                _n(turn[t].get("ops_per_turn")),
                _n(turn[t].get("mongo_ms_per_turn"), ".1f"),
                ", ".join(f"{k} {v:g}" for k, v in turn[t].get("by_command", {}).items()),
            ]
            for t in TARGETS
        ]
        head = [
            "target",
            "req",
            "turns/s/core",
            "CPU ms/turn",
            "turns/s",
            "Mongo ops",
            "Mongo ms",
            "ops per turn",
        ]
        lines += grid(head, rows)  # fmt: skip
        for t in ROUTES:
            own = turn[t].get("replica_ops") or {}
            listed = ", ".join(f"{k} {v}" for k, v in own.items())
            w(
                f"   {LABEL[t]}: the replica's own MongoDB commands (watcher, not per turn): "
                f"{_n(turn[t].get('replica_ops_per_s'))}/s ({listed or 'none'})"
            )
    marginal = r.get("marginal_us_per_chunk")
    if marginal:
        parts = ", ".join(f"{LABEL[t]} {v:.2f} us" for t, v in marginal.items())
        w(f"   marginal CPU per chunk ((CPU/turn at N=200 - at N=1) / 199): {parts}")
    cap = r.get("capacity")
    if cap:
        w("\n4. Capacity: long, slow streams (D=1 s). RSS growth of the process per live stream")
        rows = []
        for key, s in cap.items():
            if "skipped" in s:
                rows.append([key, "", "", "", "", "", "", "", "", f"skipped: {s['skipped']}"])
                continue
            rows.append(
                [
                    LABEL[s["target"]],
                    str(s["concurrency"]),
                    _n(s["ramp_s"], ".1f"),
                    _n(s["rss_kb_per_stream"], ".1f"),
                    _n(s["rss_peak_kb_per_stream"], ".1f"),
                    _n(s["rss_live_mib"], ".0f"),
                    _n(s["ttft_p50_ms"]),
                    _n(s["ttft_p99_ms"]),
                    _n(s["probe_ttft_p50_ms"]),
                    _errors(s["errors"]) or ("" if s["all_live"] else "not all live"),
                ]
            )
        head = [
            "target",
            "C",
            "ramp s",
            "KB/stream",
            "peak KB",
            "RSS MiB",
            "TTFT p50",
            "p99",
            "probe p50",
            "errors",
        ]
        lines += grid(head, rows)  # fmt: skip
    ana = r.get("analytics")
    if ana:
        seeded = ana["seed"]
        w(
            f"\n5. Analytics: GET /api/admin/usage for a month; rollup of {seeded['turns']:,} "
            f"messages in {seeded['lines']:,} lines, {seeded.get('documents', 0):,} documents"
            f" (seeded in {seeded['seed_s']} s)"
        )
        rows = [
            [
                name,
                _n(s["p50_s"], ".3f"),
                _n(s["max_s"], ".3f"),
                _n(s["database_p50_s"], ".3f"),
                f"{s['bytes']:,}",
                s["query"],
            ]
            for name, s in ana.items()
            if name != "seed"
        ]
        head = ["answer", "p50 s", "max s", "database p50 s", "bytes", "query"]
        lines += grid(head, rows)
    w("\nTargets")
    for v in r["verdicts"]:
        met = {True: "met", False: "NOT MET", None: "not measured"}[v["met"]]
        w(f"   {met:<13}{v['target']}: {v['value']} (target {v['limit']})")
    return "\n".join(lines)
