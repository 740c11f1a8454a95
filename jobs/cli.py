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
