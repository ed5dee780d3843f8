"""The plain chat template."""

from near_jax.serve import chat


def test_messages_render_in_order_and_end_where_the_reply_starts():
    prompt = chat.render(
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]
    )
    assert prompt == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nUser: Bye\n\nAssistant:"
    )
    # The stop string is exactly how the next user turn would start.
    assert chat.render([("user", "x")]).startswith(chat.TURN_STOP.lstrip("\n"))
    assert (chat.render([("assistant", "a")]) + " b" + chat.TURN_STOP).count("User:") == 1
