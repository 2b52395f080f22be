"""Running stages: the runner, the content-addressed store, tracking, results, sweeps, reports."""
