"""FlowIE Serve application layer: HTTP API, queue, workers, metrics and the `flowie` CLI."""
