//! What `kvsync bench` sends: sessions of text requests, deterministic from the seed.
//!
//! A session is the unit a client runs start to end: a conversation's turns (each turn's
//! prompt holds the earlier turns and the answers the server really gave, so the next turn
//! extends the previous one's prefix), or one request for the other workloads. Prompts are
//! text (any router can route them) of pseudo-words drawn from a fixed syllable set: the
//! simulator's tokenizer counts one token per word; a real tokenizer about 1.5–2.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The kinds of traffic.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Multi-turn chats over shared system prompts, popular ones more often.
    Conversations {
        system_prompts: usize,
        system_prompt_tokens: usize,
        max_turns: usize,
        user_tokens: usize,
    },
    /// `groups` × `users` sharing a `context_tokens` context per group, each request a new
    /// `question_tokens` question (llm-d's precise-prefix benchmark shape).
    SharedPrefix {
        groups: usize,
        users: usize,
        context_tokens: usize,
        question_tokens: usize,
    },
    /// Nothing shared: `prompt_tokens` random words per request.
    Random { prompt_tokens: usize },
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Conversations { .. } => "conversations",
            Workload::SharedPrefix { .. } => "shared-prefix",
            Workload::Random { .. } => "random",
        }
    }
}

/// The API a request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

impl Api {
    pub fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        }
    }
}

const SYLLABLES: [&str; 32] = [
    "ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "da", "fe", "gu", "hi", "jo", "ku", "la", "me",
    "no", "pa", "qui", "ro", "se", "ti", "vu", "wa", "xe", "yo", "zu", "bra", "cle", "dri", "fla",
    "gro",
];

/// `n` pseudo-words of 2–3 syllables.
pub fn words(rng: &mut SmallRng, n: usize) -> String {
    let mut s = String::with_capacity(n * 7);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        for _ in 0..rng.gen_range(2..=3) {
            s.push_str(SYLLABLES[rng.gen_range(0..SYLLABLES.len())]);
        }
    }
    s
}

/// One session: the first request's messages (chat) or prompt (completions); for
/// conversations, how many more turns follow and the users' next messages.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: u64,
    /// Chat history so far (the system prompt and user turns; answers are appended as they
    /// arrive).
    pub messages: Vec<Value>,
    /// User messages of the turns after the first, in order.
    pub next_users: Vec<String>,
}

impl Session {
    pub fn turns(&self) -> usize {
        1 + self.next_users.len()
    }

    /// The request body of the current turn.
    pub fn body(&self, api: Api, model: &str, max_tokens: usize, ignore_eos: bool) -> Value {
        let mut b = match api {
            Api::Chat => json!({"model": model, "messages": self.messages}),
            Api::Completions => json!({"model": model, "prompt": self.prompt_text()}),
        };
        b["max_tokens"] = json!(max_tokens);
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
        if ignore_eos {
            b["ignore_eos"] = json!(true);
        }
        b
    }

    /// The conversation as one text (completions): every message's content in order.
    fn prompt_text(&self) -> String {
        let parts: Vec<&str> = self
            .messages
            .iter()
            .filter_map(|m| m["content"].as_str())
            .collect();
        parts.join("\n")
    }

    /// Records the answer of the current turn and moves to the next; false when none is left.
    pub fn advance(&mut self, answer: &str) -> bool {
        if self.next_users.is_empty() {
            return false;
        }
        self.messages
            .push(json!({"role": "assistant", "content": answer}));
        let user = self.next_users.remove(0);
        self.messages.push(json!({"role": "user", "content": user}));
        true
    }
}

/// Makes the sessions of a workload, in order, from a seed.
#[derive(Debug)]
pub struct Generator {
    workload: Workload,
    seed: u64,
    next: u64,
    /// Per shared item (system prompt, group context): its text, made once.
    shared: Vec<String>,
    /// Cumulative popularity weights of `shared` (conversations: 1/(rank+1)).
    cumulative: Vec<f64>,
}

impl Generator {
    pub fn new(workload: Workload, seed: u64) -> Generator {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_5eed);
        let (shared, weights): (Vec<String>, Vec<f64>) = match &workload {
            Workload::Conversations {
                system_prompts,
                system_prompt_tokens,
                ..
            } => (0..*system_prompts)
                .map(|i| (words(&mut rng, *system_prompt_tokens), 1.0 / (i + 1) as f64))
                .unzip(),
            Workload::SharedPrefix {
                groups,
                context_tokens,
                ..
            } => (0..*groups)
                .map(|_| (words(&mut rng, *context_tokens), 1.0))
                .unzip(),
            Workload::Random { .. } => (Vec::new(), Vec::new()),
        };
        let mut acc = 0.0;
        let cumulative = weights
            .iter()
            .map(|w| {
                acc += w;
                acc
            })
            .collect();
        Generator {
            workload,
            seed,
            next: 0,
            shared,
            cumulative,
        }
    }

    fn pick(&self, rng: &mut SmallRng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.gen::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.shared.len().saturating_sub(1))
    }

    /// The next session.
    pub fn next_session(&mut self) -> Session {
        let id = self.next;
        self.next += 1;
        let mut rng = SmallRng::seed_from_u64(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ id);
        match self.workload.clone() {
            Workload::Conversations {
                max_turns,
                user_tokens,
                ..
            } => {
                let system = self.shared[self.pick(&mut rng)].clone();
                let turns = rng.gen_range(1..=max_turns.max(1));
                let mut users: Vec<String> =
                    (0..turns).map(|_| words(&mut rng, user_tokens)).collect();
                let first = users.remove(0);
                Session {
                    id,
                    messages: vec![
                        json!({"role": "system", "content": system}),
                        json!({"role": "user", "content": first}),
                    ],
                    next_users: users,
                }
            }
            Workload::SharedPrefix {
                users,
                question_tokens,
                ..
            } => {
                let g = self.pick(&mut rng);
                let u = rng.gen_range(0..users.max(1));
                let question = format!("user{u}: {}", words(&mut rng, question_tokens));
                Session {
                    id,
                    messages: vec![
                        json!({"role": "system", "content": self.shared[g]}),
                        json!({"role": "user", "content": question}),
                    ],
                    next_users: Vec::new(),
                }
            }
            Workload::Random { prompt_tokens } => Session {
                id,
                messages: vec![json!({"role": "user", "content": words(&mut rng, prompt_tokens)})],
                next_users: Vec::new(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> Workload {
        Workload::Conversations {
            system_prompts: 4,
            system_prompt_tokens: 50,
            max_turns: 4,
            user_tokens: 8,
        }
    }

    #[test]
    fn sessions_are_repeatable_and_distinct() {
        let mut a = Generator::new(conv(), 7);
        let mut b = Generator::new(conv(), 7);
        let mut c = Generator::new(conv(), 8);
        let sa: Vec<Session> = (0..20).map(|_| a.next_session()).collect();
        let sb: Vec<Session> = (0..20).map(|_| b.next_session()).collect();
        let sc: Vec<Session> = (0..20).map(|_| c.next_session()).collect();
        for (x, y) in sa.iter().zip(&sb) {
            assert_eq!(x.messages, y.messages);
            assert_eq!(x.next_users, y.next_users);
        }
        assert!(sa.iter().zip(&sc).any(|(x, y)| x.messages != y.messages));
        // Popular system prompts come more often: the first is the most frequent.
        let mut g = Generator::new(conv(), 1);
        let mut counts = std::collections::HashMap::new();
        for _ in 0..2000 {
            let s = g.next_session();
            *counts
                .entry(s.messages[0]["content"].as_str().unwrap_or("").to_owned())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        let first = g.shared[0].clone();
        let top = counts.values().max().copied().unwrap_or(0);
        assert_eq!(counts[&first], top);
    }

    #[test]
    fn a_conversation_extends_its_previous_turn() {
        let mut g = Generator::new(conv(), 3);
        let mut s = (0..50)
            .map(|_| g.next_session())
            .find(|s| s.turns() >= 3)
            .expect("a session of 3+ turns");
        let first = s.body(Api::Chat, "m", 8, false);
        assert!(s.advance("the answer"));
        let second = s.body(Api::Chat, "m", 8, false);
        let m1 = first["messages"].as_array().expect("messages");
        let m2 = second["messages"].as_array().expect("messages");
        assert_eq!(&m2[..m1.len()], &m1[..]);
        assert_eq!(m2[m1.len()]["content"], "the answer");
        assert_eq!(second["stream_options"]["include_usage"], true);
        let text = s.body(Api::Completions, "m", 8, true);
        let prompt = text["prompt"].as_str().expect("prompt");
        assert!(prompt.contains("the answer"));
        assert_eq!(text["ignore_eos"], true);
    }

    #[test]
    fn shared_prefix_requests_share_their_group_context() {
        let w = Workload::SharedPrefix {
            groups: 3,
            users: 5,
            context_tokens: 40,
            question_tokens: 6,
        };
        let mut g = Generator::new(w, 9);
        let sessions: Vec<Session> = (0..60).map(|_| g.next_session()).collect();
        let contexts: std::collections::HashSet<&str> = sessions
            .iter()
            .filter_map(|s| s.messages[0]["content"].as_str())
            .collect();
        assert_eq!(contexts.len(), 3);
        let questions: std::collections::HashSet<&str> = sessions
            .iter()
            .filter_map(|s| s.messages[1]["content"].as_str())
            .collect();
        assert_eq!(questions.len(), 60, "every question is new");
        assert!(sessions.iter().all(|s| s.turns() == 1));
    }
}
