"""Evaluators named in ``config.evals`` (big_vision style): ``{name: {type: ..., ...}}``.

``evaluators.common.from_config`` builds one evaluator per entry from the entry and what the trainer
hands over by name — the model's predict functions, the data it reads, the workdir and the mesh — and
``Evaluators.run(variables, step)`` runs them all. Types: ``classification``, ``zero_shot``,
``transfer``; each also runs standalone on restored weights.
"""
