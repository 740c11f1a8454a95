"""The run report: written by every run, checked against the run record and the committed table."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import json
import logging
import os
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from deltalake import write_deltalake
from PIL import Image

from jobs.cli import main
from operators import schema as col
from operators.image.decode import DecodeConfig
from operators.storage import StorageOptions
from pipelines import logs
from pipelines.config import ConfigError, default_run_records_uri, validate_config
from pipelines.input.images import ImageSource
from pipelines.report.data import histogram_values, sample_rows, stored_config
from pipelines.report.report import build_report, existing_report, write_text
from pipelines.report.thumbnails import add_thumbnails, thumbnail
from pipelines.run import run_pipeline
from pipelines.table.read import read_output
from pipelines.table.records import RunRecord, append_run_record, read_run_records
from tests.images import encode, solid

EVIL_CAPTION = '<script>alert("caption")</script> & <img src="http://evil.example/x.png">'
EVIL_KEY = 'k"><b>1'
# The shards of the two runs do not use img2dataset's column names, so only the run's config says where the images are.
COLUMNS = {"key": "id", "caption": "text", "image": "image"}


class Page(HTMLParser):
    """The parts of a report a test looks at."""

    def __init__(self, text: str):
        super().__init__()
        self.urls, self.images, self.cards, self.outcomes, self.json, self.scripts = [], [], [], {}, {}, 0
        self.pairs, self.duplicate_counts = [], {}
        self._script_id, self._outcome, self._card, self._cells = None, None, None, []
        self._pair, self._pair_depth, self._duplicates = None, 0, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]
        if tag == "script":
            self.scripts += 1
            self._script_id = a.get("id")
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "figure":
            self._card = {"kind": a["class"].split()[1], "key": a["data-key"], "img": None, "text": ""}
            self.cards.append(self._card)
        elif tag == "tr" and "data-outcome" in a:
            self._outcome, self._cells = a["data-outcome"], []
        elif tag == "tr" and "data-duplicates" in a:
            self._duplicates, self._cells = a["data-duplicates"], []
        if tag == "img" and self._card is not None:
            self._card["img"] = a["src"]
        if tag == "div" and self._pair is not None:
            self._pair_depth += 1
        elif tag == "div" and "pair" in a.get("class", "").split():
            self._pair, self._pair_depth = {**a, "imgs": [], "text": ""}, 1
            self.pairs.append(self._pair)
        if tag == "img" and self._pair is not None:
            self._pair["imgs"].append(a["src"])

    def handle_endtag(self, tag):
        if tag == "figure":
            self._card = None
        elif tag == "tr" and self._outcome:
            self.outcomes[self._outcome] = int(self._cells[1])
            self._outcome = None
        elif tag == "tr" and self._duplicates:
            self.duplicate_counts[self._duplicates] = (int(self._cells[1]), self._cells[2], self._cells[3])
            self._duplicates = None
        elif tag == "div" and self._pair is not None:
            self._pair_depth -= 1
            if self._pair_depth == 0:
                self._pair = None
        elif tag == "script":
            self._script_id = None

    def handle_data(self, data):
        if self._script_id:
            self.json[self._script_id] = json.loads(data)
        if self._card is not None:
            self._card["text"] += data
        if self._outcome or self._duplicates:
            self._cells.append(data)
        if self._pair is not None:
            self._pair["text"] += data + " "


@pytest.fixture(scope="module")
def two_runs(local_shards, tiny_clip_dir, tmp_path_factory):
    """Two runs of the same date on one output; the first cannot write its report."""
    _, paths, manifest, _ = local_shards
    root = tmp_path_factory.mktemp("report")
    shards = root / "shards"
    shards.mkdir()
    shard = pq.read_table(paths[0])
    good = next(
        r for r in shard.to_pylist() if r["key"] not in manifest["broken_keys"] + manifest["empty_caption_keys"]
    )
    untrusted = [{**good, "key": EVIL_KEY, "caption": EVIL_CAPTION}, {**good, "key": "k2", "caption": "x" * 200}]
    renamed = {"key": COLUMNS["key"], "caption": COLUMNS["caption"], "jpg": COLUMNS["image"]}
    for name, table in (
        (paths[0].name, shard),
        ("untrusted.parquet", pa.Table.from_pylist(untrusted, schema=shard.schema)),
    ):
        pq.write_table(table.rename_columns([renamed.get(c, c) for c in table.column_names]), shards / name)

    out = root / "out"
    out.mkdir()
    (out / "_vlpipe_reports").write_text("a file where the reports folder should be")
    raw = {
        "input": {"uri": str(shards), "columns": COLUMNS},
        "clip": {"model": {"source": str(tiny_clip_dir)}},
        "filter": {"min_clip_score": 0.0},
        "output": {"uri": str(out)},
        "executor": "in_process",
        "report": {"samples": 50},
        "run_date": "2026-11-01",
    }
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.addFilter(logs.RunIdFilter())
    handler.emit = lambda record: lines.append((record.name, record.run_id, record.getMessage()))
    logging.getLogger().addHandler(handler)
    old_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.INFO)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    printed = io.StringIO()
    try:
        first = run_pipeline(validate_config(raw))
        (out / "_vlpipe_reports").unlink()
        with contextlib.redirect_stdout(printed):  # the second run as a user starts it
            assert main(["run", str(config), "--set", "filter.min_clip_score=0.05"]) == 0
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(old_level)
    row = read_run_records(default_run_records_uri(str(out)), StorageOptions()).to_pylist()[-1]
    second = SimpleNamespace(**{**row, "rejected_by_reason": json.loads(row["rejected_by_reason"])})
    return {
        "out": out,
        "first": first,
        "second": second,
        "lines": lines,
        "manifest": manifest,
        "printed": printed.getvalue(),
    }


@pytest.mark.slow
def test_a_report_that_cannot_be_written_leaves_the_run_succeeded_with_a_warning(two_runs):
    first = two_runs["first"]
    assert first.status == "succeeded" and first.table_version == 0
    warnings = [m for name, _, m in two_runs["lines"] if name == "pipelines.report.report" and "could not write" in m]
    assert len(warnings) == 1 and str(two_runs["out"] / "_vlpipe_reports" / first.run_id) in warnings[0]
    assert existing_report(str(two_runs["out"]), first.run_id, StorageOptions()) is None  # so the CLI prints no path


@pytest.mark.slow
def test_every_vlpipe_log_line_of_a_run_names_the_run(two_runs):
    first, second = two_runs["first"].run_id, two_runs["second"].run_id
    ours = [(run_id, m) for name, run_id, m in two_runs["lines"] if name.startswith(("pipelines", "operators"))]
    assert {run_id for run_id, _ in ours} == {first, second}
    assert any(run_id == second and "report written" in m for run_id, m in ours)
    assert logs.current_run_id() is None  # unbound once run_pipeline returned


@pytest.mark.slow
def test_each_run_writes_a_report_whose_counts_are_the_run_record(two_runs):
    second = two_runs["second"]
    assert f"  report       {two_runs['out']}/_vlpipe_reports/{second.run_id}.html" in two_runs["printed"]
    page = Page((two_runs["out"] / "_vlpipe_reports" / f"{second.run_id}.html").read_text())

    expected = {
        "rows_in": second.rows_in,
        "kept": second.rows_kept,
        "rejected": second.rows_rejected,
        **second.rejected_by_reason,
    }
    assert page.outcomes == expected and len(second.rejected_by_reason) >= 2
    summary = page.json["vlpipe-summary"]
    assert summary["run_id"] == second.run_id and summary["rejected_by_reason"] == second.rejected_by_reason
    # samples: 50 covers every row, so the gallery shows each kept and rejected row once.
    assert sorted(c["kind"] for c in page.cards) == ["kept"] * second.rows_kept + ["rejected"] * second.rows_rejected
    assert summary["previous_run_id"] == two_runs["first"].run_id


@pytest.mark.slow
def test_histograms_are_the_committed_rows_and_the_previous_run_is_overlaid(two_runs):
    out, first, second = two_runs["out"], two_runs["first"], two_runs["second"]
    page = Page((out / "_vlpipe_reports" / f"{second.run_id}.html").read_text())
    hists = {h["name"]: h for h in page.json["vlpipe-histograms"]}
    assert {"clip_score", "caption_length"} <= set(hists)

    now = read_output(str(out))  # the date's partition now holds the second run's rows
    before = read_output(str(out), version=first.table_version)  # the first run's, by time travel
    assert set(now.column(col.RUN_ID).to_pylist()) == {second.run_id}
    for name, h in hists.items():
        edges = np.array(h["edges"])
        assert h["counts"] == np.histogram(histogram_values(now, name), bins=edges)[0].tolist()
        assert h["previous_counts"] == np.histogram(histogram_values(before, name), bins=edges)[0].tolist()
    clip = hists["clip_score"]
    assert clip["threshold"] == 0.05 and sum(clip["counts"]) == pa.compute.count(now.column(col.CLIP_SCORE)).as_py()
    assert max(len(c or "") for c in now.column(col.CAPTION).to_pylist()) <= hists["caption_length"]["edges"][-1]


@pytest.mark.slow
def test_vlpipe_report_embeds_every_image_and_escapes_captions(two_runs, tmp_path, capsys):
    out, first = two_runs["out"], two_runs["first"]
    target = tmp_path / "first.html"
    assert main(["-q", "report", str(out), "--run", first.run_id, "--out", str(target), "--samples", "50"]) == 0
    assert str(target) in capsys.readouterr().out
    text = target.read_text()
    page = Page(text)

    assert page.json["vlpipe-summary"]["previous_run_id"] is None and "No earlier run" in text
    assert page.outcomes["rows_in"] == first.rows_in and page.outcomes["kept"] == first.rows_kept
    assert page.images and all(src.startswith("data:image/jpeg;base64,") for src in page.images)
    assert not [u for u in page.urls if not u.startswith("data:")] and "url(" not in text
    for src in page.images:
        assert max(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size) <= 96

    assert EVIL_CAPTION not in text and "<b>1" not in text
    assert page.scripts == 2  # the two JSON blocks; the caption's <script> is text
    evil = next(c for c in page.cards if c["key"] == EVIL_KEY)
    assert EVIL_CAPTION in evil["text"] and evil["img"]
    broken = set(two_runs["manifest"]["broken_keys"])
    for card in page.cards:
        if card["key"] in broken:  # no image: a placeholder naming the status
            assert card["img"] is None and ("decode_error" in card["text"] or "missing_image" in card["text"])
    assert any(c["key"] in broken for c in page.cards)


@pytest.mark.slow
def test_vlpipe_report_reads_the_images_from_the_input_columns_the_run_was_configured_with(two_runs, tmp_path):
    """`vlpipe report` gets only the output: the column names (id, text, image) come from the recorded config."""
    out, second = two_runs["out"], two_runs["second"]
    recorded = json.loads(second.config_json)["input"]["columns"]
    assert {name: recorded[name] for name in COLUMNS} == COLUMNS
    target = tmp_path / "custom-columns.html"
    assert main(["-q", "report", str(out), "--out", str(target), "--samples", "50"]) == 0
    page = Page(target.read_text())

    broken = set(two_runs["manifest"]["broken_keys"])
    decoded = [c for c in page.cards if c["key"] not in broken]
    assert len(page.cards) == second.rows_in and decoded
    assert all(c["img"] and c["img"].startswith("data:image/jpeg;base64,") for c in decoded)


@pytest.mark.slow
def test_quiet_and_verbose_set_what_the_cli_logs(two_runs, tmp_path, capsys):
    out = str(two_runs["out"])
    assert main(["-v", "report", out, "--out", str(tmp_path / "v.html")]) == 0
    assert f"DEBUG   pipelines.report.data: report of run {two_runs['second'].run_id}" in capsys.readouterr().err
    assert main(["-q", "report", out, "--out", str(tmp_path / "q.html")]) == 0
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        main(["-q", "-v", "report", out])


@pytest.mark.slow
def test_the_report_renders_in_headless_chromium_without_console_errors(two_runs, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium not found: `make test` installs Debian's chromium where apt-get is available")
    report = two_runs["out"] / "_vlpipe_reports" / f"{two_runs['second'].run_id}.html"
    done = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CONSOLE" not in done.stderr, done.stderr  # console messages (JS errors included) are logged so
    page = Page(done.stdout)  # the DOM as the browser built it
    assert page.scripts == 2 and len([c for c in page.cards if c["kind"] == "kept"]) == two_runs["second"].rows_kept
    assert 'id="gallery-rejected"' in done.stdout and all(src.startswith("data:") for src in page.images)


@pytest.mark.slow
def test_reports_and_thumbnails_go_through_object_storage(s3, s3_input, local_shards):
    _, paths, manifest, _ = local_shards
    storage = StorageOptions(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
    )
    s3.create_bucket("reports")
    write_text("s3://reports/t/_vlpipe_reports/r1.html", "<p>report</p>", storage)
    assert existing_report("s3://reports/t", "r1", storage) == "s3://reports/t/_vlpipe_reports/r1.html"
    assert existing_report("s3://reports/t", "r2", storage) is None

    shard = f"{s3_input}{paths[1].name}"
    keys = [r["key"] for r in pq.read_table(paths[1], columns=["key"]).to_pylist()]
    good = next(k for k in keys if k not in manifest["broken_keys"])
    samples = [
        {col.KEY: good, col.STATUS: col.OK, col.SOURCE_SHARD: shard},
        {col.KEY: "not-in-the-shard", col.STATUS: col.OK, col.SOURCE_SHARD: shard},
    ]
    add_thumbnails(samples, ImageSource(), DecodeConfig(), storage)  # img2dataset's names, as these shards use
    assert samples[0]["thumbnail"].startswith("data:image/jpeg;base64,") and samples[1]["thumbnail"] is None


def test_rejected_sample_is_stable_and_spread_over_reasons():
    reasons = [None] * 6 + [col.LOW_CLIP_SCORE] * 30 + [col.DECODE_ERROR] * 2 + [col.EMPTY_CAPTION]
    rows = pa.table(
        {
            col.KEY: [f"k{i}" for i in range(len(reasons))],
            col.KEEP: [r is None for r in reasons],
            col.REJECT_REASON: reasons,
        }
    )
    kept, rejected = sample_rows(rows, 4)
    assert len(kept) == 4 and all(r[col.KEEP] for r in kept)
    assert len(rejected) == 4 and {r[col.REJECT_REASON] for r in rejected} == {
        col.LOW_CLIP_SCORE,
        col.DECODE_ERROR,
        col.EMPTY_CAPTION,
    }
    again = sample_rows(rows.take(np.arange(rows.num_rows)[::-1]), 4)  # input order does not matter
    assert [r[col.KEY] for r in again[0] + again[1]] == [r[col.KEY] for r in kept + rejected]


def test_thumbnails_are_small_jpegs_and_bad_bytes_get_none():
    wide = encode(solid((0, 0, 255, 0), size=(400, 100), mode="RGBA"))
    uri = thumbnail(wide, formats=["PNG"], max_pixels=10**6)
    image = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/jpeg;base64,"))))
    assert image.format == "JPEG" and image.size == (96, 24)
    assert image.getpixel((48, 12))[2] > 200 and image.getpixel((48, 12))[0] > 200  # transparent → white, not black
    assert thumbnail(b"\x89PNG\r\n\x1a\n truncated", formats=["PNG"], max_pixels=10**6) is None
    assert thumbnail(wide, formats=["JPEG"], max_pixels=10**6) is None  # outside the run's format allowlist
    assert thumbnail(wide, formats=["PNG"], max_pixels=1000) is None  # larger than decode.max_pixels


def test_the_recorded_config_validates_again_without_its_masked_storage():
    config = validate_config(
        {
            "input": {"uri": "s3://raw/crawl/", "columns": {"key": "id", "image": "png"}},
            "clip": {"model": {"source": "openai/clip-vit-base-patch32"}},
            "output": {"uri": "s3://lake/enriched"},
            "storage": {"endpoint_url": "http://s3:8333", "access_key_id": "AKIA1", "secret_access_key": "s3cr3t"},
            "decode": {"max_pixels": 1000},
            "filter": {"min_clip_score": 0.2},
            "run_date": "2026-11-01",
        }
    )
    recorded = json.dumps(config.public_dump(), sort_keys=True)  # as run records store it
    assert "s3cr3t" not in recorded and "**********" in recorded

    again = stored_config({"run_id": "r1", "config_json": recorded})
    assert again == config.model_copy(update={"storage": StorageOptions()})  # the caller's storage is used instead
    assert again.input.columns.key == "id" and again.decode.max_pixels == 1000
    with pytest.raises(ConfigError, match="config recorded with run r1"):
        stored_config({"run_id": "r1", "config_json": json.dumps({**config.public_dump(), "surprise": 1})})


def _chromium() -> str | None:
    """The browser `make browser` installs (Debian's chromium), or another Chromium on PATH."""
    found = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "chromium-headless-shell"))), None)
    return found or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


def test_heads_and_tags_get_histograms_with_their_thresholds_and_the_previous_run_overlaid():
    from operators.decisions.filter import FilterConfig
    from pipelines.report.data import RunScan, Sampler, histograms

    def scan(aesthetic, nsfw, red):
        rows = pa.table(
            {
                col.AESTHETIC_SCORE: pa.array(aesthetic, pa.float32()),
                col.NSFW_SCORE: pa.array(nsfw, pa.float32()),
                col.TAG_SCORES: pa.array(
                    [None if v is None else [("red", v), ("blue", 1 - v)] for v in red], col.TAG_SCORES_TYPE
                ),
            }
        )
        names = (col.CLIP_SCORE, col.AESTHETIC_SCORE, col.NSFW_SCORE, "tag:red", "caption_length")
        return RunScan(Sampler(0), values={name: histogram_values(rows, name) for name in names})

    this = scan([4.0, 5.5, None, 7.0], [0.1, 0.9, None, 0.2], [0.9, None, 0.1, 0.5])
    before = scan([3.0, 9.0], [0.5, 0.6], [0.2, 0.3])
    config = FilterConfig(min_aesthetic_score=5.0, max_nsfw_score=0.3, tags={"red": {"max": 0.8}})
    hists = {h.name: h for h in histograms(this, before, config)}
    assert set(hists) == {col.AESTHETIC_SCORE, col.NSFW_SCORE, "tag:red"}  # nothing to draw for the rest
    assert (hists[col.AESTHETIC_SCORE].threshold, hists[col.NSFW_SCORE].threshold, hists["tag:red"].threshold) == (
        5.0,
        0.3,
        0.8,
    )
    assert hists["tag:red"].label == "tag red"
    for h, now, previous in (
        (hists[col.AESTHETIC_SCORE], 3, 2),
        (hists[col.NSFW_SCORE], 3, 2),
        (hists["tag:red"], 3, 2),
    ):
        assert sum(h.counts) == now and sum(h.previous_counts) == previous
    assert hists[col.AESTHETIC_SCORE].edges[0] == 3.0 and hists[col.AESTHETIC_SCORE].edges[-1] == 9.0


OCT31, NOV01 = dt.date(2026, 10, 31), dt.date(2026, 11, 1)
# Near duplicates differ in 3 bits, the sign bit among them: counted on the signed XOR, it would read 62.
PHASH = 0b101
PHASH_NEAR = int.from_bytes((PHASH ^ 0b11 ^ (1 << 63)).to_bytes(8, "big"), "big", signed=True)


@pytest.fixture(scope="module")
def dedup_runs(tmp_path_factory):
    """Two runs' rows written as the pipeline commits them: 31 Oct's run, then 1 Nov's, whose dedup marked
    an exact duplicate within the run, and a near and a semantic one of 31 Oct's rows ("d" is a key of both days)."""
    root = tmp_path_factory.mktemp("report-dedup")
    images = {
        name: encode(solid(color, size=(48, 32)), "JPEG")
        for name, color in (("green", (0, 160, 0)), ("red", (200, 0, 0)), ("blue", (0, 0, 200)), ("grey", (90, 90, 90)))
    }
    shards = {OCT31: root / "shards" / "oct31.parquet", NOV01: root / "shards" / "nov01.parquet"}
    rows = {
        OCT31: [
            ("e-near", "red", "a red square", {col.IMAGE_PHASH: PHASH}),
            ("d", "blue", "yesterday's blue square", {col.IMAGE_EMBEDDING: [1.0, 0.0, 0.0, 0.0]}),
        ],
        NOV01: [
            ("a", "green", "a green square", {col.IMAGE_SHA256: "5a" * 32}),
            (
                "b",
                "green",
                "the green square again",
                {
                    col.IMAGE_SHA256: "5a" * 32,
                    col.KEEP: False,
                    col.REJECT_REASON: col.DUPLICATE_EXACT,
                    col.DUPLICATE_OF: {"key": "a", "run_date": NOV01},
                },
            ),
            (
                "c",
                "red",
                "a red square, recompressed",
                {
                    col.IMAGE_PHASH: PHASH_NEAR,
                    col.KEEP: False,
                    col.REJECT_REASON: col.DUPLICATE_NEAR,
                    col.DUPLICATE_OF: {"key": "e-near", "run_date": OCT31},
                },
            ),
            (
                "d",
                "blue",
                "tonight's blue square",
                {
                    col.IMAGE_EMBEDDING: [0.96, 0.28, 0.0, 0.0],
                    col.KEEP: False,
                    col.REJECT_REASON: col.DUPLICATE_SEMANTIC,
                    col.DUPLICATE_OF: {"key": "d", "run_date": OCT31},
                },
            ),
            ("f", "grey", "grey", {col.KEEP: False, col.REJECT_REASON: col.LOW_CLIP_SCORE}),
        ],
    }
    shards[OCT31].parent.mkdir()
    out = root / "out"
    runs_uri = default_run_records_uri(str(out))
    raw = {
        "input": {"uri": str(shards[OCT31].parent)},
        "clip": {"model": {"source": "openai/clip-vit-base-patch32"}},
        "output": {"uri": str(out)},
        "dedup": {"exact": True, "near": {"max_distance": 4}, "semantic": {"eps": 0.05}},
    }
    for version, (day, day_rows) in enumerate(rows.items()):
        pq.write_table(
            pa.table(
                {
                    "key": [r[0] for r in day_rows],
                    "caption": [r[2] for r in day_rows],
                    "jpg": [images[r[1]] for r in day_rows],
                }
            ),
            shards[day],
        )
        run_id = f"run-{day}"
        table = [
            {
                col.KEY: key,
                col.CAPTION: caption,
                col.SOURCE_SHARD: str(shards[day]),
                col.STATUS: col.OK,
                col.KEEP: True,
                col.RUN_ID: run_id,
                col.RUN_DATE: day,
                **extra,
            }
            for key, _, caption, extra in day_rows
        ]
        write_deltalake(
            str(out),
            pa.Table.from_pylist(table, schema=col.output_schema()),
            mode="append",
            partition_by=[col.RUN_DATE],
        )
        reasons = dict(Counter(r[col.REJECT_REASON] for r in table if not r[col.KEEP]))
        started = dt.datetime.combine(day, dt.time(2), dt.timezone.utc)
        config = validate_config({**raw, "run_date": day.isoformat()})
        append_run_record(
            runs_uri,
            StorageOptions(),
            RunRecord(
                run_id=run_id,
                run_date=day,
                status="succeeded",
                started_at=started,
                finished_at=started + dt.timedelta(seconds=5),
                config_hash="h",
                config_json=json.dumps(config.public_dump()),
                output_uri=str(out),
                table_version=version,
                rows_in=len(table),
                rows_kept=sum(r[col.KEEP] for r in table),
                rejected_by_reason=reasons,
                rows_written=len(table),
            ),
        )
    return runs_uri


def test_the_report_shows_each_duplicate_beside_the_row_it_duplicates(dedup_runs):
    text = build_report(dedup_runs, StorageOptions(), "run-2026-11-01")
    page = Page(text)

    assert {r: page.outcomes[r] for r in col.DUPLICATE_REASONS} == dict.fromkeys(col.DUPLICATE_REASONS, 1)
    assert "near duplicate: pHash within 4 bits" in text  # the summary says what each reason means
    assert 'id="duplicates"' in text and page.duplicate_counts == {
        col.DUPLICATE_EXACT: (1, "0", "same image bytes (SHA-256)"),
        col.DUPLICATE_NEAR: (1, "1", "near duplicate: pHash within 4 bits"),
        col.DUPLICATE_SEMANTIC: (1, "1", "semantic duplicate: image embedding cosine >= 0.95"),
    }
    pairs = {p["data-method"]: p for p in page.pairs}
    shown = [
        (pairs[m]["data-key"], pairs[m]["data-of-key"], pairs[m]["data-of-run-date"]) for m in col.DUPLICATE_REASONS
    ]
    assert shown == [("b", "a", "2026-11-01"), ("c", "e-near", "2026-10-31"), ("d", "d", "2026-10-31")]
    for pair in pairs.values():
        assert len(pair["imgs"]) == 2 and all(src.startswith("data:image/jpeg;base64,") for src in pair["imgs"])
    assert pairs[col.DUPLICATE_NEAR]["data-distance"] == "3" and "3 bits" in pairs[col.DUPLICATE_NEAR]["text"]
    assert "0.960" in pairs[col.DUPLICATE_SEMANTIC]["text"]
    # Looked up by key and run_date: the "d" it duplicates is 31 Oct's, not itself.
    assert "tonight's blue square" in pairs[col.DUPLICATE_SEMANTIC]["text"]
    assert "yesterday's blue square" in pairs[col.DUPLICATE_SEMANTIC]["text"]
    assert "identical" in pairs[col.DUPLICATE_EXACT]["text"] and "5a5a5a5a" in pairs[col.DUPLICATE_EXACT]["text"]
    assert len(page.json["vlpipe-summary"]["duplicates_shown"]) == 3 and page.scripts == 2
    assert len(page.cards) == 5  # the gallery is as before: every row of the run once


def test_a_run_without_duplicates_has_no_duplicates_section(dedup_runs):
    text = build_report(dedup_runs, StorageOptions(), "run-2026-10-31")
    assert 'id="duplicates"' not in text and "Duplicates" not in text and not Page(text).pairs


def test_answer_yes_prob_gets_a_histogram_at_its_threshold_and_a_card_shows_the_answer():
    from operators.decisions.filter import FilterConfig
    from pipelines.report.data import RunScan, Sampler, histograms
    from pipelines.report.html import _card

    rows = pa.table({col.ANSWER_YES_PROB: pa.array([0.2, None, 0.9], pa.float32())})
    scan = RunScan(Sampler(0), values={col.ANSWER_YES_PROB: histogram_values(rows, col.ANSWER_YES_PROB)})
    (hist,) = histograms(scan, None, FilterConfig(min_answer_yes_prob=0.5))
    assert (hist.name, hist.threshold, sum(hist.counts)) == (col.ANSWER_YES_PROB, 0.5, 2)
    card = _card(
        {
            col.KEY: "k",
            col.CAPTION: "a cat",
            col.STATUS: col.OK,
            col.KEEP: False,
            col.REJECT_REASON: col.LOW_ANSWER_YES_PROB,
            col.ANSWER: "no <b>",
            col.ANSWER_YES_PROB: 0.2,
        },
        "rejected",
    )
    assert "<dt>answer</dt><dd>no &lt;b&gt;</dd>" in card and "p(yes) 0.200" in card
