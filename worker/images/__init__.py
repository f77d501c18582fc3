"""Images of chat events: data URLs and guarded URL fetches to bytes, bytes to safe RGB pictures.

``load`` is the stage's entry point; ``ssrf`` decides which addresses may be contacted, ``fetch``
downloads under limits, ``data_url`` decodes ``data:`` URLs and ``decode`` turns bytes into an upright
RGB image under pixel limits. Every failure raises ``worker.contracts.dead_letters.RejectedError`` with a
specific ``Reason``.
"""

from worker.images.load import decode_image, image_bytes, image_content_hash

__all__ = ["decode_image", "image_bytes", "image_content_hash"]
