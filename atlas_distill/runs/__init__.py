"""A run's directory and records: `layout` (RunDir: the paths, checks, checkpoints and resume of one run),
`summary` (the typed records a run writes: Figures, BaselineSummary, RunSummary), `tracking` (metrics.jsonl and
W&B while it trains) and `read` (finished runs and chains read back for `compare`)."""
