"""Environment variables the trainer's processes pass to each other (no imports: the launcher
reads these names before torch is imported, and the console and recipe read them back)."""

PROGRESS_ENV = "KUBETUNE_PROGRESS"  # auto | bar | lines | none (console.py)
SUMMARY_ENV = "KUBETUNE_SUMMARY"  # text | json | none (console.py)
METRICS_PORT_ENV = "KUBETUNE_METRICS_PORT"  # local multi-node runs only: ports must differ
