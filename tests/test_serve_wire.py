"""Request bodies: every field checked, each refusal one line naming the field."""

import json

import pytest

from near_jax.serve import wire


def _body(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_a_full_completion_body_is_parsed():
    parsed = wire.parse_completion(
        _body(
            model="m",
            prompt=["a", "b"],
            max_tokens=7,
            temperature=0.5,
            top_p=0.9,
            top_k=40,
            stop="\n",
            seed=3,
            stream=True,
            n=1,
            user="u",
            logprobs=None,
            presence_penalty=0,
        )
    )
    assert parsed.prompts == ("a", "b")
    o = parsed.options
    assert (o.max_tokens, o.temperature, o.top_p, o.top_k) == (7, 0.5, 0.9, 40)
    assert (o.stop, o.seed, o.stream, o.model) == (("\n",), 3, True, "m")


def test_defaults_are_openais():
    o = wire.parse_completion(_body(prompt="x")).options
    assert (o.max_tokens, o.temperature, o.top_p, o.top_k, o.stop, o.seed, o.stream) == (
        None,
        1.0,
        1.0,
        0,
        (),
        None,
        False,
    )


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1]", "must be a JSON object, got list"),
        (_body(), "prompt is required"),
        (_body(prompt=[]), "non-empty list"),
        (_body(prompt=[1, 2]), "token ids are not taken"),
        (_body(prompt="x", max_tokens=0), "max_tokens=0 is not allowed"),
        (_body(prompt="x", max_tokens=1.5), "max_tokens must be an integer"),
        (_body(prompt="x", max_tokens=True), "max_tokens must be an integer"),
        (_body(prompt="x", temperature=-1), "temperature=-1 is not allowed"),
        (_body(prompt="x", temperature="hot"), "temperature must be a number"),
        (_body(prompt="x", top_p=0), "top_p=0 is not allowed"),
        (_body(prompt="x", top_p=1.5), "top_p=1.5 is not allowed"),
        (_body(prompt="x", top_k=-2), "top_k=-2 is not allowed"),
        (_body(prompt="x", stop=["a"] * 5), "at most 4"),
        (_body(prompt="x", stop=[""]), "1 to 256 characters"),
        (_body(prompt="x", stop=3), "stop must be a string or a list"),
        (_body(prompt="x", seed=-1), "seed=-1 is not allowed"),
        (_body(prompt="x", stream="yes"), "stream must be true or false"),
        (_body(prompt="x", n=2), "n=2 is not supported: only 1"),
        (_body(prompt="x", logprobs=5), "logprobs=5 is not supported"),
        (_body(prompt="x", echo=True), "echo=true is not supported"),
        (_body(prompt="x", wat=1), "unknown field 'wat'"),
        (_body(prompt="x", model=3), "model must be a string"),
    ],
)
def test_bad_completion_bodies_are_refused_in_one_line(raw, message):
    with pytest.raises(wire.BadRequest, match=None) as e:
        wire.parse_completion(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_chat_bodies():
    parsed = wire.parse_chat(
        _body(
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            max_completion_tokens=4,
        )
    )
    assert parsed.messages == (("system", "be brief"), ("user", "hi"))
    assert parsed.options.max_tokens == 4
    for body, message in [
        (_body(), "messages is required"),
        (_body(messages=[]), "messages is required"),
        (_body(messages=["hi"]), "messages[0] must be an object"),
        (_body(messages=[{"role": "tool", "content": "x"}]), 'messages[0].role="tool"'),
        (_body(messages=[{"role": "user", "content": 3}]), "messages[0].content must be"),
        (
            _body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "only text parts",
        ),
        (_body(messages=[{"role": "user", "content": "x"}], prompt="p"), "unknown field"),
    ]:
        with pytest.raises(wire.BadRequest) as e:
            wire.parse_chat(body)
        assert message in str(e.value), (body, str(e.value))


def test_replies_have_openais_shape():
    used = wire.usage(3, 4)
    assert used == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    reply = wire.completion("cmpl-1", "m", 5, ["a", "b"], ["stop", "length"], used)
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert reply["choices"][1]["finish_reason"] == "length" and reply["usage"] == used
    event = wire.sse(wire.chat_chunk("c", "m", 5, {"content": "é"}, None))
    assert event.startswith(b"data: {") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["choices"][0]["delta"] == {"content": "é"}
    err = wire.error("bad", "invalid_request", 400, "prompt")["error"]
    assert err == {"message": "bad", "type": "invalid_request", "param": "prompt", "code": 400}
