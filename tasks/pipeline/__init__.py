"""The stage graph (contracts, keys, running a stage through the store): the only importer of stage modules."""
