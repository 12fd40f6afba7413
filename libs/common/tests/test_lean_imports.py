"""skip_aiohttp_for_nats: a process that calls it talks to the real NATS without ever
loading aiohttp; one whose NATS URL is a WebSocket keeps it. Each case runs in a
process of its own (the call changes the importing process for good)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

NATS_URL = os.environ.get("HOOSH_TEST_NATS_URL", "nats://127.0.0.1:4222")

PROGRAM = """
import asyncio, sys
from hoosh_common.lean_imports import skip_aiohttp_for_nats
skip_aiohttp_for_nats()
import nats

async def main():
    nc = await nats.connect(sys.argv[1])
    sub = await nc.subscribe("hoosh.test.lean")
    await nc.publish("hoosh.test.lean", b"hi")
    message = await sub.next_msg(timeout=5)
    await nc.close()
    return message.data

print(asyncio.run(main()).decode(), "aiohttp" in sys.modules and sys.modules["aiohttp"] is not None)
"""


def run(env_url: str) -> str:
    env = {**os.environ, "HOOSH_NATS_URL": env_url}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, NATS_URL], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_nats_url_process_talks_to_nats_without_loading_aiohttp() -> None:
    assert run(NATS_URL) == "hi False"


@pytest.mark.parametrize("url", ["ws://nats.example:8080", "WSS://nats.example", "nats://a:4222,ws://b:8080"])
def test_a_websocket_url_keeps_aiohttp(url: str) -> None:
    assert run(url) == "hi True"
