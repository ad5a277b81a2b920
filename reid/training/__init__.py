"""Making models: the training configuration (`config`), datasets, identity splits and the
PK sampler (`data`), the metric-learning losses (`losses`), the trainable models built from a
config (`models`) and the `reid-train` engine and command (`train`). A trained ensemble is
written as a `reid-ensemble/1` checkpoint that the stream loads as is; nothing the stream runs
imports this package.
"""
