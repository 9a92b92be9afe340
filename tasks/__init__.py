"""The stages of the pipeline and their plumbing as plain Python: no Prefect here, so each is testable alone."""
