"""IDX files, download sources, splits, incoming batches and their intake, image framing; never imports a stage."""
