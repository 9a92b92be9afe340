"""Networks, training loop, input pipeline, statistics, inference; imports config and store, never a stage."""
