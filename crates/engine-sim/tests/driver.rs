//! The driver with real tokio receivers and real ZeroMQ sockets, at a high speed factor (no
//! wall-clock bounds): events arrive in order with the predicted tokens, a repeated prompt
//! reports its full blocks cached, the published KV events carry vLLM's hashes of the
//! prompt's blocks, a dropped receiver aborts its request and frees its blocks, and shutdown
//! joins the thread and closes the streams.

use engine_sim::vllm_hash::{hash_block_tokens, none_hash, Algo, DEFAULT_NONE_HASH_SEED};
use engine_sim::{
    output_tokens, EngineConfig, EngineHandle, FinishReason, GenerateRequest, SchedConfig,
    SimConfig, SubmitError, TokenEvent,
};
use kv_events::{decode, parse_live, BlockHash, Event};
use tokio::sync::mpsc::Receiver;

const VOCAB: u32 = 32_000;

fn engine(speed: f64) -> EngineHandle {
    EngineHandle::start(SimConfig {
        engine: EngineConfig {
            num_blocks: 512,
            block_size: 16,
            ..EngineConfig::default()
        },
        sched: SchedConfig {
            max_model_len: 2048,
            vocab: VOCAB,
            ..SchedConfig::default()
        },
        speed,
        ..SimConfig::default()
    })
    .expect("engine starts")
}

fn request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: id.to_owned(),
        prompt,
        max_tokens,
        lora: None,
    }
}

/// All of a request's events, until its channel closes.
async fn drain(mut rx: Receiver<TokenEvent>) -> Vec<TokenEvent> {
    let mut out = Vec::new();
    while let Some(e) = rx.recv().await {
        out.push(e);
    }
    out
}

/// Checks the event order and returns (cached tokens, tokens, first token time, finish).
fn parse(events: &[TokenEvent]) -> (usize, Vec<u32>, f64, (usize, usize, usize)) {
    let Some(TokenEvent::Scheduled {
        t: t0,
        cached_tokens,
    }) = events.first()
    else {
        panic!("Scheduled first: {events:?}");
    };
    let mut tokens = Vec::new();
    let mut last_t = *t0;
    let mut first = None;
    for e in &events[1..events.len() - 1] {
        let TokenEvent::Token { t, id } = e else {
            panic!("tokens in the middle: {e:?}");
        };
        assert!(*t > last_t, "time advances");
        last_t = *t;
        first.get_or_insert(*t);
        tokens.push(*id);
    }
    let Some(TokenEvent::Finished {
        t,
        reason,
        prompt_tokens,
        cached_tokens: c,
        completion_tokens,
    }) = events.last()
    else {
        panic!("Finished last: {events:?}");
    };
    assert_eq!(
        (*t, *reason, *c),
        (last_t, FinishReason::Length, *cached_tokens)
    );
    (
        *cached_tokens,
        tokens,
        first.expect("a token"),
        (*prompt_tokens, *c, *completion_tokens),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_tokens_and_reports_cached_prefixes() {
    let e = engine(1000.0);
    let prompt: Vec<u32> = (1..=100).collect();
    let t_submit = e.now();
    let first = drain(e.submit(request("a", prompt.clone(), 8)).expect("queued")).await;
    let (cached, tokens, t_first, usage) = parse(&first);
    assert_eq!(cached, 0);
    assert_eq!(tokens, output_tokens(&prompt, 8, VOCAB));
    assert_eq!(usage, (100, 0, 8));
    assert!(t_first > t_submit);
    // The same prompt again: its six full blocks of 16 are cached.
    let again = drain(e.submit(request("b", prompt.clone(), 3)).expect("queued")).await;
    let (cached, tokens, _, usage) = parse(&again);
    assert_eq!((cached, usage), (96, (100, 96, 3)));
    assert_eq!(tokens, output_tokens(&prompt, 3, VOCAB));
    // max_model_len ends a request early.
    let long: Vec<u32> = (0..2040).collect();
    let capped = drain(e.submit(request("c", long, 100)).expect("queued")).await;
    assert_eq!(parse(&capped).3, (2040, 0, 8));
    let m = e.stats();
    assert_eq!(
        (m.requests_finished, m.generation_tokens, m.prompt_tokens),
        (3, 19, 2240)
    );
    assert_eq!((m.prefix_cache_queries, m.prefix_cache_hits), (2240, 96));
    assert_eq!((m.num_requests_running, m.num_requests_waiting), (0, 0));
    // Bad requests are refused, not panicked on.
    let err = e
        .submit(request("d", vec![1; 2049], 1))
        .expect_err("too long");
    assert!(matches!(err, SubmitError::Invalid(_)), "{err}");
    assert!(matches!(
        e.submit(request("e", Vec::new(), 1)),
        Err(SubmitError::Invalid(_))
    ));
    e.shutdown();
    assert_eq!(
        e.submit(request("f", vec![1], 1)).expect_err("stopped"),
        SubmitError::Stopped
    );
}

/// At speed 1 a prefill step lasts at least 30 ms of wall time, far longer than submitting
/// 16 requests takes: most of them share their prefill step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_steps() {
    let e = engine(1.0);
    let prompt = |k: u32| -> Vec<u32> { (k * 1000..k * 1000 + 50).collect() };
    let rxs: Vec<_> = (0..16u32)
        .map(|k| {
            e.submit(request(&k.to_string(), prompt(k), 3))
                .expect("queued")
        })
        .collect();
    let mut firsts = Vec::new();
    for (k, rx) in (0..16u32).zip(rxs) {
        let (_, tokens, t_first, _) = parse(&drain(rx).await);
        assert_eq!(tokens, output_tokens(&prompt(k), 3, VOCAB));
        firsts.push(t_first);
    }
    let most = firsts
        .iter()
        .map(|t| firsts.iter().filter(|&u| u == t).count())
        .max();
    assert!(most >= Some(8), "{firsts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_receiver_aborts_and_frees_blocks() {
    let e = engine(50.0);
    let mut rx = e
        .submit(request("gone", (0..300).collect(), 1500))
        .expect("queued");
    // Wait for its first token, then hang up.
    loop {
        match rx.recv().await.expect("stream open") {
            TokenEvent::Token { .. } => break,
            _ => continue,
        }
    }
    drop(rx);
    // A request submitted after the hang-up finishes after the next step, which aborts the
    // abandoned one first.
    let ev = drain(e.submit(request("next", vec![5; 20], 2)).expect("queued")).await;
    parse(&ev);
    let m = e.stats();
    assert_eq!(
        m.requests_finished, 1,
        "the abandoned request did not finish"
    );
    assert_eq!((m.num_requests_running, m.num_requests_waiting), (0, 0));
    assert_eq!(m.kv_cache_usage, 0.0, "its blocks are free");
    assert!(e.reset_prefix_cache(), "no request holds blocks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_carry_vllms_hashes() {
    let e = engine(1000.0);
    let ctx = zmq::Context::new();
    let sub = ctx.socket(zmq::SUB).expect("sub");
    sub.set_subscribe(b"").expect("subscribe");
    sub.set_rcvtimeo(10_000).expect("timeout");
    sub.connect(&format!("tcp://127.0.0.1:{}", e.pub_port()))
        .expect("connect");
    // PUB drops what is sent before the subscription is through: probe until a batch comes
    // (a step's batch is sent before its tokens are delivered).
    let mut probe = 0u32;
    loop {
        probe += 1;
        let p = vec![9_000_000 + probe; 16];
        drain(e.submit(request("probe", p, 1)).expect("queued")).await;
        if sub.poll(zmq::POLLIN, 50).expect("poll") > 0 {
            break;
        }
    }
    let prompt: Vec<u32> = (1..=40).collect();
    drain(e.submit(request("x", prompt.clone(), 1)).expect("queued")).await;
    // Skip the probes' batches.
    let events = loop {
        let frames = sub.recv_multipart(0).expect("a batch");
        let batch = decode(parse_live(&frames).expect("frames").payload).expect("decodes");
        let probing = batch.events.iter().all(
            |ev| matches!(ev, Event::BlockStored(s) if s.token_ids.first() >= Some(&9_000_000)),
        );
        if !probing {
            break batch.events;
        }
    };
    let [Event::BlockStored(s)] = events.as_slice() else {
        panic!("one BlockStored: {events:?}");
    };
    let mut scratch = Vec::new();
    let mut parent = none_hash(Algo::Sha256, DEFAULT_NONE_HASH_SEED);
    let mut want = Vec::new();
    for block in prompt.chunks_exact(16) {
        parent = hash_block_tokens(Algo::Sha256, &mut scratch, &parent, block, None);
        let mut last = [0u8; 8];
        last.copy_from_slice(&parent[24..]);
        want.push(BlockHash::Uint(u64::from_be_bytes(last)));
    }
    assert_eq!(s.block_hashes, want);
    assert_eq!(s.token_ids, prompt[..32].to_vec());
}
