"""The benchmark's quick mode as a smoke test: the run works and budgets and audit
add up afterwards. It asserts counts, never times."""

from __future__ import annotations

from bench.__main__ import run_quick


def test_quick_benchmark_run_keeps_budget_and_audit_exact() -> None:
    result = run_quick(requests=300, concurrency=32)
    check = result["check"]
    assert isinstance(check, dict)
    assert check["errors"] == 0
    assert check["requests"] == 300
    assert check["usage_seen"] > 0
    assert check["pool_used"] == check["usage_seen"]
    assert check["pool_reserved"] == 0
    assert check["audit_entries"] == 300
    assert check["chain_valid"] is True
    assert result["ok"] is True


def test_the_report_states_both_ratios_against_their_goals_and_the_rss_comparison() -> None:
    from bench.__main__ import StackFigures, ratio_lines
    from bench.load import CapacityResult

    def capacity(rps: float) -> CapacityResult:
        return CapacityResult(concurrency=128, requests=int(rps * 10), seconds=10.0, errors=0, p50=0.1, p99=0.2)

    hoosh = StackFigures("hoosh", added_median_ms=0.002, peak_rss_mib=300, capacity={128: capacity(1100)})
    litellm = StackFigures("litellm", added_median_ms=0.010, peak_rss_mib=400, capacity={128: capacity(100)})
    lines = ratio_lines(hoosh, litellm)
    assert lines[0].startswith("added latency: LiteLLM adds 5.0x") and lines[0].endswith("goal >= 6x: not met")
    assert "(11.0x)" in lines[1] and lines[1].endswith("goal >= 10x: met")
    assert lines[2] == "peak RSS: hoosh's gateway processes 300 MiB, below LiteLLM's process tree 400 MiB"

    hoosh.added_median_ms, hoosh.peak_rss_mib = 0.001, 500
    lines = ratio_lines(hoosh, litellm)
    assert lines[0].endswith("goal >= 6x: met")
    assert "NOT below" in lines[2]
