"""One module per pipeline stage with its contract; they use ml, data and store; only the pipeline imports them."""
