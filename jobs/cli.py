"""The ``vlpipe`` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.abc
import importlib.util
import logging
import os
import re
import signal
import sys
import traceback

from operators.endpoint.usage import describe_account
from pipelines import logs
from pipelines.config import ConfigError, default_run_records_uri, load_config
from pipelines.errors import PARTIAL_EXIT, Interrupted, UnreachableError, VlpipeError, exit_code_for
from pipelines.table.records import RunRecord

log = logging.getLogger("vlpipe")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlpipe`` console script."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.quiet and args.verbose:
        cli.error("--quiet and --verbose contradict each other")
    logs.configure(-1 if args.quiet else 1 if args.verbose else 0)
    previous = _stop_on_sigterm()
    try:
        return args.handler(args)
    except (VlpipeError, KeyboardInterrupt) as err:
        return _fail(args, str(err) or "interrupted (SIGINT)", exit_code_for(err))
    except OSError as err:  # storage that a step reached without naming it (deltalake, pyarrow)
        return _fail(args, f"storage: {' '.join(str(err).split())}", UnreachableError.exit_code)
    except Exception as err:  # a Ray failure or a bug
        return _fail(args, _cause(err) + ("" if args.verbose else " (-v shows the traceback)"), 1)
    finally:
        _restore(previous)


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)?(Error|Exception|Interrupt)\b.*?: ")


def _cause(err: Exception) -> str:
    """The line that names what went wrong: Ray's errors hold the worker's traceback and end with hints."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (named or lines or [type(err).__name__])[-1]


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    """Expected endings: one line and the documented exit code; -v adds where it came from."""
    if args.verbose:
        traceback.print_exc()
    print(f"vlpipe: {message}", file=sys.stderr)
    return code


def _stop_on_sigterm():
    """SIGTERM (a scheduler stopping the job) ends a run like Ctrl-C: recorded as interrupted."""

    def stop(signum, frame):
        raise Interrupted(f"interrupted ({signal.Signals(signum).name})")

    try:
        return signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (embedded use): leave signals to the host
        return None


def _restore(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def parser() -> argparse.ArgumentParser:
    """The ``vlpipe`` command line: global options, then one verb (the docs' CLI reference is made from it)."""
    top = argparse.ArgumentParser(prog="vlpipe", description=__doc__)
    top.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")
    top.add_argument("-v", "--verbose", action="store_true", help="debug messages from vlpipe's own modules")
    sub = top.add_subparsers(dest="command", required=True)
    for add in (
        _run_verbs,
        _job_verbs,
        _table_verbs,
        _dedup_verbs,
        _index_verbs,
        _export_verb,
        _search_verb,
        _tool_verbs,
    ):
        add(sub)
    return top


_OUTPUT = "the output table URI (output.uri of the config)"
_RUNS_URI = "run-record table, if not the default <output>/_vlpipe_runs"
_DATE = dt.date.fromisoformat


def _config_verb(sub, name: str, text: str, handler) -> argparse.ArgumentParser:
    verb = sub.add_parser(name, help=text)
    verb.add_argument("config", help="YAML config file")
    verb.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set filter.min_clip_score=0.25",
    )
    verb.set_defaults(handler=handler)
    return verb


def _run_verbs(sub) -> None:
    _config_verb(
        sub, "plan", "print the plan of a config without running it (stages, resources, columns, schema)", _plan
    )
    run = _config_verb(sub, "run", "run a pipeline config once and commit its output", _run)
    run.add_argument("--run-date", type=_DATE, help="partition date (default: today, UTC)")
    nightly = _config_verb(sub, "nightly", "process only new or changed shards into a date's partition", _nightly)
    nightly.add_argument("--date", type=_DATE, help="partition date (default: today, UTC)")
    nightly.add_argument("--force", action="store_true", help="recompute the date even if it is up to date")
    for verb in (run, nightly):
        verb.add_argument(
            "--fresh",
            action="store_true",
            help="discard what an earlier, unfinished run of the same date left to resume, and start over",
        )


def _job_verbs(sub) -> None:
    submit = sub.add_parser("submit", help="run a config as a Ray job on a cluster and stream its logs")
    submit.add_argument("config", help="YAML config file, inside the working directory that ships with the job")
    submit.add_argument("--address", help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--nightly", action="store_true", help="run `vlpipe nightly` instead of `vlpipe run`")
    submit.add_argument("--date", help="partition date, YYYY-MM-DD")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--force", action="store_true", help="with --nightly: recompute an up-to-date date")
    submit.add_argument("--working-dir", default=".", help="directory shipped with the job (default: .)")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting")
    submit.set_defaults(handler=_submit)
    for name, handler, text in (
        ("status", _job_status, "show a submitted job's status"),
        ("stop", _job_stop, "stop a submitted job"),
    ):
        job = sub.add_parser(name, help=text)
        job.add_argument("job_id")
        job.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS)")
        job.set_defaults(handler=handler)


def _table_verbs(sub) -> None:
    runs = sub.add_parser("runs", help="print the latest runs recorded for an output table")
    runs.add_argument("output", help=_OUTPUT)
    runs.add_argument("--limit", type=int, default=10)
    runs.add_argument("--runs-uri", help=_RUNS_URI)
    runs.set_defaults(handler=_runs)
    report = sub.add_parser("report", help="write a run's HTML report (summary, score histograms, sample rows)")
    report.add_argument("output", help=_OUTPUT)
    report.add_argument("--run", dest="run_id", help="run id (default: the latest run)")
    report.add_argument(
        "--out", help="where to write it, a path or object-store URI (default: vlpipe-report-<run id>.html)"
    )
    report.add_argument("--runs-uri", help=_RUNS_URI)
    report.add_argument("--samples", type=int, default=12, help="sample rows shown per side, kept and rejected")
    report.set_defaults(handler=_report)
    compact = sub.add_parser("compact", help="rewrite a partition's small data files into large ones, in one commit")
    compact.add_argument("output", help=_OUTPUT)
    compact.add_argument(
        "--run-date",
        dest="run_dates",
        action="append",
        type=_DATE,
        default=[],
        help="partition to compact (repeatable; default: every partition)",
    )
    compact.add_argument("--target-size-mb", type=int, default=256, help="size of the rewritten files")
    compact.set_defaults(handler=_compact)


def _dedup_verbs(sub) -> None:
    dedup = sub.add_parser("dedup", help="semantic dedup's k-means centroids")
    dedup_sub = dedup.add_subparsers(dest="dedup_command", required=True)
    refit = dedup_sub.add_parser("refit", help="fit new centroids on a sample of the table's kept rows and commit them")
    refit.add_argument("output", help=_OUTPUT)
    refit.add_argument("--clusters", type=int, help="number of clusters (default: one per --rows-per-cluster rows)")
    refit.add_argument("--rows-per-cluster", type=int, default=1000)
    refit.add_argument(
        "--sample-rows", type=int, default=100_000, help="kept rows to fit on (those whose key hashes lowest)"
    )
    refit.add_argument("--seed", type=int, default=0)
    refit.set_defaults(handler=_dedup_refit)


def _index_verbs(sub) -> None:
    index = sub.add_parser("index", help="build a vector index (faiss) over the kept rows' embeddings of the table")
    index.add_argument("output", help=_OUTPUT)
    index.add_argument(
        "--to",
        dest="index_uri",
        required=True,
        metavar="INDEX_URI",
        help="where the index goes: a folder or object-store prefix (replaced atomically)",
    )
    index.add_argument(
        "--run-date",
        dest="run_dates",
        action="append",
        type=_DATE,
        default=[],
        help="partition to index (repeatable; default: every partition)",
    )
    index.add_argument("--embedding", choices=["image", "text"], default="image", help="which tower's embeddings")
    index.add_argument("--version", type=int, help="table version to index (default: the latest)")
    index.add_argument("--index-key", help="a faiss index_factory key instead of the choice by size, e.g. IVF1024,Flat")
    index.add_argument(
        "--max-index-gb",
        type=float,
        default=16.0,
        help="largest index kept uncompressed; above it vectors are product-quantised (default 16)",
    )
    index.add_argument(
        "--executor",
        choices=["auto", "local", "ray"],
        default="auto",
        help="where blocks are read and encoded (auto: Ray above 200k rows)",
    )
    index.add_argument("--runs-uri", help=_RUNS_URI)
    index.set_defaults(handler=_index)


def _export_verb(sub) -> None:
    export = sub.add_parser("export", help="write one version of the table as training shards (WebDataset or Parquet)")
    export.add_argument("output", help=_OUTPUT)
    export.add_argument(
        "--to",
        dest="to_uri",
        required=True,
        metavar="URI",
        help="where the shards go: a folder or object-store prefix (replacing an export there)",
    )
    export.add_argument(
        "--format",
        choices=["webdataset", "parquet"],
        default="webdataset",
        help="tar shards as img2dataset writes them (default), or Parquet shards with the image bytes",
    )
    export.add_argument(
        "--run-date",
        dest="run_dates",
        action="append",
        type=_DATE,
        default=[],
        help="partition to export (repeatable; default: every partition)",
    )
    export.add_argument("--version", type=int, help="table version to export (default: the latest)")
    export.add_argument("--all-rows", action="store_true", help="rejected rows too (default: only keep = true)")
    export.add_argument("--samples-per-shard", type=int, default=10_000, help="rows per shard (default 10000)")
    export.add_argument(
        "--embeddings",
        action="store_true",
        help="also img_emb/, text_emb/ .npy and metadata/ Parquet per shard (clip-retrieval's layout)",
    )
    export.add_argument("--runs-uri", help=_RUNS_URI)
    export.set_defaults(handler=_export)


def _search_verb(sub) -> None:
    search = sub.add_parser("search", help="the rows of an index nearest to a text or an image")
    search.add_argument("index_uri", help="an index written by `vlpipe index`")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="a text query, embedded by the index's CLIP text tower")
    query.add_argument(
        "--image", metavar="PATH_OR_URI", help="an image query, decoded and embedded as the pipeline does"
    )
    search.add_argument("-k", type=int, default=20, help="how many hits (default 20)")
    search.add_argument("--html", metavar="OUT", help="also write the hits with thumbnails as a page (path or URI)")
    search.add_argument(
        "--model",
        help="the model to embed the query with, if not where the index says (a moved "
        "directory); it must embed as the index's model did",
    )
    search.set_defaults(handler=_search)


def _tool_verbs(sub) -> None:
    convert = sub.add_parser("convert-head", help="turn a released head (.pth state dict) into a head directory")
    convert.add_argument("src", help="the released .pth file (read with torch.load(weights_only=True))")
    convert.add_argument("out_dir", help="new directory for config.json + model.safetensors")
    convert.add_argument("--arch", required=True, choices=["aesthetic-v2", "nsfw"])
    convert.add_argument(
        "--clip-model",
        default="openai/clip-vit-large-patch14",
        help="the CLIP model the head was trained on (default: openai/clip-vit-large-patch14)",
    )
    convert.set_defaults(handler=_convert_head)
    demo = sub.add_parser("demo", help="generate sample data and tiny models, then run the demo config")
    demo.add_argument("--config", default="configs/demo.yaml")
    demo.set_defaults(handler=_demo)


def _plan(args: argparse.Namespace) -> int:
    from pipelines.run import explain

    print(explain(load_config(args.config, args.overrides)))
    return 0


def _run(args: argparse.Namespace) -> int:
    from pipelines.run import run_pipeline

    overrides = list(args.overrides)
    if args.run_date:
        overrides.append(f"run_date={args.run_date.isoformat()}")
    config = load_config(args.config, overrides)
    _ray_output(args.quiet)
    record = run_pipeline(config, fresh=args.fresh)
    print(format_summary(record, _report_of(record, config)))
    return exit_code(record)


def _nightly(args: argparse.Namespace) -> int:
    from pipelines.run import run_nightly

    overrides = list(args.overrides)
    if args.date:
        overrides.append(f"run_date={args.date.isoformat()}")
    config = load_config(args.config, overrides)
    _ray_output(args.quiet)
    plan, record = run_nightly(config, force=args.force, fresh=args.fresh)
    print(f"nightly {plan.run_date}: {plan.reason}")
    if record is not None:
        print(format_summary(record, _report_of(record, config)))
    return 0 if record is None else exit_code(record)


def _submit(args: argparse.Namespace) -> int:
    from jobs.submit import submit

    if args.force and not args.nightly:
        raise ConfigError("--force only applies with --nightly")
    return submit(
        args.config,
        address=args.address,
        nightly=args.nightly,
        run_date=args.date,
        overrides=args.overrides,
        force=args.force,
        working_dir=args.working_dir,
        wait=not args.no_wait,
    )


def _job_status(args: argparse.Namespace) -> int:
    from jobs.submit import status

    return status(args.job_id, args.address)


def _job_stop(args: argparse.Namespace) -> int:
    from jobs.submit import stop

    return stop(args.job_id, args.address)


def _runs(args: argparse.Namespace) -> int:
    from operators.storage import Location, StorageOptions
    from pipelines.execute.progress import resumable
    from pipelines.table.records import format_runs, read_run_records

    uri = args.runs_uri or default_run_records_uri(args.output)
    print(format_runs(read_run_records(uri, StorageOptions()), limit=args.limit))
    for run in resumable(Location.resolve(args.output, StorageOptions())):
        state = "stopped" if run["state"] == "stopped" else "running, or killed"
        print(
            f"resumable: run {run['run_id']} ({run['run_date']}, {run['shards']} shard(s), {state}): "
            f"{run['rows']:,} rows done; the next run of its config resumes it (--fresh starts over)"
        )
    return 0


def _compact(args: argparse.Namespace) -> int:
    from operators.storage import Location, StorageOptions
    from pipelines.table.compact import compact

    for result in compact(Location.resolve(args.output, StorageOptions()), args.run_dates, args.target_size_mb << 20):
        print(result)
    return 0


def _request(verb: str, model, **flags):
    """A command's typed request from its flags; a bad one is a ``ConfigError`` naming the flag (exit 2)."""
    from pydantic import ValidationError

    try:
        return model(**flags)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{verb} --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None


def _dedup_refit(args: argparse.Namespace) -> int:
    from operators.decisions.duplicates import SemanticConfig
    from operators.storage import Location, StorageOptions
    from pipelines.dedup.refit import refit
    from pipelines.execute.ray import RayExecutor

    config = _request(
        "dedup refit",
        SemanticConfig,
        clusters=args.clusters,
        rows_per_cluster=args.rows_per_cluster,
        sample_rows=args.sample_rows,
        seed=args.seed,
    )
    print(refit(Location.resolve(args.output, StorageOptions()), config, RayExecutor.local()))
    return 0


def _index(args: argparse.Namespace) -> int:
    from operators.storage import StorageOptions
    from pipelines.search.index import IndexRequest, build_index, summary

    request = _request(
        "index",
        IndexRequest,
        embedding=args.embedding,
        run_dates=tuple(args.run_dates),
        version=args.version,
        index_key=args.index_key,
        max_index_gb=args.max_index_gb,
        executor=args.executor,
    )
    _ray_output(args.quiet)
    print(
        summary(
            build_index(args.output, args.index_uri, request, storage=StorageOptions(), runs_uri=args.runs_uri),
            args.index_uri,
        )
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from operators.storage import StorageOptions
    from pipelines.export.export import ExportRequest, export, summary

    request = _request(
        "export",
        ExportRequest,
        format=args.format,
        run_dates=tuple(args.run_dates),
        version=args.version,
        all_rows=args.all_rows,
        samples_per_shard=args.samples_per_shard,
        embeddings=args.embeddings,
    )
    _ray_output(args.quiet)
    manifest = export(
        args.output, args.to_uri, request, storage=StorageOptions(), runs_uri=args.runs_uri, progress=not args.quiet
    )
    print(summary(manifest, args.to_uri))
    return 0


def _search(args: argparse.Namespace) -> int:
    from operators.storage import StorageOptions
    from pipelines.report.report import write_text
    from pipelines.search.page import results_page
    from pipelines.search.query import Searcher, format_results, query_image

    storage = StorageOptions()
    searcher = Searcher(args.index_uri, model=args.model, storage=storage)
    results = searcher.search(text=args.text, image=args.image, k=args.k)
    label = f"text {args.text!r}" if args.text is not None else f"image {args.image}"
    print(format_results(results, searcher.manifest, label))
    if args.html:
        image = query_image(args.image, storage)[0] if args.image else None  # shown beside the hits
        write_text(args.html, results_page(results, searcher.manifest, label, storage, image), storage)
        print(f"page: {args.html}")
    return 0


def _convert_head(args: argparse.Namespace) -> int:
    from pathlib import Path

    from operators.models.heads import HeadConversionError, convert_head

    try:
        spec = convert_head(Path(args.src), Path(args.out_dir), args.arch, args.clip_model)
    except (HeadConversionError, OSError) as err:
        raise ConfigError(str(err)) from None
    print(f"{args.out_dir}: {spec.arch} head, {spec.embedding_dim}-value embeddings, trained on {spec.clip_model}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jobs.demo.run import run_demo

    _ray_output(args.quiet)
    record = run_demo(args.config)
    print(format_summary(record, _report_of(record, load_config(args.config))))
    return 0


def _report(args: argparse.Namespace) -> int:
    from operators.storage import StorageOptions
    from pipelines.report.data import collect
    from pipelines.report.html import render
    from pipelines.report.report import write_text

    uri = args.runs_uri or default_run_records_uri(args.output)
    try:
        data = collect(uri, StorageOptions(), args.run_id, samples=args.samples)
    except LookupError as err:
        print(f"vlpipe: {err}", file=sys.stderr)
        return 1
    page, run_id = render(data), data.run["run_id"]
    out = args.out or f"vlpipe-report-{run_id}.html"
    write_text(out, page, StorageOptions())
    print(f"report of run {run_id}: {out} ({len(page.encode()) / 1024:.0f} KiB)")
    return 0


def _ray_output(quiet: bool) -> None:
    """--quiet: no Ray Data progress bars (on by default), and Ray's console lines only from warnings up."""
    if not quiet:
        return
    if "ray.data" in sys.modules:
        _quiet_ray()
    else:  # a run in this process never imports Ray (0.35 s): quieten it only if something does
        sys.meta_path.insert(0, _AfterImport("ray.data", _quiet_ray))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``then`` once the module ``name`` has been imported and run."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:
            run_module(module)
            self.then()

        spec.loader.exec_module = exec_module
        return spec


def _quiet_ray() -> None:
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):  # Ray configures these itself on import; its log files keep everything
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(max(handler.level, logging.WARNING))


def _report_of(record: RunRecord, config) -> str | None:
    from pipelines.report.report import existing_report

    if not config.report.enabled:
        return None
    try:
        return existing_report(record.output_uri, record.run_id, config.storage)
    except OSError:
        return None


def exit_code(record: RunRecord) -> int:
    """The good shards were committed, but a scheduler should still see that some were not."""
    return PARTIAL_EXIT if record.status == "partial" else 0


def format_summary(record: RunRecord, report: str | None = None) -> str:
    """The end-of-run screen: counts by outcome and how to read the output."""
    lines = [
        "",
        f"vlpipe run {record.run_id} ({record.status}) in {record.duration_s:.1f}s",
        f"  rows in      {record.rows_in:>8}",
        f"  kept         {record.rows_kept:>8}",
        f"  rejected     {record.rows_rejected:>8}",
    ]
    for reason, count in sorted(record.rejected_by_reason.items(), key=lambda kv: -kv[1]):
        lines.append(f"    {reason:<18}{count:>6}")
    if record.failed_shards:
        lines.append(f"  failed shards {len(record.failed_shards):>7}  (not committed; the next nightly retries them)")
        lines += [f"    {shard['uri']}: {shard['error']}" for shard in record.failed_shards[:10]]
        if len(record.failed_shards) > 10:
            lines.append(f"    ... and {len(record.failed_shards) - 10} more in `vlpipe runs` / the run record")
    if record.rows_superseded:
        lines.append(
            f"  superseded   {record.rows_superseded:>8}  (earlier rows of these shards, removed from other dates)"
        )
    if record.rows_resumed:
        lines.append(f"  resumed      {record.rows_resumed:>8}  (staged by the attempt this run took over)")
    lines += [f"  served       {describe_account(section, line)}" for section, line in record.endpoints.items()]
    lines += [
        f"  output       {record.output_uri} "
        f"(Delta version {record.table_version}, partition run_date={record.run_date})",
        *([f"  report       {report}"] if report else []),
        "",
        "Read it:",
        f'  pandas: import deltalake; df = deltalake.DeltaTable("{record.output_uri}").to_pandas()',
        f'  duckdb: import duckdb, deltalake; t = deltalake.DeltaTable("{record.output_uri}").to_pyarrow_dataset(); '
        'duckdb.sql("SELECT reject_reason, count(*) FROM t GROUP BY ALL").show()',
    ]
    return "\n".join(lines)


def entry() -> None:
    """The ``vlpipe`` console script: ``main``, then an exit that skips tearing torch down."""
    code = main()
    logs.close()  # vlpipe's last line is out: libraries' atexit handlers (torch, Ray) print nothing after it
    if "torch" in sys.modules and "ray" not in sys.modules:
        # Everything is written and committed by now, and libtorch's teardown at exit (static
        # destructors, thread pools) took 0.65 s of a 5 s small run. A run on a local Ray
        # exits normally: Ray stops the cluster it started at exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
