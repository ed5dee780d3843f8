"""The chat template: how a list of messages becomes one prompt.

near_jax's tokenizers carry no chat template, so chat uses one plain, documented format:

    System: {system content}\\n\\n          (each message, in order)
    User: {user content}\\n\\n
    Assistant: {assistant content}\\n\\n
    Assistant:                              (the reply starts after this, with its space)

Roles are capitalized and followed by ": "; messages are separated by a blank line. The
reply ends at the model's EOS or where it starts a new user turn: "\\n\\nUser:" is always a
stop string of chat requests (on top of the request's own), so a base model that continues
the dialogue does not answer for the user.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_STOP = "\n\nUser:"


def render(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt text of `messages` ((role, content) pairs), ending where the reply starts."""
    turns = [f"{ROLE_NAMES[role]}: {content}\n\n" for role, content in messages]
    return "".join(turns) + "Assistant:"
