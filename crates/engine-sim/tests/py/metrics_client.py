"""Reads the simulator's /metrics with prometheus_client's parser (run by tests/http_api.rs).

Usage: metrics_client.py ROOT_URL MODEL. Checks vLLM's names, types, labels and buckets, then
that the counters and histograms move with load. Exits non-zero on the first failed check.
"""
import json
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

root, model = sys.argv[1], sys.argv[2]
labels = {"model_name": model, "engine": "0"}

EXPECTED = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
}
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]


def scrape():
    with urllib.request.urlopen(f"{root}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, name, sample, **extra):
    want = dict(labels, **extra)
    found = [s.value for s in fams[name].samples if s.name == sample and s.labels == want]
    assert len(found) == 1, (name, sample, want, fams[name].samples)
    return found[0]


def complete(prompt, max_tokens):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"{root}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)["usage"]


before = scrape()
for name, kind in EXPECTED.items():
    assert name in before, f"missing {name}"
    assert before[name].type == kind, (name, before[name].type, kind)
buckets = [float(s.labels["le"]) for s in before["vllm:time_to_first_token_seconds"].samples
           if s.name.endswith("_bucket")]
assert buckets == TTFT_BUCKETS + [float("inf")], buckets
info = before["vllm:cache_config_info"]
assert info.type == "gauge" and info.samples[0].value == 1.0, info
assert info.samples[0].labels["block_size"] == "16", info
assert info.samples[0].labels["num_gpu_blocks"] == "1024", info
reasons = {s.labels["finished_reason"] for s in before["vllm:request_success"].samples}
assert {"stop", "length", "abort"} <= reasons, reasons
print("names and types: ok")

prompt = " ".join(f"m{i}" for i in range(50))
usages = [complete(prompt, 4) for _ in range(3)]
after = scrape()


def delta(name, sample, **extra):
    return value(after, name, sample, **extra) - value(before, name, sample, **extra)


assert delta("vllm:prompt_tokens", "vllm:prompt_tokens_total") == 3 * 51
assert delta("vllm:generation_tokens", "vllm:generation_tokens_total") == 12
assert delta("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 3 * 51
hits = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
assert hits > 0 and delta("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == hits
assert delta("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 3
ttft = "vllm:time_to_first_token_seconds"
assert delta(ttft, ttft + "_count") == 3
assert delta(ttft, ttft + "_sum") > 0
itl = "vllm:inter_token_latency_seconds"
assert delta(itl, itl + "_count") == 3 * 3
e2e = "vllm:e2e_request_latency_seconds"
assert delta(e2e, e2e + "_count") == 3
usage = value(after, "vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_perc")
assert 0.0 <= usage <= 1.0, usage
print("moves with load: ok")
