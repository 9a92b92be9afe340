"""Champion registry, run log, promotion and the run report; imports data, ml, store and the pipeline, never a study."""
