"""The label-efficiency study, its cells and its report; imports ml, data, store and the pipeline's contract."""
