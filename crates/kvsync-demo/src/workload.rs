//! The load: multi-turn conversations over shared system prompts, popular ones more often.

use crate::config::*;
use engine_sim::output_tokens;
use engine_sim::tokenizer::{
    BOS, END_OF_TURN, FIRST_WORD_ID, ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_USER,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One request of the load.
#[derive(Debug, Clone)]
pub struct Turn {
    pub prompt: Vec<u32>,
    pub output_len: usize,
}

/// The load: per client, its turns in order. A conversation's turns go to one client, so each
/// turn is sent after the previous one was answered; conversations interleave.
pub fn workload(cfg: &DemoConfig, vocab: u32) -> Vec<Vec<Turn>> {
    let mut rng = SmallRng::seed_from_u64(cfg.seed);
    let words = |rng: &mut SmallRng, n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.gen_range(FIRST_WORD_ID..vocab))
            .collect()
    };
    let systems: Vec<Vec<u32>> = (0..cfg.system_prompts)
        .map(|_| {
            let mut s = vec![BOS, ROLE_SYSTEM];
            s.extend(words(&mut rng, cfg.system_prompt_tokens.saturating_sub(3)));
            s.push(END_OF_TURN);
            s
        })
        .collect();
    struct Conv {
        id: usize,
        history: Vec<u32>,
        turns_left: usize,
    }
    let clients = cfg.clients.max(1);
    let mut out: Vec<Vec<Turn>> = vec![Vec::new(); clients];
    let mut next_id = 0;
    let mut new_conv = |rng: &mut SmallRng| -> Conv {
        // Popular system prompts are used more (a Zipf-like skew).
        let r: f64 = rng.gen();
        let s = ((r * r) * systems.len() as f64) as usize;
        next_id += 1;
        Conv {
            id: next_id - 1,
            history: systems[s.min(systems.len() - 1)].clone(),
            turns_left: rng.gen_range(1..=cfg.max_turns.max(1)),
        }
    };
    let active_max = (4 * clients).min(cfg.conversations).max(1);
    let mut started = 0;
    let mut active: Vec<Conv> = Vec::new();
    while started < cfg.conversations || !active.is_empty() {
        while active.len() < active_max && started < cfg.conversations {
            active.push(new_conv(&mut rng));
            started += 1;
        }
        let i = rng.gen_range(0..active.len());
        let c = &mut active[i];
        let mut prompt = c.history.clone();
        prompt.push(ROLE_USER);
        let n = rng.gen_range(cfg.user_tokens.0..=cfg.user_tokens.1);
        prompt.extend(words(&mut rng, n));
        prompt.extend([END_OF_TURN, ROLE_ASSISTANT]);
        let output_len = rng.gen_range(cfg.output_tokens.0..=cfg.output_tokens.1);
        c.history = prompt.clone();
        c.history.extend(output_tokens(&prompt, output_len, vocab));
        c.history.push(END_OF_TURN);
        out[c.id % clients].push(Turn { prompt, output_len });
        c.turns_left -= 1;
        if c.turns_left == 0 {
            active.swap_remove(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::VOCAB;
    use std::path::PathBuf;
    #[test]
    fn a_conversation_grows_from_its_previous_turn_and_output() {
        let mut cfg = DemoConfig::new(PathBuf::from("kvsync"));
        cfg.conversations = 20;
        cfg.clients = 3;
        cfg.system_prompts = 2;
        cfg.system_prompt_tokens = 64;
        let load = workload(&cfg, VOCAB);
        assert_eq!(load.len(), 3);
        let n: usize = load.iter().map(Vec::len).sum();
        assert!(n >= 20 && n <= 20 * cfg.max_turns);
        // Within a client, a turn that extends an earlier one carries its prompt and output.
        let mut follow_ups = 0;
        for turns in &load {
            for (i, t) in turns.iter().enumerate() {
                for prev in &turns[..i] {
                    let mut h = prev.prompt.clone();
                    h.extend(output_tokens(&prev.prompt, prev.output_len, VOCAB));
                    if t.prompt.starts_with(&h) {
                        follow_ups += 1;
                        break;
                    }
                }
            }
        }
        assert!(follow_ups > 0, "multi-turn conversations");
        assert_eq!(
            workload(&cfg, VOCAB)[0][0].prompt,
            load[0][0].prompt,
            "seeded"
        );
    }
}
