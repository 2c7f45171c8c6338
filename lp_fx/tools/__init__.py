"""The tools around the pass, one folder per thing a user does: ``evaluation`` (perplexity, lm-eval
tasks, sweeps), ``planning`` (choose pairs), ``training`` (fine-tune a pairing), ``speed`` (time
it), ``export`` (a plain checkpoint), ``frontier`` (speed against quality per budget) and ``cli``
(the ``lp-fx`` commands), over the shared leaves ``models``, ``data``, ``options`` and ``console``.
Imports go one way, cli → capabilities → leaves → the pass (``lp_fx``), which never imports them."""
