"""The runnable toy experiments, one module each, each a script with ``make_parser()`` and ``main()``.

Each imports the toy world (``toy``), ``probes`` and ``plumbing`` -- never another experiment -- so a new
experiment is one new module here: ``pretrain`` (train a toy model), ``pipeline`` (the main job: train and
probe for the belief geometry), ``factored``, ``factor_steering``, ``toy_em``, ``rl`` (GRPO and the composition
report, one seed or several) and ``rl_objectives``. An experiment too long for one module keeps its parts beside
it under its own name (``em_chain_grid`` and ``em_chain_report``, ``pipeline_report``, ``rl_report``): the only
experiment modules it imports.
"""
