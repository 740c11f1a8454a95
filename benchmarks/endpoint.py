"""vlpipe's served-VLM stage against a plain asyncio client (``make bench BENCH_ARGS="--endpoint ROWS ..."``).

The same real server (``transformers serve`` with the tiny LLaVA, on this machine's CPU) gets the same
requests for the same rows at the same concurrency, from:

- ``plain``: what one writes by hand: aiohttp, a semaphore, one task per row, base64 data URLs;
- ``vlpipe``: the ``caption.endpoint`` operator over the rows in its batches, as a worker runs it
  (rate limits off, retries on, the images checked and sent as the input holds them).

The two take turns; the ratio is of the medians. Rows/s here is the server's pace on two shared
cores, not a VLM's: what is measured is whether vlpipe's client keeps the server as busy as a
bare loop does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import pathlib
import statistics
import sys
import time

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.data import write_shards
from jobs.demo import build_tiny_llava
from jobs.demo.vlm_server import VlmServer
from operators import schema as col
from operators.models.caption import DEFAULT_CHAT_PROMPT, CaptionConfig
from operators.models.served import ServedCaptioner

MAX_TOKENS = 8


def endpoint(work: pathlib.Path, rows: int, concurrency: int = 16, batch_size: int = 256, repeats: int = 3) -> dict:
    images = _images(work, rows)
    model = build_tiny_llava(work / "tiny-llava")
    turns: dict[str, list[float]] = {"plain": [], "vlpipe": []}
    with VlmServer(model, work / "vlm-server") as server:
        config = CaptionConfig(
            endpoint={
                "base_url": server.base_url,
                "model": server.model,
                "concurrency": concurrency,
                "batch_size": batch_size,
            },
            max_new_tokens=MAX_TOKENS,
        )
        _plain(server, images[:concurrency], concurrency)  # the server's first answers are slower
        for _ in range(repeats):
            turns["plain"].append(_plain(server, images, concurrency))
            turns["vlpipe"].append(_vlpipe(config, images, batch_size))
    rates = {mode: [round(rows / s, 2) for s in seconds] for mode, seconds in turns.items()}
    medians = {mode: statistics.median(values) for mode, values in rates.items()}
    return {
        "rows": rows,
        "concurrency": concurrency,
        "batch_size": batch_size,
        "max_tokens": MAX_TOKENS,
        "rows_per_s": rates,
        "vlpipe_over_plain": round(medians["vlpipe"] / medians["plain"], 3),
    }


def _images(work: pathlib.Path, rows: int) -> list[bytes]:
    paths = write_shards(work / f"endpoint-{rows}", rows)
    return [image for path in paths for image in pq.read_table(path, columns=["jpg"]).column("jpg").to_pylist()]


def _vlpipe(config: CaptionConfig, images: list[bytes], batch_size: int) -> float:
    operator = ServedCaptioner(config, col.IMAGE_BYTES)
    table = pa.table(
        {
            col.IMAGE_BYTES: pa.array(images, pa.binary()),
            col.STATUS: [col.OK] * len(images),
            col.ERROR: pa.nulls(len(images), pa.string()),
        }
    )
    started = time.perf_counter()
    answered = 0
    for start in range(0, table.num_rows, batch_size):
        out = operator(table.slice(start, batch_size))
        answered += out.num_rows - out.column(col.CAPTION_GENERATED).null_count
    seconds = time.perf_counter() - started
    operator.client.close()
    if answered != len(images):
        raise RuntimeError(f"vlpipe answered {answered} of {len(images)} rows")
    return seconds


def _plain(server: VlmServer, images: list[bytes], concurrency: int) -> float:
    """A hand-written client: one task per row, at most ``concurrency`` in flight."""

    async def run() -> int:
        slots = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(image: bytes) -> str:
                url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
                content = [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": DEFAULT_CHAT_PROMPT},
                ]
                body = {
                    "model": server.model,
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0.0,
                }
                async with slots, session.post(f"{server.base_url}/chat/completions", json=body) as response:
                    response.raise_for_status()
                    return (await response.json())["choices"][0]["message"]["content"]

            return len(await asyncio.gather(*(one(image) for image in images)))

    started = time.perf_counter()
    answered = asyncio.run(run())
    seconds = time.perf_counter() - started
    if answered != len(images):
        raise RuntimeError(f"the plain client answered {answered} of {len(images)} rows")
    return seconds


def format_endpoint(result: dict | None) -> list[str]:
    if not result:
        return []
    rates = result["rows_per_s"]
    return [
        "",
        f"served VLM ({result['rows']:,} rows, tiny LLaVA on `transformers serve` here, {result['concurrency']} "
        f"in flight, {result['max_tokens']} tokens an answer):",
        f"  plain asyncio client {rates['plain']} rows/s, vlpipe's caption.endpoint stage {rates['vlpipe']} rows/s "
        f"(batches of {result['batch_size']}): x{result['vlpipe_over_plain']:.3f} (medians)",
    ]


if __name__ == "__main__":
    print(json.dumps(endpoint(pathlib.Path(sys.argv[1]), int(sys.argv[2])), indent=2))
