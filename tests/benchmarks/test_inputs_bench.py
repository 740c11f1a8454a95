"""The input readers' benchmark reads every row through each reader and prints the ratios it measured."""

from __future__ import annotations

from benchmarks.inputs import format_inputs, inputs


def test_the_inputs_benchmark_reads_every_row_with_each_reader(tmp_path):
    result = inputs(tmp_path, rows=60, rows_per_shard=25)
    for name in ("parquet", "vlpipe_tar", "webdataset_lib"):
        assert result[name]["rows_per_s_per_core"] > 0
    assert result["vlpipe_tar"]["vs_parquet"] > 0 and result["bytes"]["tar"] > 0
    printed = "\n".join(format_inputs(result))
    assert "vlpipe_tar" in printed and "x Parquet" in printed
