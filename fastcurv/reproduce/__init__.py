"""``fastcurv reproduce PAPER``: each paper's headline experiment on real offline data, the paper's
numbers beside ours, and a verdict per claim (see ``docs/reproduce/README.md``).

One module per paper (:mod:`.geng`, :mod:`.jia_su`, :mod:`.fisher`, :mod:`.jarvis`), each with a
``BUDGETS`` table and ``run(session, overrides=None)``; shared statistics in :mod:`.verdict`, shared
I/O and plots in :mod:`.common`, the subcommand in :mod:`.cli`.
"""
PAPERS = ("geng", "jia-su", "fisher", "jarvis")
