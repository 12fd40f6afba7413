"""The price table: exact integer micro-dollars, lookups, rounding."""

from __future__ import annotations

import pytest
from hoosh_common.prices import (
    AudioPrice,
    PriceTable,
    TokenPrice,
    cost_of,
    default_table,
    micros_to_usd,
    usd_to_micros,
)


def test_usd_converts_exactly() -> None:
    assert usd_to_micros("0.075") == 75_000
    assert usd_to_micros(0.15) == 150_000  # a YAML float, through its decimal text
    assert usd_to_micros("15.00") == 15_000_000
    assert usd_to_micros("0.0000005") == 1  # finer than a micro-dollar rounds half up
    for bad in ("-1", "NaN", "inf", "a dollar"):
        with pytest.raises(ValueError):
            usd_to_micros(bad)


def test_micros_print_as_exact_decimals() -> None:
    assert micros_to_usd(140) == "0.000140"
    assert micros_to_usd(12_345_678) == "12.345678"
    assert micros_to_usd(0) == "0.000000"


def test_each_side_rounds_up_to_the_next_micro_dollar() -> None:
    assert cost_of(1, 150_000) == 1  # 0.15 micro-dollars is charged as 1
    assert cost_of(1_000_000, 150_000) == 150_000
    assert cost_of(0, 150_000) == 0
    price = TokenPrice(input=2_500_000, cached_input=1_250_000, output=10_000_000)
    # 1000 prompt tokens of which 400 cached, 200 completion tokens:
    # 600 * 2.5 + 400 * 1.25 + 200 * 10 = 1500 + 500 + 2000 micro-dollars
    assert price.cost(1000, 200, cached_tokens=400) == 4000
    assert price.cost(10, 0, cached_tokens=99) == price.cost(10, 0, cached_tokens=10)  # clamped to the prompt
    assert AudioPrice(per_minute=6000).cost(90_000) == 9000  # 1.5 minutes at $0.006
    assert AudioPrice(per_minute=6000).cost(1) == 1


def test_lookups_exact_then_longest_prefix() -> None:
    table = default_table()
    mini = table.chat("openai", "gpt-4o-mini")
    assert mini == TokenPrice(input=150_000, cached_input=75_000, output=600_000)
    assert table.chat("anthropic", "claude-3-5-haiku-20241022") == TokenPrice(800_000, 80_000, 4_000_000)
    flash = table.chat("gemini", "gemini-2.0-flash-001")
    lite = table.chat("gemini", "gemini-2.0-flash-lite-001")
    assert flash is not None and lite is not None and flash != lite
    assert table.chat("openai", "my-own-model") is None
    assert table.chat("local", "gpt-4o-mini") is None  # by provider type: a local model is priced by config
    assert table.embeddings("openai", "text-embedding-3-small") == TokenPrice(20_000, 20_000, 0)
    assert table.audio("openai", "whisper-1") == AudioPrice(per_minute=6_000)


def test_a_table_of_ones_own() -> None:
    table = PriceTable({"chat": {"openai": {"m": {"input": "1", "output": "2"}}}})
    assert table.chat("openai", "m") == TokenPrice(1_000_000, 1_000_000, 2_000_000)  # cached defaults to input
    assert table.audio("openai", "whisper-1") is None
