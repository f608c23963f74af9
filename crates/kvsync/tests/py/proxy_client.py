"""The official `openai` client through kvsync's proxy (run by tests/proxy.rs).

Usage: proxy_client.py BASE_URL MODEL BLOCK_SIZE CONVERSATIONS. Exits non-zero on the first
failed check; prints one line per check and, last, `requests N` (the requests it sent).
"""
import sys

import openai

base_url, model, block_size, conversations = (
    sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
sent = 0


def pod_of(raw):
    pod = raw.headers.get("x-kvsync-pod")
    assert pod and pod.startswith("sim/"), raw.headers
    return pod


# /v1/models in OpenAI's list shape.
ids = [m.id for m in client.models.list().data]
assert ids == [model], ids
print("models: ok")

# Chat, not streamed: the answer and the pod that gave it.
raw = client.chat.completions.with_raw_response.create(
    model=model, messages=[{"role": "user", "content": "hello there"}], max_tokens=5)
sent += 1
pod_of(raw)
chat = raw.parse()
assert chat.object == "chat.completion", chat
assert chat.choices[0].finish_reason == "length"
assert chat.usage.completion_tokens == 5, chat.usage
print("chat: ok")

# Chat, streamed with the usage chunk.
raw = client.chat.completions.with_raw_response.create(
    model=model, messages=[{"role": "user", "content": "stream this please"}], max_tokens=6,
    stream=True, stream_options={"include_usage": True})
sent += 1
pod_of(raw)
assert raw.headers.get("content-type", "").startswith("text/event-stream"), raw.headers
chunks = list(raw.parse())
content = [c for c in chunks if c.choices and c.choices[0].delta.content]
assert len(content) == 6, chunks
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6, chunks[-1]
print("chat stream: ok")

# Completions, both ways; a prompt of token ids too.
raw = client.completions.with_raw_response.create(model=model, prompt="one two three", max_tokens=4)
sent += 1
pod_of(raw)
assert len(raw.parse().choices[0].text.split()) == 4
chunks = list(client.completions.create(model=model, prompt="four five six", max_tokens=3,
                                        stream=True))
sent += 1
assert len(chunks) == 3 and all(c.choices for c in chunks), chunks
ids = client.completions.create(model=model, prompt=[1, 2000, 3000], max_tokens=2)
sent += 1
assert ids.usage.prompt_tokens == 3, ids.usage
print("completions: ok")

# The engine's own errors pass through (status and vLLM's body).
try:
    client.completions.create(model=model, prompt="x", max_tokens=-1)
    raise AssertionError("max_tokens=-1 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "max_tokens" in str(e.message), e
sent += 1
print("engine error passed through: ok")

# No eligible pod for a model: 404 in OpenAI's shape.
try:
    client.chat.completions.create(model="no-such-model",
                                   messages=[{"role": "user", "content": "x"}], max_tokens=1)
    raise AssertionError("an unknown model was answered")
except openai.NotFoundError as e:
    assert e.status_code == 404 and "no-such-model" in e.message, e
print("unknown model: ok")

# Conversations: each next turn lands on the pod holding its earlier turns, which the engine
# reports as cached.
system = " ".join(f"rule{i}" for i in range(60))
for c in range(conversations):
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": " ".join(f"c{c}q{i}" for i in range(40))}]
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=20)
    sent += 1
    first_pod, first = pod_of(raw), raw.parse()
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": f"and then c{c}"}]
    # Streamed this time, reading the usage chunk.
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=messages, max_tokens=4, stream=True,
        stream_options={"include_usage": True})
    sent += 1
    second_pod = pod_of(raw)
    usage = list(raw.parse())[-1].usage
    cached = usage.prompt_tokens_details.cached_tokens
    # The first turn's prompt (and most of its answer) is a prefix of the second's.
    want = first.usage.prompt_tokens // block_size * block_size
    assert second_pod == first_pod, (c, first_pod, second_pod)
    assert cached >= want, (c, cached, want, usage)
print(f"conversations: ok ({conversations})")
print(f"requests {sent}")
