"""The official `openai` client streams chat completions from one `kvsync sim` engine (run by
tests/sim.rs).

Usage: sim_chat.py BASE_URL MODEL BLOCK_SIZE. Exits non-zero on the first failed check.
"""
import sys

import openai

base_url, model, block_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
messages = [
    {"role": "system", "content": " ".join(f"rule{i}" for i in range(120))},
    {"role": "user", "content": "what is the fleet doing today"},
]


def chat():
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    ))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant", content[0]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert len(text.split()) == 8, text
    assert content[-1].choices[0].finish_reason == "length", content[-1]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None, chunks[-1]
    assert usage.completion_tokens == 8, usage
    assert usage.prompt_tokens_details is not None, usage
    return text, usage


first_text, first = chat()
assert first.prompt_tokens_details.cached_tokens == 0, first
second_text, second = chat()
assert second_text == first_text
full_blocks = (second.prompt_tokens - 1) // block_size * block_size
assert full_blocks > 0
assert second.prompt_tokens_details.cached_tokens == full_blocks, (second, full_blocks)
print(f"chat stream: prompt {second.prompt_tokens} tokens, cached {full_blocks} the second time: ok")
