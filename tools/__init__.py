"""Generators that write repository files from the code: the config reference and the Helm values schema."""
