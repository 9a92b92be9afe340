"""IDX, download sources, splits, checks, incoming batches, their intake, image framing; imports config, store."""
