"""CL / TS / TF scenarios are plans of stages in the job config (see configs/*ts*.yaml etc.):

- TS: train k blocks for part of the budget (or to a validation plateau), grow, continue.
- CL: train on slice-1, then grow and fine-tune as each cumulative slice arrives (stage data_path).
- TF: pre-train with stacking on the source dataset, new_head for the target, fine-tune on it.
- baseline: the same final depth from scratch is a plan with one train stage.

Modules: ``plan.py`` (``run_plan``: a plan through the growth coordinator, one Ray session for all
its segments, test metrics, ``<run_dir>/summary.json``), ``report.py`` (``stackrec report``: tables
and curves from summaries), ``quickstart.py`` (the README's first command).
"""
