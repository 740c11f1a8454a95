"""A served VLM behind a fault proxy: every row accounted for, retries counted, nothing sent twice, no key leaked.

The server is real (``transformers serve`` with the tiny LLaVA); the proxy in front of it answers 429s
with ``Retry-After``, bursts of 503s, slow answers, dropped connections (before and after the server
answered) and a 400 for one row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import pytest
import yaml
from deltalake import DeltaTable
from PIL import Image

from jobs.cli import main
from operators import schema as col
from pipelines.table.records import read_run_records
from tests.operators.models.test_ask import reference_answers
from tests.reliability.s3_proxy import Fault, FaultProxy

pytestmark = pytest.mark.slow

KEY_ENV = "VLPIPE_TEST_ENDPOINT_KEY"
SECRET = "PLANTED-endpoint-key-3b9d1e"
# Before the session's Ray starts: its workers send the requests and read the key from their environment.
os.environ.setdefault(KEY_ENV, SECRET)
TEMPLATE = "Row {key}: does this image show {caption}?"
RETRIED = ("too_many", "unavailable", "reset", "reset_after")


def faults(bad_key: str) -> list[Fault]:
    return [
        Fault("POST", "too_many", count=2, start=3, every=9, delay=1.0),
        Fault("POST", "unavailable", count=3, start=12, every=1),  # a burst: three in a row
        Fault("POST", "slow", count=2, start=6, every=10, delay=1.5),
        Fault("POST", "reset", count=2, start=4, every=8),
        Fault("POST", "reset_after", count=2, start=5, every=11),  # the server answered; the client never knew
        Fault("POST", "bad_request", count=5, body_contains=f"Row {bad_key}:"),
    ]


def write_config(path: Path, shards: Path, clip: Path, out: Path, executor: str, base_url: str, model: str) -> str:
    served = {
        "base_url": base_url,
        "model": model,
        "api_key_env": KEY_ENV,
        "image_longest_side": None,  # the JPEGs as the input holds them: the reference decodes the same bytes
        "concurrency": 4,
        "batch_size": 8,
        "max_backoff_s": 1.0,
    }
    raw = {
        "executor": executor,
        "input": {"uri": str(shards)},
        "clip": {"model": {"source": str(clip)}, "resources": {"num_cpus": 0.5}},
        "decode": {"jpeg_draft": False, "resources": {"num_cpus": 0.5}},
        "ask": {"endpoint": served, "template": TEMPLATE, "max_new_tokens": 4},
        "output": {"uri": str(out)},
        "run_date": "2026-11-01",
    }
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("executor", ["in_process", "ray"])
def test_every_row_is_answered_once_or_rejected_with_the_servers_reason_through_faults(
    executor, request, vlm_server, local_shards, tiny_clip_dir, tiny_llava_dir, tmp_path, caplog, capfd
):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    folder, _, manifest, rows = local_shards
    broken, empty = set(manifest["broken_keys"]), set(manifest["empty_caption_keys"])
    asked = sorted(k for k in rows if k not in broken | empty)
    bad = asked[len(asked) // 2]
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    with FaultProxy(vlm_server.base_url.removesuffix("/v1"), faults(bad)) as proxy:
        config = write_config(
            tmp_path / "c.yaml", folder, tiny_clip_dir, out, executor, proxy.endpoint_url + "/v1", vlm_server.model
        )
        assert main(["run", config]) == 0
        proxy.stats()

    table = {r[col.KEY]: r for r in DeltaTable(str(out)).to_pyarrow_table().to_pylist()}
    assert sorted(table) == sorted(rows)
    answered = [k for k in asked if k != bad]
    images = [Image.open(io.BytesIO(rows[k]["jpg"])).convert("RGB") for k in answered]
    questions = [TEMPLATE.format(key=k, caption=rows[k]["caption"]) for k in answered]
    expected = dict(zip(answered, reference_answers(tiny_llava_dir, images, questions, max_new_tokens=4)))
    assert {k: table[k][col.ANSWER] for k in answered} == expected
    assert table[bad][col.STATUS] == table[bad][col.REJECT_REASON] == col.ENDPOINT_ERROR
    assert table[bad][col.ERROR] == "ask.endpoint: HTTP 400: This request's image is too large"
    assert all(table[k][col.ANSWER_USAGE] is None for k in broken | empty)

    # Retries counted: each retried fault cost its row one more try, and the proxy saw every try.
    usage = [table[k][col.ANSWER_USAGE] for k in asked]
    attempts = sum(u[col.ATTEMPTS] for u in usage)
    assert attempts - len(asked) == sum(proxy.fired[f"POST {kind}"] for kind in RETRIED) >= 7
    assert proxy.requests["POST"] == attempts and proxy.resent == 0
    with capfd.disabled():
        print(f"{executor}: {len(asked)} rows asked in {attempts} requests; faults {dict(proxy.fired)}")
    assert proxy.auth == {hashlib.sha256(f"Bearer {SECRET}".encode()).hexdigest(): attempts}

    record = read_run_records(str(out / "_vlpipe_runs")).to_pylist()[-1]
    account = json.loads(record["endpoints_json"])["ask"]
    assert account["requests"] == len(asked) and account["failed"] == 1 and account["attempts"] == attempts
    assert account["prompt_tokens"] == sum(u[col.PROMPT_TOKENS] or 0 for u in usage) > 0
    assert json.loads(record["rejected_by_reason"])[col.ENDPOINT_ERROR] == 1
    (report,) = (out / "_vlpipe_reports").glob("*.html")
    retries = attempts - len(asked)
    assert f"{len(asked)} requests (1 failed), {retries} retries" in report.read_text()
    assert_nowhere(SECRET, out, caplog.text + "".join(capfd.readouterr()), ray=executor == "ray")


def assert_nowhere(secret: str, out: Path, shown: str, *, ray: bool) -> None:
    """Not in the logs or the terminal, nor in any file the run wrote (table, run record, report)."""
    assert secret not in shown
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".html" for p in written) and any("_vlpipe_runs" in str(p) for p in written)
    for path in written:
        assert secret.encode() not in path.read_bytes(), path
    if ray:
        import ray as ray_module

        logs = Path(ray_module._private.worker._global_node.get_logs_dir_path())
        for path in (p for p in logs.rglob("*") if p.is_file()):
            assert secret.encode() not in path.read_bytes(), path


def test_a_server_that_is_down_for_the_whole_run_fails_it_in_bounded_time_with_one_line(
    local_shards, tiny_clip_dir, tmp_path, capsys
):
    import socket
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = local_shards[0]
    out = tmp_path / "out"
    config = write_config(
        tmp_path / "c.yaml", folder, tiny_clip_dir, out, "in_process", f"http://127.0.0.1:{port}/v1", "m"
    )
    raw = yaml.safe_load(Path(config).read_text())
    raw["ask"]["endpoint"]["unreachable_s"] = 3
    Path(config).write_text(yaml.safe_dump(raw))
    started = time.monotonic()
    assert main(["run", config]) == 1
    took = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"vlpipe: ask.endpoint: http://127.0.0.1:{port}/v1 answered nothing for 3 s")
    assert "ClientConnectorError" in err[-1] and 3 <= took < 30
    record = read_run_records(str(out / "_vlpipe_runs")).to_pylist()[-1]
    assert record["status"] == "failed" and "answered nothing" in record["error"]
