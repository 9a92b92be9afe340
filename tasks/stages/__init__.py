"""One module per stage with its contract, plus `files`, every artifact file name; they use ml, data and store."""
