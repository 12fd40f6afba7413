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
