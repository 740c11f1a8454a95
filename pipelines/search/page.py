"""``vlpipe search --html``: the hits as one self-contained page, thumbnails read back from the source shards.

Thumbnails are the run report's (``pipelines.report.thumbnails``): only the hits' key and
image columns are read from their shards, under the column names and decode limits of
the run that wrote each row, as the manifest records them. Every value from the data is
escaped; CSS is inline and images are data URIs, so the page opens offline.
"""

from __future__ import annotations

from collections import defaultdict
from html import escape

import pyarrow as pa

from operators import schema as col
from operators.storage import StorageOptions
from pipelines.input.images import ImageSource
from pipelines.report.thumbnails import add_thumbnails, thumbnail
from pipelines.search.files import IndexManifest, RunSource
from pipelines.search.query import RANK, SCORE

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2430;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px}.sub{color:#5b6573}.query{display:flex;gap:12px;align-items:center;margin:12px 0}
.query img{width:96px;height:96px;object-fit:contain;background:#eef1f4}
.hits{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px;margin-top:12px}
.hit{margin:0;background:#fff;border:1px solid #dde2e8;padding:8px;display:flex;flex-direction:column;gap:4px}
.hit img,.ph{width:96px;height:96px;object-fit:contain;background:#eef1f4;align-self:center}
.ph{display:flex;align-items:center;justify-content:center;font-size:11px;color:#8a3a3a}
.top{display:flex;justify-content:space-between;font-variant-numeric:tabular-nums}.rank{font-weight:600}
.key{font-family:ui-monospace,monospace;color:#5b6573;font-size:12px;overflow-wrap:anywhere}
figcaption{font-size:12px;overflow-wrap:anywhere}
"""


def results_page(
    results: pa.Table, manifest: IndexManifest, query: str, storage: StorageOptions, query_image: bytes | None = None
) -> str:
    """The page: the query (its image too, for an image query) and one card per hit, best first."""
    hits = results.to_pylist()
    _add_thumbnails(hits, manifest, storage)
    shown = thumbnail(query_image, formats=None, max_pixels=10**9) if query_image else None
    title = "vlpipe search"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width,initial-scale=1">',
            f"<title>{escape(f'{title}: {query}')}</title><style>{_CSS}</style></head><body>",
            f"<h1>{escape(title)}</h1>",
            (
                f'<div class="sub">{len(hits)} nearest of {manifest.count} {escape(manifest.embedding)} embeddings · '
                f"{escape(manifest.index_type)} · <code>{escape(manifest.table_uri)}</code> "
                f"version {manifest.table_version}"
                f" · model {escape(str(manifest.model))}</div>"
            ),
            f'<div class="query">{_img(shown, "query image") if query_image else ""}<b>{escape(query)}</b></div>',
            f'<div class="hits" id="hits">{"".join(_card(hit) for hit in hits)}</div>',
            "</body></html>",
        ]
    )


def _add_thumbnails(hits: list[dict], manifest: IndexManifest, storage: StorageOptions) -> None:
    """Each hit's ``thumbnail``, read with the input columns and decode limits of the run that wrote it."""
    by_run: dict[str, list[dict]] = defaultdict(list)
    for hit in hits:
        hit[col.STATUS] = col.OK  # an indexed row was kept: its image decoded
        by_run[hit[col.RUN_ID]].append(hit)
    for run_id, group in by_run.items():
        run = manifest.runs.get(run_id, RunSource())
        add_thumbnails(
            group,
            ImageSource(columns=run.input_columns, webdataset=run.webdataset, fetch=run.fetch),
            run.decode,
            storage,
        )


def _card(hit: dict) -> str:
    return (
        f'<figure class="hit" data-key="{escape(hit[col.KEY])}" data-rank="{hit[RANK]}">'
        f"{_img(hit['thumbnail'], 'image ' + hit[col.KEY])}"
        f'<div class="top"><span class="rank">#{hit[RANK]}</span><span>{hit[SCORE]:.3f}</span></div>'
        f'<div class="key">{escape(hit[col.KEY])} · {escape(str(hit[col.RUN_DATE]))}</div>'
        f"<figcaption>{escape(hit[col.CAPTION] or '')}</figcaption></figure>"
    )


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return '<div class="ph">image unavailable</div>'
    return f'<img src="{uri}" alt="{escape(alt)}">'
