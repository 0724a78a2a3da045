"""The example plugins, written for the reference host (etl-uvicorn).

Each function behaves as the etl-serve example plugin of the same name, so
the benchmark compares the hosts, not the plugins. `wordcount` gives the
same /schema and /id as the Rust and C ones. The reference host has no
cancellation token, so `slow` cannot be cooperative: it runs every unit.
"""

import asyncio
import time
from typing import Optional

from typing_extensions import TypedDict

from unstructured_platform_plugins.schema.usage import UsageData


class WordcountOut(TypedDict):
    words: int
    chars: int


def wordcount(usage: list, text: str, repeat: int = 1) -> WordcountOut:
    chars = len(text.encode("utf-8")) * repeat
    usage.append(UsageData(name="chars", value=chars))
    return {"words": len(text.split()) * repeat, "chars": chars}


class SlowOut(TypedDict):
    done: int


def slow(usage: list, units: int, unit_ms: int = 10, cooperative: bool = True) -> SlowOut:
    done = 0
    while done < units:
        time.sleep(unit_ms / 1000)
        done += 1
    usage.append(UsageData(name="units_done", value=done))
    return {"done": done}


class TickOut(TypedDict):
    i: int


async def ticker(
    count: int, interval_ms: int = 10, fail_at: Optional[int] = None
) -> TickOut:
    # The reference host reads a streaming plugin's item type from the
    # return annotation of the async generator.
    for i in range(count):
        if fail_at is not None and i == fail_at:
            raise RuntimeError(f"failed at item {i}")
        await asyncio.sleep(interval_ms / 1000)
        yield {"i": i}
