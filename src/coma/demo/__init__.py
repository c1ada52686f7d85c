"""``coma demo``: the embedded default (:mod:`coma.demo.run`), what each stage stores
(:mod:`coma.demo.diagnostics`) and the data-efficiency study (:mod:`coma.demo.study`)."""

from coma.demo.run import (
    ARM_LABELS,
    ARMS,
    COLUMNS,
    META_TASKS,
    DemoConfig,
    Phases,
    load_report,
    quick_config,
    run_demo,
    stage0,
)

__all__ = [
    "ARMS",
    "ARM_LABELS",
    "COLUMNS",
    "META_TASKS",
    "DemoConfig",
    "Phases",
    "load_report",
    "quick_config",
    "run_demo",
    "stage0",
]
