"""The official `openai` client against the simulator's HTTP API (run by tests/http_api.rs).

Usage: openai_client.py BASE_URL MODEL BLOCK_SIZE. Exits non-zero on the first failed check.
"""
import sys

import openai

base_url, model, block_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def full_blocks(prompt_tokens):
    # vLLM never serves the last prompt token from the cache.
    return (prompt_tokens - 1) // block_size * block_size


# Completions, not streamed: twice the same prompt; the second finds its full blocks cached.
prompt = " ".join(f"w{i}" for i in range(40))
first = client.completions.create(model=model, prompt=prompt, max_tokens=7)
assert first.object == "text_completion", first
assert first.id.startswith("cmpl-"), first.id
assert first.model == model
choice = first.choices[0]
assert choice.finish_reason == "length", choice
assert len(choice.text.split()) == 7, choice.text
assert first.usage.prompt_tokens == 41, first.usage  # BOS + 40 words
assert first.usage.completion_tokens == 7
assert first.usage.total_tokens == 48
assert first.usage.prompt_tokens_details.cached_tokens == 0, first.usage
second = client.completions.create(model=model, prompt=prompt, max_tokens=7)
assert second.choices[0].text == choice.text, "generation depends on the prompt only"
assert second.usage.prompt_tokens_details.cached_tokens == full_blocks(41), second.usage
print("completions: ok")

# Completions, streamed with the usage chunk.
chunks = list(
    client.completions.create(
        model=model, prompt=prompt, max_tokens=7, stream=True,
        stream_options={"include_usage": True},
    )
)
text_chunks = [c for c in chunks if c.choices]
assert len(text_chunks) == 7, chunks
assert "".join(c.choices[0].text for c in text_chunks) == choice.text
assert [c.choices[0].finish_reason for c in text_chunks] == [None] * 6 + ["length"]
assert all(c.usage is None for c in text_chunks)
last = chunks[-1]
assert last.choices == [] and last.usage is not None, last
assert last.usage.completion_tokens == 7
assert last.usage.prompt_tokens_details.cached_tokens == full_blocks(41), last.usage
# Without include_usage there is no usage chunk.
plain = list(client.completions.create(model=model, prompt=prompt, max_tokens=3, stream=True))
assert all(c.choices for c in plain) and len(plain) == 3, plain
print("completions stream: ok")

# A prompt of token ids.
ids = client.completions.create(model=model, prompt=[1, 2000, 3000, 4000], max_tokens=2)
assert ids.usage.prompt_tokens == 4 and len(ids.choices[0].text.split()) == 2, ids
print("token-id prompt: ok")

# Chat, not streamed, then streamed: same text, the role on the first chunk, usage last.
messages = [
    {"role": "system", "content": "you are terse " * 10},
    {"role": "user", "content": "tell me about prefix caching " * 5},
]
reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-"), reply
msg = reply.choices[0].message
assert msg.role == "assistant" and len(msg.content.split()) == 12, msg
assert reply.choices[0].finish_reason == "length"
chat_prompt = reply.usage.prompt_tokens
assert chat_prompt == 1 + 30 + 1 + 1 + 25 + 1 + 1, reply.usage  # roles, words, ends, gen prompt
stream = list(
    client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, stream=True,
        stream_options={"include_usage": True},
    )
)
deltas = [c for c in stream if c.choices]
assert deltas[0].object == "chat.completion.chunk"
# vLLM's first chunk: the role with empty content; then one chunk per token.
assert deltas[0].choices[0].delta.role == "assistant", deltas[0]
assert deltas[0].choices[0].delta.content == "", deltas[0]
assert len(deltas) == 1 + 12, deltas
assert all(c.choices[0].delta.role is None for c in deltas[1:])
assert "".join(c.choices[0].delta.content or "" for c in deltas) == msg.content
assert deltas[-1].choices[0].finish_reason == "length"
usage = stream[-1].usage
assert stream[-1].choices == [] and usage.completion_tokens == 12, stream[-1]
assert usage.prompt_tokens_details.cached_tokens == full_blocks(chat_prompt), usage
print("chat: ok")

# The next turn carries the reply as history: its prompt's blocks up to the reply are cached.
turn2 = messages + [
    {"role": "assistant", "content": msg.content},
    {"role": "user", "content": "and then?"},
]
again = client.chat.completions.create(model=model, messages=turn2, max_tokens=2)
# The reply re-tokenizes to the generated ids, so the first turn's prompt and reply (whose full
# blocks the engine cached as they filled) prefix the second turn's prompt.
assert again.usage.prompt_tokens_details.cached_tokens == (chat_prompt + 12) // block_size * block_size, again.usage
print("multi-turn: ok")

# Models.
models = client.models.list().data
assert models[0].id == model and models[0].owned_by == "vllm", models
card = models[0].model_dump()
assert card["max_model_len"] > 0 and card["root"] and card["permission"], card
print("models: ok")

# Errors as the client raises them.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    raise AssertionError("an unknown model must fail")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "no-such-model" in e.message, e
try:
    client.completions.create(model=model, prompt="x", max_tokens=10**6)
    raise AssertionError("max_tokens over the context must fail")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "maximum context length" in e.message, e
print("errors: ok")
