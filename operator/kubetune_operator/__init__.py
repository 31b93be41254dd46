"""The kubetune operator: runs FineTuneJobs as gangs of torchrun pods (docs/operator.md)."""
