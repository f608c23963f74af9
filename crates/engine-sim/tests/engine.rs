//! The engine on real sockets: a SUB receives one batch per step in vLLM's frames, the replay
//! ROUTER answers a DEALER from the buffer with the end marker, a dropped batch leaves a seq
//! gap that replay fills, and a restarted engine binds the same ports and counts from 0.

use engine_sim::{Engine, EngineConfig, HashForm};
use kv_events::{decode, parse_live, parse_replay, Event, ReplayMessage, WireFormat};

fn sub(ctx: &zmq::Context, port: u16) -> zmq::Socket {
    let s = ctx.socket(zmq::SUB).expect("sub");
    s.set_subscribe(b"").expect("subscribe");
    s.set_rcvtimeo(5000).expect("timeout");
    s.connect(&format!("tcp://127.0.0.1:{port}"))
        .expect("connect");
    s
}

/// Serves probe requests until the subscription is through (PUB drops what is sent before a
/// SUB joins); returns the seq of the first batch received.
fn join(engine: &Engine, s: &zmq::Socket) -> u64 {
    for probe in 0u32.. {
        engine
            .serve(&[7_000_000 + probe; 16], None, 0)
            .expect("room");
        if s.poll(zmq::POLLIN, 20).expect("poll") > 0 {
            let frames = s.recv_multipart(0).expect("recv");
            return parse_live(&frames).expect("live frames").seq;
        }
    }
    unreachable!()
}

fn recv_seq(s: &zmq::Socket) -> (u64, Vec<Event>) {
    let frames = s.recv_multipart(0).expect("a batch within 5 s");
    let m = parse_live(&frames).expect("live frames");
    assert_eq!(m.topic, b"kv-events");
    let batch = decode(m.payload).expect("decodes");
    (m.seq, batch.events)
}

fn replay(ctx: &zmq::Context, port: u16, from: u64) -> Vec<u64> {
    let d = ctx.socket(zmq::DEALER).expect("dealer");
    d.set_rcvtimeo(5000).expect("timeout");
    d.connect(&format!("tcp://127.0.0.1:{port}"))
        .expect("connect");
    d.send_multipart([&b""[..], &from.to_be_bytes()], 0)
        .expect("send");
    let mut seqs = Vec::new();
    loop {
        let frames = d.recv_multipart(0).expect("a reply within 5 s");
        match parse_replay(&frames).expect("replay frames") {
            ReplayMessage::Batch {
                topic,
                seq,
                payload,
            } => {
                assert_eq!(topic, Some(&b"kv-events"[..]));
                decode(payload).expect("decodes");
                seqs.push(seq);
            }
            ReplayMessage::End => return seqs,
        }
    }
}

#[test]
fn batches_replay_drops_and_restart_on_real_sockets() {
    for (wire, form) in [
        (WireFormat::VLLM_0_33, HashForm::Int),
        (WireFormat::VLLM_0_14, HashForm::Bytes),
    ] {
        let ctx = zmq::Context::new();
        let cfg = EngineConfig {
            num_blocks: 64,
            wire,
            hash_form: form,
            seed: 11,
            ..EngineConfig::default()
        };
        let engine = Engine::start(cfg.clone()).expect("engine");
        let s = sub(&ctx, engine.pub_port());
        let first = join(&engine, &s);
        // Drain the probes.
        while engine.next_seq() > first + 1 {
            let (seq, _) = recv_seq(&s);
            if seq + 1 == engine.next_seq() {
                break;
            }
        }

        // One request: the prompt step (a store of 3 blocks) and decode steps that fill a block.
        let prompt: Vec<u32> = (5000..5050).collect();
        let before = engine.next_seq();
        let served = engine.serve(&prompt, None, 14).expect("room");
        assert_eq!(served.hit_tokens, 0);
        let (seq, events) = recv_seq(&s);
        assert_eq!(seq, before);
        match &events[..] {
            [Event::BlockStored(st)] => {
                assert_eq!(st.block_hashes.len(), 3);
                assert_eq!(st.token_ids, prompt[..48]);
                assert_eq!(st.parent_block_hash, None);
            }
            other => panic!("{other:?}"),
        }
        let (seq, events) = recv_seq(&s);
        assert_eq!(seq, before + 1);
        match &events[..] {
            [Event::BlockStored(st)] => {
                assert_eq!(st.token_ids[..2], prompt[48..]);
                assert_eq!(st.token_ids[2..], served.output[..14]);
            }
            other => panic!("{other:?}"),
        }
        // Again: 48 tokens hit (the last prompt block was never full: 50 = 3×16 + 2).
        assert_eq!(engine.serve(&prompt, None, 0).expect("room").hit_tokens, 48);

        // A dropped batch: the next one arrives with a gap, replay has both.
        engine.drop_next_batches(1);
        let dropped = engine.next_seq();
        engine
            .serve(&(6000..6032).collect::<Vec<_>>(), None, 0)
            .expect("room");
        engine
            .serve(&(7000..7032).collect::<Vec<_>>(), None, 0)
            .expect("room");
        let (seq, _) = recv_seq(&s);
        assert_eq!(seq, dropped + 1, "the dropped batch was not sent");
        assert_eq!(
            replay(&ctx, engine.replay_port().expect("replay"), dropped),
            vec![dropped, dropped + 1]
        );

        // Restart on the same ports: seq from 0, an empty cache, other hashes.
        let (pub_port, replay_port) = (engine.pub_port(), engine.replay_port());
        engine.shutdown();
        let engine = Engine::start(EngineConfig {
            pub_port,
            replay_port,
            seed: 12,
            ..cfg
        })
        .expect("restart on the same ports");
        assert_eq!(engine.pub_port(), pub_port);
        let first = join(&engine, &s);
        assert!(first < 100, "seq starts again from 0, got {first}");
        assert_eq!(engine.peek_hit_tokens(&prompt, None), 0);
    }
}
