"""What a run's requests to served models cost, added up from the rows' usage columns.

The totals come from the rows, not from counters in the workers: the rows are what a resumed run
takes over and what a retried Ray task writes once, so the totals stay right through both.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from operators import schema as col
from operators.endpoint.config import Prices

# Each served stage's usage column, by the config section it is set in.
USAGE_COLUMNS = {"caption": col.CAPTION_USAGE, "ask": col.ANSWER_USAGE}
COUNTS = ("requests", "answered", "attempts", col.PROMPT_TOKENS, col.COMPLETION_TOKENS)


def usage_totals(batch: pa.Table) -> dict[str, dict[str, int]]:
    """Per section with requests in ``batch``: rows sent (``requests``), rows answered, tries, and tokens."""
    totals = {}
    for section, name in USAGE_COLUMNS.items():
        if name not in batch.column_names:
            continue
        usage = batch.column(name)
        sent = int(pc.sum(pc.is_valid(usage)).as_py() or 0)
        if not sent:
            continue
        completion = pc.struct_field(usage, col.COMPLETION_TOKENS)
        totals[section] = {
            "requests": sent,
            "answered": int(pc.sum(pc.is_valid(completion)).as_py() or 0),
            "attempts": _sum(pc.struct_field(usage, col.ATTEMPTS)),
            col.PROMPT_TOKENS: _sum(pc.struct_field(usage, col.PROMPT_TOKENS)),
            col.COMPLETION_TOKENS: _sum(completion),
        }
    return totals


def add_totals(into: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> None:
    for section, counts in more.items():
        mine = into.setdefault(section, dict.fromkeys(COUNTS, 0))
        for name in COUNTS:
            mine[name] += counts.get(name, 0)


def account(counts: dict[str, int], model: str, seconds: float, prices: Prices | None) -> dict:
    """One served stage's line of the run record: totals, retries, requests per second, and the cost."""
    line = {
        "model": model,
        **counts,
        "failed": counts["requests"] - counts["answered"],
        "retries": counts["attempts"] - counts["requests"],
        "requests_per_second": round(counts["attempts"] / seconds, 3) if seconds > 0 else None,
    }
    if prices is not None:
        cost = (
            counts[col.PROMPT_TOKENS] * prices.prompt_per_million
            + counts[col.COMPLETION_TOKENS] * prices.completion_per_million
        ) / 1e6
        line["cost"] = round(cost, 6)
        line["currency"] = prices.currency
    return line


def _sum(values: pa.ChunkedArray) -> int:
    return int(pc.sum(values).as_py() or 0)


def describe_account(section: str, line: dict) -> str:
    """One served stage's record line in words, for the run summary and the report."""
    text = (
        f"{section}.endpoint {line['model']}: {line['requests']:,} requests ({line['failed']:,} failed), "
        f"{line['retries']:,} retries, {line[col.PROMPT_TOKENS]:,} prompt + {line[col.COMPLETION_TOKENS]:,} "
        f"completion tokens"
    )
    if line.get("requests_per_second") is not None:
        text += f", {line['requests_per_second']:g} requests/s"
    if "cost" in line:
        text += f", about {line['cost']:.4f} {line['currency']}"
    return text
