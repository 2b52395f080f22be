"""Sweeps: collect a Hydra multirun's per-job results into one summary, compare models, report, estimate.

A multirun directory holds one subdirectory per job, each with Hydra's `.hydra/` record and the runner's
`results.csv`. Aggregation only reads those files, so it works the same after the local launcher, after
SLURM (the submitting process waits for the array), and by hand after a sweep that failed half-way:

    python -m pipeline.sweep outputs/multirun/full_sweep/2026-01-01_12-00-00     # summary + report
    python -m pipeline.sweep --estimate                                           # disk / GPU-time table
    python -m pipeline.sweep.report <sweep dir> --wandb online                    # rebuild the report only

  collect.py    find the job directories, concatenate their results: summary.csv/.parquet, jobs.csv
  compare.py    the key numbers side by side, one column per variant (printed after every sweep)
  panels.py     the report's four panels: tables from the summary, each naming its `analysis` figure
  report.py     report.md/.html from the panels, figures drawn by `analysis.plots`
  wandb_report.py  the same report on W&B: one run per variant and a wandb-workspaces Report
  callback.py   `summarize` (the three above) and the Hydra callback that runs it when a multirun ends
  estimate.py   disk and GPU-hour estimates of the full sweep, before running it
"""
