"""A fleet engine's /metrics under load, read with prometheus_client's parser (run by
tests/fleet.rs).

Usage: fleet_metrics.py ROOT_URL MODEL. Sends a burst of long prompts, scrapes while they run
(requests running and waiting, KV cache usage), then after (back to idle, token counters), then
repeats a prompt (prefix cache hits). Exits non-zero on the first failed check.
"""
import json
import sys
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

root, model = sys.argv[1], sys.argv[2]
labels = {"model_name": model, "engine": "0"}


def scrape():
    with urllib.request.urlopen(f"{root}/metrics") as r:
        text = r.read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}

    def value(name, sample=None):
        sample = sample or name
        found = [s.value for s in fams[name].samples
                 if s.name == sample and s.labels == labels]
        assert len(found) == 1, (name, sample, fams[name].samples)
        return found[0]
    return value


def complete(prompt, max_tokens, out):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{root}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        out.append(json.load(r)["usage"])


before = scrape()
assert before("vllm:num_requests_running") == 0
assert before("vllm:kv_cache_usage_perc") == 0

# 4 prompts of 2,501 tokens: more than one 8,192-token step, so one waits.
prompts = [" ".join(f"load{i}x{j}" for j in range(2500)) for i in range(4)]
usages = []
threads = [threading.Thread(target=complete, args=(p, 20, usages)) for p in prompts]
for t in threads:
    t.start()
most_running = most_waiting = most_usage = 0.0
deadline = time.monotonic() + 60
while any(t.is_alive() for t in threads):
    assert time.monotonic() < deadline, "the burst did not finish"
    now = scrape()
    most_running = max(most_running, now("vllm:num_requests_running"))
    most_waiting = max(most_waiting, now("vllm:num_requests_waiting"))
    most_usage = max(most_usage, now("vllm:kv_cache_usage_perc"))
    time.sleep(0.01)
for t in threads:
    t.join()
print(f"under load: running up to {most_running}, waiting up to {most_waiting}, "
      f"kv usage up to {most_usage:.3f}")
assert most_running >= 2, most_running
assert most_waiting >= 1, most_waiting
assert 0 < most_usage <= 1, most_usage

after = scrape()
assert after("vllm:num_requests_running") == 0
assert after("vllm:num_requests_waiting") == 0
assert after("vllm:kv_cache_usage_perc") == 0
assert after("vllm:prompt_tokens", "vllm:prompt_tokens_total") - \
    before("vllm:prompt_tokens", "vllm:prompt_tokens_total") == 4 * 2501
assert after("vllm:generation_tokens", "vllm:generation_tokens_total") - \
    before("vllm:generation_tokens", "vllm:generation_tokens_total") == 4 * 20
ttft = "vllm:time_to_first_token_seconds"
assert after(ttft, ttft + "_count") - before(ttft, ttft + "_count") == 4

# The same prompt again: its full blocks hit the prefix cache.
again = []
complete(prompts[0], 2, again)
hits = again[0]["prompt_tokens_details"]["cached_tokens"]
assert hits == 2500 // 16 * 16, again
last = scrape()
assert last("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") - \
    after("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == hits
assert last("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") - \
    after("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 2501
print("fleet metrics move with load: ok")
