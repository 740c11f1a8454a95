"""Throughput harness: vlpipe against the bare model loop and a naive transformers loop, in one run."""
