"""The bench's verdicts (bench/report.py): a figure the runs' spread makes meaningless is not
reported as a target met."""

from __future__ import annotations

from typing import Any

from bench.report import derive, table
from bench.run import database, machine

MACHINE = machine()


def phases(n1: dict[str, float], n200: dict[str, float]) -> dict[str, Any]:
    """The per-turn (N=1) and relay-cost (N=200) phases' CPU per turn, in ms."""
    return {
        "turn_cost": {t: {"cpu_ms_per_request": v} for t, v in n1.items()},
        "relay_cost": {t: {"cpu_ms_per_request": v} for t, v in n200.items()},
    }


def marginal(r: dict[str, Any]) -> dict[str, dict[str, Any]]:
    derive(r)
    return {v["target"].rsplit(", ", 1)[1]: v for v in r["verdicts"] if "marginal" in v["target"]}


def test_the_marginal_cost_per_chunk_is_judged_against_the_relay_s():
    r = phases({"relay": 0.3, "sse": 2.0, "openai": 1.0}, {"relay": 1.1, "sse": 2.9, "openai": 3.0})
    verdicts = marginal(r)
    assert verdicts["service SSE"]["met"] is True  # 900 / 800 ns per chunk: 1.125x
    assert verdicts["service /v1"]["met"] is False  # 2000 / 800: 2.5x
    assert verdicts["service /v1"]["value"] == "2.50x"


def test_a_negative_marginal_cost_is_below_the_spread_not_met():
    """The N=200 phase cost less per turn than the N=1 phase: no verdict (it printed 'met'
    with a negative ratio before)."""
    r = phases(
        {"relay": 0.3, "sse": 4.6, "openai": 1.0}, {"relay": 0.45, "sse": 4.2, "openai": 3.0}
    )
    verdict = marginal(r)["service SSE"]
    assert verdict["met"] is None
    assert verdict["value"].startswith("below the runs' spread")


def test_the_report_names_the_database_the_figures_were_taken_on(mongo_server):
    """``--mongodb-uri``: the bench runs on a server of the operator's (the figures SecantusDB
    cannot show); its header says which server it was, never the URI (it may hold a password)."""
    found = database(mongo_server.uri)
    assert found["server"].startswith("SecantusDB ") and found["own"] is False
    r = {"quick": True, "loop": "asyncio", "database": found, "machine": MACHINE, "verdicts": []}
    header = table(r).splitlines()[0]
    assert header.endswith(f"database {found['server']}")
    assert "database SecantusDB" in table({**r, "database": database(None)}).splitlines()[0]
