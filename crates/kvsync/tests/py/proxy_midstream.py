"""An engine dying mid-stream, seen by the official `openai` client (run by tests/proxy.rs).

Usage: proxy_midstream.py BASE_URL MODEL POD. Streams a chat completion, checks kvsync chose POD,
reads the first content chunk, prints `READY` (the test then kills the engine), and expects the
stream to end with the SDK raising the error event kvsync sends (not a hang, not a clean end).
"""
import sys

import openai

base_url, model, pod = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
raw = client.chat.completions.with_raw_response.create(
    model=model, messages=[{"role": "user", "content": "tell me a long story"}], max_tokens=50,
    stream=True)
assert raw.headers.get("x-kvsync-pod") == pod, raw.headers
stream = raw.parse()
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        break
print("READY", flush=True)
try:
    for chunk in stream:
        pass
    raise AssertionError("the stream ended cleanly after the engine died")
except openai.APIError as e:
    assert "failed mid-answer" in e.message, e.message
    assert e.body and e.body.get("code") == 502, e.body
    print(f"error event: {e.message}", flush=True)
