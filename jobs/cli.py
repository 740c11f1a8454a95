"""The ``vlpipe`` command line."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys

from pipelines.config import ConfigError, load_config
from pipelines.runs import RunRecord

log = logging.getLogger("vlpipe")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlpipe`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"vlpipe: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlpipe", description=__doc__)
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline config once and commit its output")
    run.add_argument("config", help="YAML config file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set filter.min_clip_score=0.25")
    run.add_argument("--run-date", type=dt.date.fromisoformat, help="partition date (default: today, UTC)")
    run.set_defaults(handler=_run)

    nightly = sub.add_parser("nightly", help="process only new or changed shards into a date's partition")
    nightly.add_argument("config", help="YAML config file")
    nightly.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    nightly.add_argument("--date", type=dt.date.fromisoformat, help="partition date (default: today, UTC)")
    nightly.add_argument("--force", action="store_true", help="recompute the date even if it is up to date")
    nightly.set_defaults(handler=_nightly)

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

    for name, handler, text in (("status", _job_status, "show a submitted job's status"),
                                ("stop", _job_stop, "stop a submitted job")):
        job = sub.add_parser(name, help=text)
        job.add_argument("job_id")
        job.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS)")
        job.set_defaults(handler=handler)

    runs = sub.add_parser("runs", help="print the latest runs recorded for an output table")
    runs.add_argument("output", help="the output table URI (output.uri of the config)")
    runs.add_argument("--limit", type=int, default=10)
    runs.add_argument("--runs-uri", help="run-record table, if not the default <output>/_vlpipe_runs")
    runs.set_defaults(handler=_runs)

    demo = sub.add_parser("demo", help="generate sample data and tiny models, then run the demo config")
    demo.add_argument("--config", default="configs/demo.yaml")
    demo.set_defaults(handler=_demo)
    return parser


def _run(args: argparse.Namespace) -> int:
    from pipelines.run import run_pipeline

    overrides = list(args.overrides)
    if args.run_date:
        overrides.append(f"run_date={args.run_date.isoformat()}")
    config = load_config(args.config, overrides)
    record = run_pipeline(config)
    print(format_summary(record))
    return 0


def _nightly(args: argparse.Namespace) -> int:
    from pipelines.run import run_nightly

    overrides = list(args.overrides)
    if args.date:
        overrides.append(f"run_date={args.date.isoformat()}")
    plan, record = run_nightly(load_config(args.config, overrides), force=args.force)
    print(f"nightly {plan.run_date}: {plan.reason}")
    if record is not None:
        print(format_summary(record))
    return 0


def _submit(args: argparse.Namespace) -> int:
    from jobs.submit import submit

    if args.force and not args.nightly:
        raise ConfigError("--force only applies with --nightly")
    return submit(args.config, address=args.address, nightly=args.nightly, run_date=args.date,
                  overrides=args.overrides, force=args.force, working_dir=args.working_dir, wait=not args.no_wait)


def _job_status(args: argparse.Namespace) -> int:
    from jobs.submit import status

    return status(args.job_id, args.address)


def _job_stop(args: argparse.Namespace) -> int:
    from jobs.submit import stop

    return stop(args.job_id, args.address)


def _runs(args: argparse.Namespace) -> int:
    from operators.storage import StorageOptions
    from pipelines.runs import format_runs, read_run_records

    uri = args.runs_uri or args.output.rstrip("/") + "/_vlpipe_runs"
    print(format_runs(read_run_records(uri, StorageOptions()), limit=args.limit))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    record = run_demo(args.config)
    print(format_summary(record))
    return 0


def format_summary(record: RunRecord) -> str:
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
    lines += [
        f"  output       {record.output_uri} (Delta version {record.table_version}, partition run_date={record.run_date})",
        "",
        "Read it:",
        f'  pandas: import deltalake; df = deltalake.DeltaTable("{record.output_uri}").to_pandas()',
        f'  duckdb: import duckdb, deltalake; t = deltalake.DeltaTable("{record.output_uri}").to_pyarrow_dataset(); '
        'duckdb.sql("SELECT reject_reason, count(*) FROM t GROUP BY ALL").show()',
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
