"""Reference token ids from Hugging Face transformers for tests/parity.rs.

Usage: parity.py CORPUS.json OUT.json
CORPUS: {"tokenizers": {NAME: {"dir": DIR, "prompts": [{"text", "add_special_tokens"}],
                                "chats": [{"messages", "tools", "add_generation_prompt", "kwargs"}]}}}
OUT:    {NAME: {"prompts": [[ids]], "chats": [{"ids": [...], "text": str} | {"error": str}]}}

Prompts are `tok(text, add_special_tokens=...).input_ids` (vLLM's completions path); chats are
`tok.apply_chat_template(messages, tools=..., add_generation_prompt=..., tokenize=True, **kwargs)`
(vLLM's chat path: the rendered text tokenized without special tokens), with the text as well
(`tokenize=False`) to show where a mismatch starts.
"""

import json
import sys

from transformers import AutoTokenizer


def main() -> None:
    corpus_path, out_path = sys.argv[1], sys.argv[2]
    with open(corpus_path, encoding="utf-8") as f:
        corpus = json.load(f)
    out = {}
    for name, spec in corpus["tokenizers"].items():
        tok = AutoTokenizer.from_pretrained(spec["dir"])
        prompts = [
            tok(p["text"], add_special_tokens=p["add_special_tokens"]).input_ids for p in spec["prompts"]
        ]
        chats = []
        for c in spec["chats"]:
            kwargs = dict(
                tools=c.get("tools"),
                add_generation_prompt=c["add_generation_prompt"],
                **(c.get("kwargs") or {}),
            )
            try:
                ids = tok.apply_chat_template(c["messages"], tokenize=True, **kwargs)
                text = tok.apply_chat_template(c["messages"], tokenize=False, **kwargs)
                chats.append({"ids": list(ids), "text": text})
            except Exception as e:  # the Rust side must fail on the same cases
                chats.append({"error": f"{type(e).__name__}: {e}"})
        out[name] = {"prompts": prompts, "chats": chats}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
