"""The tools around the pass: data, model loading, evaluation, sweep, planner, fine-tuning and its
checkpoints, bench, and the ``lp-fx`` command line. They use the pass (``lp_fx``); the pass never
imports them, so compiling a model loads none of them, transformers or torchao."""
