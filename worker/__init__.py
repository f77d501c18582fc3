"""moderation-worker: streaming content moderation with Llama Guard 3 Vision."""

__version__ = "0.1.0"
