"""Networks, training loop, input pipeline, statistics, inference; imports config, data, store, never a stage."""
