"""A tiny Mllama guard checkpoint the project builds itself, offline, for tests and the demo.

``build`` makes the checkpoint (tokenizer, image processor, model) and caches it by recipe hash,
``synthetic`` generates labelled conversations for a toy policy, ``train`` teaches the model that policy.
"""
