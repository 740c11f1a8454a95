"""The run report: one self-contained HTML page per run, for looking rather than querying.

Writing and finding reports is here; the modules import one way:
``report`` (writing) -> ``report_html`` (rendering) -> ``report_data`` (what the page
shows, read from the run records and the output table) -> ``report_duplicates`` (the
duplicate pairs) and ``report_thumbnails``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from operators.storage import StorageOptions, filesystem_for
from pipelines.report.data import collect
from pipelines.report.html import render

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.table.records import RunRecord

log = logging.getLogger(__name__)

REPORTS_DIR = "_vlpipe_reports"


def report_uri(output_uri: str, run_id: str) -> str:
    """Where a run's report is written automatically: beside the run records, hidden from Delta readers."""
    return f"{output_uri.rstrip('/')}/{REPORTS_DIR}/{run_id}.html"


def write_run_report(config: PipelineConfig, record: RunRecord) -> str | None:
    """Write the report of a run that just finished; a failure is logged, never raised."""
    if not config.report.enabled:
        return None
    uri = report_uri(config.output.uri, record.run_id)
    try:
        page = build_report(config.output.run_records_uri, config.storage, record.run_id, samples=config.report.samples)
        write_text(uri, page, config.storage)
    except Exception as err:  # the run has committed; a report must not turn it into a failure
        log.warning("could not write the run report to %s: %s: %s", uri, type(err).__name__, err)
        return None
    log.info("report written to %s (%d KiB)", uri, len(page.encode()) // 1024)
    return uri


def existing_report(output_uri: str, run_id: str, storage: StorageOptions) -> str | None:
    """The automatic report of a run, if it was written."""
    uri = report_uri(output_uri, run_id)
    filesystem, path = filesystem_for(uri, storage)
    return uri if filesystem.get_file_info(path).type == pafs.FileType.File else None


def build_report(runs_uri: str, storage: StorageOptions, run_id: str | None = None, *, samples: int = 12) -> str:
    """The HTML report of ``run_id`` (default: the latest run) from the run-record table at ``runs_uri``."""
    return render(collect(runs_uri, storage, run_id, samples=samples))


def write_text(uri: str, text: str, storage: StorageOptions) -> None:
    """Write a small text file through the output's filesystem (local, S3, GCS)."""
    filesystem, path = filesystem_for(uri, storage)
    if isinstance(filesystem, pafs.LocalFileSystem):
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as out:
        out.write(text.encode())
