"""Stage `report`: tables, statistics and figures from what the other stages wrote.

Reads (JSON/TSV only, never Markdown; pipeline/metrics.py is the contract; the paths come
from the writers' own params sections, stages/report/config.py):
  <train.metrics_dir>/<run>/<seed>.json + _details.json, _curve.tsv, _diagnostics.tsv for every
  run of `runs` and seed of `seeds`; <run>_samples.json, <run>_attention.json
  <ablation.metrics_dir>/<variant>-<seed>.json + _details.json (the grid: `ablation.variants`
  x `seeds`, parsed by stages/ablate.py)
  <data.metrics_file>, <tokenizer.metrics_file>, <tokenizer.tokens_dir>/meta.json,
  <data.raw_dir>/<data.source>/manifest.json (hashed for provenance when present), params.yaml
Writes (under `report.out_dir`, default `reports/`):
  results.parquet, results.csv   one row per run (pretrain runs and ablation items), every metric
  report.md                      figures linked as figures/<name>.png
  report.html                    self-contained: CSS inline, figures embedded as data URIs
  figures/*.png
Run:
  python -m stages.report          (from the repository root; `dvc repro report` does this)

The params it reads are checked first; every input is read and validated before
anything is written; a missing or malformed file stops the stage with a message
naming the file; the figures are drawn into a folder that replaces figures/ whole
and the files are written atomically only once everything is built.

The package: config.py (the `report` section, the input paths), inputs.py (reading
and validation, the results table), stats.py (intervals, Welch differences,
verdicts; pure), document.py (the blocks of the report), figures.py, render.py
(Markdown and HTML), stage.py (prepare, write, log; `main`).

Statistics: mean ± t-interval over seeds per run and variant; the headline's 2x2
contrasts (kernel effect baseline -> bp_gaussian, algorithm effect bp_gaussian ->
pcgpt, ...) and each variant's difference to the run it is compared with (the
reference `report.pcgpt_run`, or its `versus`) with a Welch interval; a verdict only
claims what its interval supports. Equivalence checks pass when every seed equals its
twin.

This file imports nothing: `python -m pipeline.params check` reads config.py alone.
"""
