"""Jobs: one module per task (``datamatters.tasks.<cfg.task.name>``) with ``run(cfg) -> dict``.

Only this package and the entry points know Hydra; engines take plain objects.
"""
