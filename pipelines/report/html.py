"""The run report's HTML: inline CSS and SVG only, so the file opens anywhere, offline.

Every value that came from data (captions, keys, errors, config) goes through
``html.escape``; the JSON blocks escape ``<`` so no caption can close its script tag.
"""

from __future__ import annotations

import datetime as dt
import json
from html import escape

from operators import schema as col
from operators.endpoint.usage import describe_account
from pipelines.config import PipelineConfig
from pipelines.report.data import Histogram, ReportData
from pipelines.report.duplicates import DuplicatePair

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2430;background:#fafbfc}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #dde2e8;padding-bottom:4px}
.sub{color:#5b6573}table{border-collapse:collapse}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}.reason td:first-child{padding-left:16px}
.cols{display:flex;flex-wrap:wrap;gap:32px}.bar{display:inline-block;height:10px;background:#4c78a8;vertical-align:middle}
.bar.rej{background:#e45756}.note{background:#fff6d6;border:1px solid #eedc9a;padding:6px 10px;margin:6px 0}
.hists{display:flex;flex-wrap:wrap;gap:20px}.hist{background:#fff;border:1px solid #dde2e8;padding:8px}
.hist h3{font-size:13px;margin:0 0 4px}svg text{font-size:10px;fill:#5b6573}
rect.cur{fill:#4c78a8}path.prev{fill:none;stroke:#f58518;stroke-width:1.5}line.thr{stroke:#e45756;stroke-dasharray:4 3}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;vertical-align:middle}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}
.card{display:flex;gap:8px;margin:0;background:#fff;border:1px solid #dde2e8;border-left:4px solid #54a24b;padding:6px}
.card.rejected{border-left-color:#e45756}.card img,.ph{width:96px;height:96px;object-fit:contain;flex:none;background:#eef1f4}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;font-size:11px;color:#8a3a3a}
.card figcaption{font-size:12px;min-width:0;overflow-wrap:anywhere}.key{font-family:ui-monospace,monospace;color:#5b6573}
.why{font-weight:600}.card.rejected .why{color:#b5322f}.card dl{margin:2px 0}.card dt{color:#5b6573;float:left;width:64px}
.card dd{margin:0 0 2px 64px}.err{color:#8a3a3a}pre{background:#fff;border:1px solid #dde2e8;padding:8px;overflow:auto}
.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:10px}
.pair{display:flex;gap:8px;align-items:flex-start;background:#fff;border:1px solid #dde2e8;border-left:4px solid #e45756;padding:6px}
.side{flex:1;min-width:0;font-size:12px;overflow-wrap:anywhere}.side img{width:96px;height:96px;object-fit:contain;background:#eef1f4}
.role{font-weight:600}.measure{flex:none;width:80px;align-self:center;text-align:center;font-size:12px;overflow-wrap:anywhere}.measure b{display:block}
"""


def render(data: ReportData) -> str:
    """The whole page."""
    run = data.run
    title = f"vlpipe run {run['run_id']}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        (
            f'<div class="sub">{escape(str(run["status"]))} · run date {escape(str(run["run_date"]))} · '
            f"output <code>{escape(run['output_uri'])}</code></div>"
        ),
        *(f'<div class="note">{escape(n)}</div>' for n in data.notes),
        _summary(data),
        _distributions(data),
        _gallery("Kept rows", col.KEPT, data.kept, run["rows_kept"]),
        _gallery("Rejected rows", "rejected", data.rejected, run["rows_rejected"]),
        _duplicates(data),
        _details(data),
        _json_block("vlpipe-summary", _summary_json(data)),
        _json_block("vlpipe-histograms", [vars(h) for h in data.histograms]),
        "</body></html>",
    ]
    return "\n".join(parts)


def _summary(data: ReportData) -> str:
    run = data.run
    reasons = json.loads(run["rejected_by_reason"] or "{}")
    total = max(run["rows_in"], 1)
    rules = _dedup_rules(data.config)

    def outcome(name: str, count: int, cls: str, extra: str = "") -> str:
        width = round(160 * count / total)
        rule = f' <span class="sub">{escape(rules[name])}</span>' if name in rules else ""
        return (
            f'<tr class="{cls}" data-outcome="{escape(name)}"><td>{escape(name)}</td><td class="num">{count}</td>'
            f'<td class="num">{100 * count / total:.1f}%</td>'
            f'<td><span class="bar{extra}" style="width:{width}px"></span>{rule}</td></tr>'
        )

    rows = [
        f'<tr data-outcome="rows_in"><td>rows in</td><td class="num">{run["rows_in"]}</td><td></td><td></td></tr>',
        outcome(col.KEPT, run["rows_kept"], col.KEPT),
        outcome("rejected", run["rows_rejected"], "rejected", " rej"),
        *(outcome(r, n, "reason", " rej") for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
    ]
    models = json.loads(run["models_json"] or "{}")
    facts = [
        ("duration", f"{run['duration_s']:.1f} s"),
        ("throughput", f"{run['rows_per_second']:.1f} rows/s" if run["rows_per_second"] else "-"),
        ("started", _time(run["started_at"])),
        ("input shards", f"{len(run['input_shards'] or [])} ({len(run['failed_shards'] or [])} failed)"),
        ("table version", "-" if run["table_version"] is None else str(run["table_version"])),
        *(
            (("resumed", f"{run['rows_resumed']} rows staged by an earlier attempt"),)
            if run.get("rows_resumed")
            else ()
        ),
        ("config hash", run["config_hash"]),
        *((f"{stage} model", _model(m)) for stage, m in models.items()),
        *((f"{section} endpoint", describe_account(section, line)) for section, line in _endpoints(run).items()),
    ]
    if data.caption_sources:
        facts.append(("caption_best from", ", ".join(f"{k} {v}" for k, v in sorted(data.caption_sources.items()))))
    if run.get("error"):
        facts.append(("error", run["error"]))
    failed = "".join(
        f"<li><code>{escape(f['uri'])}</code>: {escape(str(f['error']))}</li>" for f in run["failed_shards"] or []
    )
    return (
        '<h2>Summary</h2><div class="cols">'
        f'<table id="outcomes"><tr><th>outcome</th><th class="num">rows</th><th class="num">share</th><th></th></tr>{"".join(rows)}</table>'
        f'<table id="facts">{"".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts)}</table>'
        "</div>" + (f"<h3>Failed shards</h3><ul>{failed}</ul>" if failed else "")
    )


def _distributions(data: ReportData) -> str:
    previous = data.previous
    if previous:
        compare = (
            f"Bars: this run; line: previous run <code>{escape(previous['run_id'])}</code> "
            f"({escape(str(previous['run_date']))}), as shares of each run's rows."
        )
    else:
        compare = "No earlier run of this output to compare with."
    legend = (
        '<div class="legend"><span style="background:#4c78a8"></span>this run'
        + ('<span style="background:#f58518"></span>previous run' if previous else "")
        + '<span style="background:#e45756"></span>threshold</div>'
    )
    charts = "".join(_histogram(h) for h in data.histograms) or "<p>No scores in this run.</p>"
    return (
        f'<h2 id="distributions">Distributions</h2><p class="sub" id="comparison">{compare}</p>{legend}'
        f'<div class="hists">{charts}</div>{_stats_table(data.stats)}'
    )


def _histogram(h: Histogram, width: int = 340, height: int = 150) -> str:
    left, bottom, top = 34, 18, 14
    plot_w, plot_h = width - left - 6, height - bottom - top
    lo, hi = h.edges[0], h.edges[-1]
    span = (hi - lo) or 1.0
    total, prev_total = max(sum(h.counts), 1), max(sum(h.previous_counts or [0]), 1)
    shares = [c / total for c in h.counts]
    prev_shares = [c / prev_total for c in h.previous_counts] if h.previous_counts else []
    ymax = max([*shares, *prev_shares, 1e-9])

    def x(v: float) -> float:
        return left + (v - lo) / span * plot_w

    def y(share: float) -> float:
        return top + plot_h - share / ymax * plot_h

    out = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(h.label)}">'
    ]
    for a, b, count, share in zip(h.edges, h.edges[1:], h.counts, shares):
        out.append(
            f'<rect class="cur" x="{x(a):.1f}" y="{y(share):.1f}" width="{max(x(b) - x(a) - 1, 0.5):.1f}" '
            f'height="{top + plot_h - y(share):.1f}"><title>{a:.3g} to {b:.3g}: {count} rows</title></rect>'
        )
    if prev_shares:
        path = [f"M{x(lo):.1f},{y(0):.1f}"]
        for a, b, share in zip(h.edges, h.edges[1:], prev_shares):
            path.append(f"L{x(a):.1f},{y(share):.1f}L{x(b):.1f},{y(share):.1f}")
        path.append(f"L{x(hi):.1f},{y(0):.1f}")
        out.append(f'<path class="prev" d="{"".join(path)}"><title>previous run</title></path>')
    if h.threshold is not None:
        out.append(
            f'<line class="thr" x1="{x(h.threshold):.1f}" x2="{x(h.threshold):.1f}" y1="{top - 4}" y2="{top + plot_h}"/>'
            f'<text x="{x(h.threshold) + 3:.1f}" y="{top - 4}">threshold {h.threshold:g}</text>'
        )
    base = top + plot_h
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}" stroke="#9aa5b1"/>')
    out.append(
        f'<text x="{left}" y="{height - 4}">{lo:.3g}</text>'
        f'<text x="{left + plot_w}" y="{height - 4}" text-anchor="end">{hi:.3g}</text>'
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{ymax:.0%}</text>'
        f'<text x="{left - 4}" y="{base}" text-anchor="end">0</text>'
    )
    out.append("</svg>")
    n = sum(h.counts)
    return f'<div class="hist" data-name="{escape(h.name)}"><h3>{escape(h.label)} <span class="sub">n={n}</span></h3>{"".join(out)}</div>'


def _stats_table(stats: list[dict]) -> str:
    if not stats:
        return ""

    def num(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    column = escape(stats[0]["score_column"])
    head = (
        f'<tr><th></th><th class="num">rows in table</th><th class="num">kept</th><th class="num">{column} p10</th>'
        f'<th class="num">median</th><th class="num">p90</th><th class="num">mean</th></tr>'
    )
    body = "".join(
        f'<tr><th>{escape(s["label"])}</th><td class="num">{s["rows"]}</td><td class="num">{num(s["kept_rate"], "{:.1%}")}</td>'
        f'<td class="num">{num(s["p10"])}</td><td class="num">{num(s["p50"])}</td><td class="num">{num(s["p90"])}</td>'
        f'<td class="num">{num(s["mean"])}</td></tr>'
        for s in stats
    )
    return f'<table id="stats" style="margin-top:10px">{head}{body}</table>'


def _gallery(title: str, kind: str, rows: list[dict], total: int) -> str:
    cards = "".join(_card(r, kind) for r in rows)
    shown = f"{len(rows)} of {total}, a fixed sample" + (", spread over reasons" if kind == "rejected" else "")
    empty = "" if rows else "<p>None.</p>"
    return f'<h2>{title} <span class="sub">({shown})</span></h2><div class="gallery" id="gallery-{kind}">{cards}</div>{empty}'


def _image(row: dict) -> str:
    """The row's thumbnail, or a placeholder naming why there is none."""
    if row.get("thumbnail"):
        return f'<img src="{row["thumbnail"]}" alt="image {escape(row[col.KEY])}">'
    return f'<div class="ph">{escape(row[col.STATUS] if row[col.STATUS] != col.OK else "image unavailable")}</div>'


def _card(row: dict, kind: str) -> str:
    image = _image(row)
    why = col.KEPT if row[col.KEEP] else row[col.REJECT_REASON] or "rejected"
    captions = [
        ("original", row.get(col.CAPTION)),
        ("generated", row.get(col.CAPTION_GENERATED)),
        ("answer", row.get(col.ANSWER)),
    ]
    listing = "".join(
        f"<dt>{name}</dt><dd>{_text(text)}</dd>" for name, text in captions if text is not None or name == "original"
    )
    scores = [
        (name, row.get(c))
        for name, c in (
            ("clip", col.CLIP_SCORE),
            ("clip gen", col.CLIP_SCORE_GENERATED),
            ("clip best", col.CLIP_SCORE_BEST),
            ("itm", col.ITM_SCORE),
            ("aesthetic", col.AESTHETIC_SCORE),
            ("nsfw", col.NSFW_SCORE),
            ("p(yes)", col.ANSWER_YES_PROB),
        )
    ]
    scores += [(f"tag {tag}", value) for tag, value in row.get(col.TAG_SCORES) or []]
    scores += [(name, value) for name, value in row.get(col.CLASSIFIER_SCORES) or []]
    score_text = " · ".join(f"{name} {value:.3f}" for name, value in scores if value is not None)
    if row.get(col.CAPTION_LANGUAGE):
        score_text += f" · language {row[col.CAPTION_LANGUAGE]}"
    if row.get(col.CAPTION_SOURCE):
        score_text += f" · best from {row[col.CAPTION_SOURCE]}"
    error = f'<div class="err">{escape(row[col.ERROR])}</div>' if row.get(col.ERROR) else ""
    return (
        f'<figure class="card {kind}" data-key="{escape(row[col.KEY])}">{image}<figcaption>'
        f'<div class="key">{escape(row[col.KEY])}</div><div class="why">{escape(why)}</div>'
        f'<dl>{listing}</dl><div class="scores">{escape(score_text)}</div>{error}</figcaption></figure>'
    )


def _dedup_rules(config: PipelineConfig) -> dict[str, str]:
    """What each duplicate reason means under the run's own dedup settings."""
    dedup = config.dedup
    near = f"pHash within {dedup.near.max_distance} bits" if dedup.near else "pHash"
    semantic = f"image embedding cosine >= {1 - dedup.semantic.eps:g}" if dedup.semantic else "image embedding"
    return {
        col.DUPLICATE_EXACT: "same image bytes (SHA-256)",
        col.DUPLICATE_NEAR: f"near duplicate: {near}",
        col.DUPLICATE_SEMANTIC: f"semantic duplicate: {semantic}",
    }


def _duplicates(data: ReportData) -> str:
    found = data.duplicates
    if found is None:
        return ""
    rules = _dedup_rules(data.config)
    head = (
        '<tr><th>reason</th><th class="num">rows</th><th class="num">of another run_date</th>'
        "<th>duplicate of a row with</th></tr>"
    )
    rows = "".join(
        f'<tr data-duplicates="{escape(method)}"><td>{escape(method)}</td><td class="num">{n}</td>'
        f'<td class="num">{"-" if found.other_dates is None else found.other_dates[method]}</td>'
        f"<td>{escape(rules[method])}</td></tr>"
        for method, n in found.counts.items()
    )
    scope = "this run and the table's other run_dates" if data.config.dedup.history else "this run only"
    pairs = "".join(
        _pairs(method, [p for p in found.pairs if p.method == method], n) for method, n in found.counts.items()
    )
    return (
        f'<h2 id="duplicates">Duplicates <span class="sub">({sum(found.counts.values())} rows, '
        f'against {scope})</span></h2><table id="duplicate-counts">{head}{rows}</table>{pairs}'
    )


def _pairs(method: str, pairs: list[DuplicatePair], total: int) -> str:
    shown = f"{len(pairs)} of {total}, a fixed sample"
    body = "".join(_pair(p) for p in pairs)
    empty = "" if pairs else "<p>None shown (see the notes at the top).</p>"
    return (
        f'<h3>{escape(method)} <span class="sub">({shown})</span></h3>'
        f'<div class="pairs" id="pairs-{escape(method)}">{body}</div>{empty}'
    )


def _pair(pair: DuplicatePair) -> str:
    label, value = _measure(pair)
    distance = "" if pair.distance is None else f' data-distance="{pair.distance:g}"'
    return (
        f'<div class="pair" data-method="{escape(pair.method)}" data-key="{escape(pair.row[col.KEY])}" '
        f'data-of-key="{escape(pair.of_key)}" data-of-run-date="{escape(str(pair.of_run_date))}"{distance}>'
        f"{_side(pair.row, 'duplicate', pair.row[col.KEY], pair.row[col.RUN_DATE])}"
        f'<div class="measure"><span class="sub">duplicate of &rarr;</span><b>{escape(value)}</b>'
        f'<span class="sub">{escape(label)}</span></div>'
        f"{_side(pair.of, 'original', pair.of_key, pair.of_run_date)}</div>"
    )


def _measure(pair: DuplicatePair) -> tuple[str, str]:
    """How close the pair is, as (what is measured, value)."""
    if pair.method == col.DUPLICATE_EXACT:
        sha = pair.row.get(col.IMAGE_SHA256)
        return (f"SHA-256 {sha[:8]}…" if sha else "SHA-256"), "identical"
    if pair.distance is None:
        return "not comparable", "-"
    if pair.method == col.DUPLICATE_NEAR:
        return "pHash Hamming distance", f"{pair.distance:.0f} bits"
    return "embedding cosine", f"{pair.distance:.3f}"


def _side(row: dict | None, role: str, key: str, run_date) -> str:
    if row is None:
        image, caption = '<div class="ph">not in the table at this run\'s version</div>', ""
    else:
        image, caption = _image(row), _text(row.get(col.CAPTION))
        # An original can be rejected itself: near and semantic duplicates chain.
        if not row[col.KEEP]:
            role += f" (rejected too: {row.get(col.REJECT_REASON) or 'rejected'})"
    return (
        f'<div class="side"><div class="role">{escape(role)}</div>{image}'
        f'<div class="key">{escape(key)}</div><div class="sub">run_date {escape(str(run_date))}</div>'
        f"<div>{caption}</div></div>"
    )


def _details(data: ReportData) -> str:
    run = data.run
    versions = json.loads(run["versions_json"] or "{}")
    config = json.dumps(json.loads(run["config_json"] or "{}"), indent=2, sort_keys=True)  # as recorded
    return (
        "<h2>Configuration</h2><details open><summary>config (secrets masked)</summary>"
        f"<pre>{escape(config)}</pre></details>"
        f'<p class="sub">versions: {escape(", ".join(f"{k} {v}" for k, v in sorted(versions.items())))} · '
        f"finished {escape(_time(run['finished_at']))}</p>"
    )


def _endpoints(run: dict) -> dict[str, dict]:
    """The served stages' accounts (a record from before they existed has none)."""
    return json.loads(run.get("endpoints_json") or "{}")


def _summary_json(data: ReportData) -> dict:
    run = data.run
    return {
        "endpoints": _endpoints(run),
        "run_id": run["run_id"],
        "status": run["status"],
        "rows_in": run["rows_in"],
        "rows_kept": run["rows_kept"],
        "rows_rejected": run["rows_rejected"],
        "rejected_by_reason": json.loads(run["rejected_by_reason"] or "{}"),
        "previous_run_id": data.previous["run_id"] if data.previous else None,
        "kept_shown": [r[col.KEY] for r in data.kept],
        "rejected_shown": [r[col.KEY] for r in data.rejected],
        "duplicates_shown": [
            {
                "method": p.method,
                "key": p.row[col.KEY],
                "of_key": p.of_key,
                "of_run_date": str(p.of_run_date),
                "distance": p.distance,
            }
            for p in (data.duplicates.pairs if data.duplicates else [])
        ],
    }


def _json_block(element_id: str, value) -> str:
    text = json.dumps(value, sort_keys=True).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _text(value: str | None) -> str:
    if value is None:
        return '<span class="sub">(none)</span>'
    return escape(value) if value.strip() else '<span class="sub">(empty)</span>'


def _model(model: dict) -> str:
    served = f" served at {model['endpoint']}" if model.get("endpoint") else ""
    return model["source"] + (f" @ {model['revision']}" if model.get("revision") else "") + served


def _time(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(value, dt.datetime) else str(value)
