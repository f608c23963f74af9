"""What a real vLLM's /tokenize spends in Hugging Face `transformers` alone: the same prose
prompts as `cargo bench -p kvsync --bench tokenize` (1k, 8k, 32k tokens, 40 per size after 3
warm-ups), `tok(prompt).input_ids` as vLLM's completions path calls it; prints the medians.

Usage: .venv/bin/python crates/kvsync/benches/tokenize_transformers.py .cache/tokenizers/qwen3
"""
import sys, time, statistics
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
WORDS = "the router sends each request to a pod whose cache already holds its prefix, and measures how long prefill takes when nothing is cached; then it compares figures.".split()
def prompt(tokens, k):
    s = f"Request {k}. "; i = k
    while len(s) < tokens * 6:
        s += WORDS[i % len(WORDS)] + " "
        if i % 17 == 0: s += f"{i*31} "
        i = (i * 7 + 3) % 10007
    ids = tok(s, add_special_tokens=False).input_ids[:tokens]
    return tok.decode(ids)
for n in (1024, 8192, 32768):
    ps = [prompt(n, k) for k in range(43)]
    ts = []
    for p in ps:
        t0 = time.perf_counter(); ids = tok(p).input_ids; ts.append(time.perf_counter() - t0)
    ts = sorted(ts[3:])
    print(f"{n:>6} tokens: transformers tok(prompt).input_ids median {statistics.median(ts)*1e3:7.2f} ms ({len(ids)} ids)")
