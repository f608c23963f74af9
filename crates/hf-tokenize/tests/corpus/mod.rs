//! The parity corpus, generated deterministically (a fixed-seed splitmix64): prompts in plain
//! ASCII, Unicode (CJK, emoji sequences, combining marks, right-to-left and Indic scripts),
//! whitespace runs, special-token text, ~32k-token prompts; chats with system prompts, many
//! turns, tools, tool calls and tool results, and the OpenAI request forms vLLM rewrites.

#![allow(dead_code)] // each test binary uses part of it

use serde_json::{json, Value as Json};

/// splitmix64: a tiny deterministic generator, so the corpus is the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn char_in(&mut self, lo: u32, hi: u32) -> char {
        let c = lo + (self.next() % u64::from(hi - lo + 1)) as u32;
        char::from_u32(c).unwrap_or('?')
    }
}

const WORDS: &[&str] = &[
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "cache",
    "prefix",
    "router",
    "token",
    "model",
    "kernel",
    "Rust",
    "vLLM",
    "tokenizer",
    "attention",
    "block",
    "hash",
    "Kubernetes",
    "pod",
    "request",
    "latency",
    "throughput",
    "I'm",
    "don't",
    "we'll",
    "they'd",
    "you've",
    "it's",
    "SHOUT",
    "CamelCase",
    "snake_case",
    "kebab-case",
    "e.g.",
    "i.e.",
    "etc.",
    "(parenthesised)",
    "[bracketed]",
    "{braced}",
    "\"quoted\"",
    "'single'",
    "x=1;",
    "a+b",
    "https://example.com/a?b=c&d=e",
    "user@example.org",
    "#hashtag",
    "@mention",
    "$42.50",
    "3.14159",
    "1,000,000",
    "2024-07-26",
    "12:34:56",
    "0x1F",
    "1e-7",
    "100%",
    "...",
    "—",
    "–",
];

const SCRIPTS: &[&str] = &[
    "你好，世界。今天天气很好！",
    "カタカナとひらがな、漢字。",
    "한국어 텍스트입니다",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "Ω≈ç√∫˜µ≤≥÷",
    "ＡＢＣ１２３　全角",
    "👨‍👩‍👧‍👦 family",
    "🇯🇵🇫🇷🇺🇸",
    "👍🏽👋🏿",
    "😀😃😄😁🤖🧠",
    "e\u{301}te\u{301} cafe\u{301}",
    "\u{1100}\u{1161}\u{11a8}",
    "a\u{200b}b\u{200d}c",
    "\u{feff}BOM",
    "non\u{a0}breaking",
    "\u{3000}ideographic",
    "ctrl\u{1}\u{7f}\u{1b}[0m",
    "\u{fffd}replacement",
    "Z\u{351}\u{34b}\u{33d}algo",
];

const WHITESPACE: &[&str] = &[
    " ", "  ", "\t", "\n", "\r\n", "\n\n", " \n ", "   \t", "\u{a0}",
];

/// Prompts, each to be encoded with special tokens (and the first `fixed().len()` also without).
pub fn fixed_prompts(specials: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "",
        " ",
        "a",
        "Hello, world!",
        "  leading spaces",
        "trailing spaces   ",
        "\n",
        "\r\n\r\n",
        "\t\tindented",
        "I'm sure they'll say we've done it; SHE'S RIGHT.",
        "1234567890 3.14159 12345678901234567890 0x1F 1e10",
        "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
        "def f(x):\n\treturn x ** 2  # square\n",
        "<html><body class=\"x\">&amp; &lt;</body></html>",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "!!!???...,,,;;;:::---___===+++",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(SCRIPTS.iter().map(|s| s.to_string()));
    for sp in specials {
        v.push(sp.to_string());
        v.push(format!("before{sp}after"));
        v.push(format!("x {sp} y\n{sp}{sp}"));
    }
    for n in [1usize, 2, 3, 7, 16, 33, 100] {
        v.push(" ".repeat(n));
        v.push(format!("a{}b", " ".repeat(n)));
        v.push("\n".repeat(n));
        v.push(format!("x{}y", "\t".repeat(n)));
        v.push(format!("end{}", " \n".repeat(n)));
    }
    v
}

/// Random mixes of words, scripts, digits, punctuation and whitespace runs.
pub fn random_prompts(rng: &mut Rng, count: usize, max_pieces: usize) -> Vec<String> {
    (0..count)
        .map(|_| {
            let n = 1 + rng.below(max_pieces);
            mixed_text(rng, n)
        })
        .collect()
}

pub fn mixed_text(rng: &mut Rng, pieces: usize) -> String {
    let mut s = String::new();
    for _ in 0..pieces {
        match rng.below(10) {
            0..=4 => s.push_str(rng.pick(WORDS)),
            5 => s.push_str(rng.pick(SCRIPTS)),
            6 => {
                for _ in 0..1 + rng.below(6) {
                    let c = match rng.below(4) {
                        0 => rng.char_in(0x4e00, 0x9fff),
                        1 => rng.char_in(0x1f300, 0x1f64f),
                        2 => rng.char_in(0x00c0, 0x024f),
                        _ => rng.char_in(0x0300, 0x036f),
                    };
                    s.push(c);
                }
            }
            7 => s.push_str(&(rng.next() % 100_000).to_string()),
            8 => {
                let ws = rng.pick(WHITESPACE);
                for _ in 0..1 + rng.below(4) {
                    s.push_str(ws);
                }
            }
            _ => {
                s.push_str(rng.pick(&[".", ",", "!", "?", ":", ";", "'", "\"", "(", ")", "-", "/"]))
            }
        }
        if rng.below(3) > 0 {
            s.push(' ');
        }
    }
    s
}

/// About `tokens` tokens of the mixed text above (≈ 2.4 bytes per token with the Qwen3 and
/// Llama 3 vocabularies).
pub fn long_prompt(rng: &mut Rng, tokens: usize) -> String {
    let mut s = String::with_capacity(tokens * 3);
    while s.len() < tokens * 12 / 5 {
        s.push_str(&mixed_text(rng, 20));
        s.push_str(if rng.below(8) == 0 { "\n\n" } else { " " });
    }
    s
}

/// One chat case: what a client sends (`request`) and the messages vLLM hands to the template
/// for it (`messages`, given to transformers).
pub struct ChatCase {
    pub request: Json,
    pub messages: Json,
    pub tools: Option<Json>,
    pub add_generation_prompt: bool,
    pub kwargs: Option<Json>,
}

impl ChatCase {
    fn plain(messages: Json) -> ChatCase {
        ChatCase {
            request: messages.clone(),
            messages,
            tools: None,
            add_generation_prompt: true,
            kwargs: None,
        }
    }
}

fn tools(rng: &mut Rng) -> Json {
    let all = [
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather for a city — °C or °F",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "城市 name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}}),
        json!({"type": "function", "function": {"name": "search", "description": "Search the web <fast>",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}, "limit": {"type": "integer", "default": 10},
            "ratio": {"type": "number", "default": 0.5}, "safe": {"type": "boolean", "default": true}}, "required": ["q"]}}}),
        json!({"type": "function", "function": {"name": "noop", "description": "", "parameters": {"type": "object", "properties": {}}}}),
    ];
    let n = 1 + rng.below(all.len());
    Json::Array(all[..n].to_vec())
}

fn tool_args(rng: &mut Rng) -> Json {
    match rng.below(4) {
        0 => json!({"city": "Zürich", "unit": "celsius"}),
        1 => {
            json!({"q": mixed_text(rng, 4), "limit": 3, "ratio": 1.5e-7, "safe": false, "extra": null})
        }
        2 => json!({"nested": {"list": [1, 2.5, "三", {"deep": true}], "empty": {}, "none": []}}),
        _ => json!({}),
    }
}

/// Chats for a template with tools (Qwen3-like) or without.
pub fn chats(rng: &mut Rng, with_tools: bool, short: bool) -> Vec<ChatCase> {
    let text = |rng: &mut Rng| -> String {
        if short {
            (0..1 + rng.below(5))
                .map(|_| rng.pick(&["hello", "world"]))
                .collect::<Vec<_>>()
                .join(" ")
        } else {
            let n = 1 + rng.below(30);
            mixed_text(rng, n)
        }
    };
    let mut out = Vec::new();
    for _ in 0..15 {
        out.push(ChatCase::plain(
            json!([{"role": "user", "content": text(rng)}]),
        ));
    }
    for i in 0..15 {
        let mut msgs = Vec::new();
        if i % 3 != 0 {
            msgs.push(json!({"role": "system", "content": text(rng)}));
        }
        for _ in 0..1 + rng.below(4) {
            msgs.push(json!({"role": "user", "content": text(rng)}));
            msgs.push(json!({"role": "assistant", "content": text(rng)}));
        }
        msgs.push(json!({"role": "user", "content": text(rng)}));
        let mut case = ChatCase::plain(Json::Array(msgs));
        case.add_generation_prompt = i % 5 != 4;
        out.push(case);
    }
    // OpenAI request forms that vLLM rewrites before the template: text parts joined with "\n".
    for _ in 0..4 {
        let (a, b) = (text(rng), text(rng));
        out.push(ChatCase {
            request: json!([{"role": "user", "content": [{"type": "text", "text": a}, {"type": "text", "text": b}]}]),
            messages: json!([{"role": "user", "content": format!("{a}\n{b}")}]),
            tools: None,
            add_generation_prompt: true,
            kwargs: None,
        });
    }
    if !with_tools {
        return out;
    }
    for i in 0..12 {
        let tools = tools(rng);
        let mut msgs = Vec::new();
        let mut request = Vec::new();
        if i % 2 == 0 {
            msgs.push(json!({"role": "system", "content": text(rng)}));
        }
        msgs.push(json!({"role": "user", "content": text(rng)}));
        request.extend(msgs.iter().cloned());
        if i % 4 != 3 {
            let args = tool_args(rng);
            let content = if i % 3 == 0 { text(rng) } else { String::new() };
            let call = |args: Json| json!([{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]);
            msgs.push(
                json!({"role": "assistant", "content": content, "tool_calls": call(args.clone())}),
            );
            // The client sends arguments as a JSON string and content null when empty.
            let wire_content = if content.is_empty() {
                Json::Null
            } else {
                Json::String(content.clone())
            };
            request.push(json!({"role": "assistant", "content": wire_content, "tool_calls": call(Json::String(args.to_string()))}));
            for _ in 0..1 + rng.below(2) {
                let m = json!({"role": "tool", "tool_call_id": "call_1", "content": format!("{{\"temp\": {}}}", rng.below(40))});
                msgs.push(m.clone());
                request.push(m);
            }
            if i % 2 == 1 {
                let m = json!({"role": "assistant", "content": format!("<think>\n{}\n</think>\n\n{}", text(rng), text(rng))});
                msgs.push(m.clone());
                request.push(m);
                let m = json!({"role": "user", "content": text(rng)});
                msgs.push(m.clone());
                request.push(m);
            }
        }
        out.push(ChatCase {
            request: Json::Array(request),
            messages: Json::Array(msgs),
            tools: Some(tools),
            add_generation_prompt: true,
            kwargs: None,
        });
    }
    for i in 0..3 {
        let mut case = ChatCase::plain(json!([{"role": "user", "content": text(rng)}]));
        case.kwargs = Some(json!({"enable_thinking": i == 0}));
        out.push(case);
    }
    out
}

/// A tiny tokenizer.json: WordLevel model over a few words, `<s>` and `</s>` as added special
/// tokens.
pub fn tiny_tokenizer() -> Json {
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0, "<s>"), added(1, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]",
                  "vocab": {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4, "user": 5,
                            "assistant": 6, "system": 7, ":": 8, "get_weather": 9, "search": 10, "noop": 11}}
    })
}

/// Its tokenizer_config.json: a Llama-class tokenizer (BOS and EOS added by the post-processor
/// that `LlamaTokenizerFast` rebuilds from `add_bos_token`/`add_eos_token`), BOS as an
/// `AddedToken` object, and two named chat templates (one with a `{% generation %}` block).
pub fn tiny_config() -> Json {
    json!({
        "tokenizer_class": "LlamaTokenizerFast", "add_bos_token": true, "add_eos_token": true,
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false, "normalized": false,
                      "rstrip": false, "single_word": false},
        "eos_token": "</s>", "unk_token": "[UNK]",
        "chat_template": [
            {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role }} : {% if m.role == 'assistant' %}\n  {%- generation -%}\n  {{ m.content }}\n  {% endgeneration %}\n{% else %}{{ m.content }}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"},
            {"name": "tool_use", "template": "{{ bos_token }}{% for t in tools %}{{ t.function.name }} {% endfor %}{% for m in messages %}{{ m.role }} : {{ m.content }} {% endfor %}"}
        ]
    })
}

/// A chat template that exercises the Jinja features real templates use, in both engines:
/// namespaces, loop controls and loop variables, Python string methods, filters with keyword
/// arguments (`tojson(indent=..)`, `separators`, `sort_keys`), tests, slicing, arithmetic, and
/// Python's printing of None, booleans, lists and dicts.
pub const FEATURE_TEMPLATE: &str = r#"{%- set ns = namespace(count=0, sys='') -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{%- set ns.sys = m.content | trim -%}{%- continue -%}{%- endif -%}
  {%- set ns.count = ns.count + 1 -%}
  {{- '[' ~ loop.index ~ '/' ~ loop.length ~ '] ' ~ m.role | upper ~ ': ' -}}
  {{- m.content.split(' ') | reverse | join(' ') if m.content is string else m.content | tojson -}}
  {%- if m.tool_calls is defined %}
    {%- for c in m.tool_calls %} call {{ c.function.name }} {{ c.function.arguments | tojson(indent=4) }} {{ c.function.arguments | tojson(sort_keys=true) }}
      {%- for k, v in c.function.arguments | items %} {{ k }}={{ v }}{% endfor %}
    {%- endfor %}
  {%- endif %}
  {%- if m.content is string and m.content.endswith('!') %} (excited){% endif %}
  {%- if loop.index > 12 %}{% break %}{% endif %}
{% endfor -%}
{{ ns.sys.startswith('You') }} {{ ns.sys[:5] | length }} {{ ns.count }} {{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ messages | map(attribute='role') | unique | list }}
{% if tools %}{% for t in tools %}{{ t | tojson(separators=(',', ':')) }} {{ t.function.parameters.properties.keys() | list }}
{% endfor %}{% endif -%}
{{ strftime_now('%Y-%m-%d') }} {{ bos_token }} {{ none }} {{ [true, false, none] }} {{ {'a': 1, 'b': [1.5]} }} {{ 3 / 2 }} {{ 7 // 2 }} {{ 2 ** 10 }} {{ 'abc def'.title() }} {{ 'a-b-c'.replace('-', '+') }} {{ 'x,y'.split(',') }} {{ messages[-1].role }} {{ messages[::-1][0].role }}
{%- if add_generation_prompt %}<gen>{% endif %}"#;
