"""Training and evaluation: the loop (:mod:`~gopt_adapter.train.engine`), the losses and
metrics, and the recipe behind ``gopt train`` (:mod:`~gopt_adapter.train.run_config`: settings
into a checked :class:`~gopt_adapter.train.run_config.RunConfig`; :mod:`~gopt_adapter.train.run`:
one run from it).

Imports the core, the baselines and the data layer; the CLI and the benchmarks import it.
"""
