"""Typed chat events: what a decoded, validated, normalized input record looks like.

Decoding bytes into these types lives in ``worker.contracts.decode``; this module only defines them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

Role = Literal["user", "assistant"]


class Task(StrEnum):
    """What the model judges: the last user turn (prompt) or the agent's reply (response)."""

    PROMPT = "prompt"
    RESPONSE = "response"


@dataclass(frozen=True, slots=True)
class ImageRef:
    """The one image of a conversation, as given: a ``data:`` URL or an ``http(s)`` URL."""

    url: str
    turn_index: int  # index into ChatEvent.turns
    # The bytes of a data: URL, when decoding the record already base64-decoded them (saves a second pass).
    data: bytes | None = field(default=None, compare=False, repr=False)
    # Where the URL sits in the event (``messages[0].content[1].image_url.url``): named by image rejections.
    field_path: str | None = field(default=None, compare=False)

    @property
    def is_data_url(self) -> bool:
        return self.url[:5].lower() == "data:"


@dataclass(frozen=True, slots=True)
class Turn:
    """One turn of the model's conversation format: a role and its text parts, in order."""

    role: Role
    texts: tuple[str, ...]


# Not frozen, but never changed once built: the hit path builds one per record, and a frozen dataclass's __init__
# (one object.__setattr__ per field) cost ~3 µs more per event there. The same holds for the routing and keying
# records built from it (``Routed``, ``Keyed``, ``SourceCoordinates``).
@dataclass(slots=True)
class ChatEvent:
    """A normalized chat event: alternating user/assistant turns starting with user.

    ``images`` holds every image the judging model reads, in conversation order: at most one unless the
    event's route has a several-image model (Llama Guard 4). ``image`` is the last of them (what a one-image
    model reads).
    """

    event_id: str
    conversation_id: str
    turns: tuple[Turn, ...]
    image: ImageRef | None = None
    created_at: str | None = None
    tenant: str | None = None
    policy: str | None = None
    # What normalization did, so nothing happens silently (reported by check-event and in logs).
    dropped_messages: int = 0  # system/tool/developer messages left out of the model's conversation
    merged_messages: int = 0  # consecutive same-role messages merged into one turn
    dropped_images: int = 0  # older images dropped under limits.multiple_images = keep_last
    extra: dict[str, object] = field(default_factory=dict, compare=False)
    images: tuple[ImageRef, ...] = ()

    def __post_init__(self) -> None:
        # Callers that build an event with ``image=`` alone (tests, HTTP, eval) get ``images`` filled in.
        if self.image is not None and not self.images:
            self.images = (self.image,)

    @property
    def image_count(self) -> int:
        """How many images the judging model reads (what routing decides on)."""
        return len(self.images)

    @property
    def task(self) -> Task:
        """The last turn decides: user -> prompt classification, assistant -> response classification."""
        return _PROMPT if self.turns[-1].role == "user" else _RESPONSE


_PROMPT, _RESPONSE = Task.PROMPT, Task.RESPONSE  # read per event: a member lookup on the enum costs ~0.4 µs
