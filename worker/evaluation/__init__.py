"""Evaluation harness: the model card's Table 1 and Table 2 on an operator's own labelled data."""
