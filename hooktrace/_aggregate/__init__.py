"""The worker side: turns recorded steps into aggregates, snapshots and exporter calls."""
