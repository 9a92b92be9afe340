"""Champion registry, run log, promotion and the run report; imports data, ml and store, never a stage."""
