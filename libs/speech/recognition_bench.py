"""How long a decode takes, and what it does to an event loop beside it.

`./bazelw run //libs/speech:recognition_bench` decodes the intelligibility sentence (24 kHz,
as the bridge gets it) a few times and prints the real-time factor, then the worst lag of
a 5 ms asyncio ticker while decodes run in a thread (the reference: PocketSphinx holds the
GIL) and in a `RecognitionPool` worker process (what the listen backend does).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from libs.speech.recognition import RecognitionPool, load_model, recognise
from libs.speech.synthesis import INTELLIGIBILITY_SENTENCE, synthesise
from libs.speech.wer import word_error_rate

RATE = 24000
TICK_S = 0.005


async def worst_lag_ms(work: Callable[[], Awaitable[object]]) -> float:
    """The longest a 5 ms sleep overslept while `work` ran."""
    worst = 0.0
    done = False

    async def tick() -> None:
        nonlocal worst
        while not done:
            start = time.perf_counter()
            await asyncio.sleep(TICK_S)
            worst = max(worst, time.perf_counter() - start - TICK_S)

    ticker = asyncio.create_task(tick())
    try:
        await work()
    finally:
        done = True
        await ticker
    return worst * 1000


async def measure(runs: int, pcm: bytes) -> None:
    async def in_thread() -> None:
        for _ in range(runs):
            await asyncio.to_thread(recognise, pcm, RATE)

    pool = RecognitionPool(workers=1)
    try:
        await pool.warm_up()

        async def in_process() -> None:
            for _ in range(runs):
                await pool.recognise(pcm, RATE)

        thread_lag = await worst_lag_ms(in_thread)
        process_lag = await worst_lag_ms(in_process)
    finally:
        await pool.close()
    print(f"event loop, worst lag of a 5 ms tick: decodes in a thread {thread_lag:.0f} ms")
    print(f"event loop, worst lag of a 5 ms tick: decodes in a worker process {process_lag:.0f} ms")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5, help="decodes per measurement")
    args = parser.parse_args(argv)
    speech = synthesise(INTELLIGIBILITY_SENTENCE).at_rate(RATE)
    start = time.perf_counter()
    load_model()
    print(f"model load: {(time.perf_counter() - start) * 1000:.0f} ms")
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        heard = recognise(speech.pcm, RATE)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"decode of {speech.seconds:.2f} s of speech: median {median * 1000:.0f} ms "
        f"(real-time factor {median / speech.seconds:.2f}), "
        f"WER {word_error_rate(INTELLIGIBILITY_SENTENCE, heard):.2f}"
    )
    asyncio.run(measure(args.runs, speech.pcm))
    return 0


if __name__ == "__main__":
    sys.exit(main())
