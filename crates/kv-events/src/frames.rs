//! ZeroMQ multipart frames of vLLM's publisher: live messages and replay replies.

/// The seq of the replay end marker.
pub const REPLAY_END_SEQ: u64 = u64::MAX;

/// Why a multipart message is not one vLLM sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("{kind} message has {got} frames, expected {expected}")]
    FrameCount {
        kind: &'static str,
        got: usize,
        expected: &'static str,
    },
    #[error("sequence frame is {0} bytes, expected 8")]
    SeqLength(usize),
    #[error("replay reply does not start with the empty delimiter frame")]
    NoDelimiter,
    /// A batch under seq `0xff × 8`: vLLM counts batches from 0 and uses that seq only for the
    /// replay end marker (`END_SEQ` in `vllm/distributed/kv_events.py`); no seq follows it.
    #[error("batch under seq 0xffffffffffffffff, which only the replay end marker carries")]
    ReservedSeq,
}

/// A live PUB message `[topic, seq, payload]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveMessage<'a> {
    pub topic: &'a [u8],
    pub seq: u64,
    pub payload: &'a [u8],
}

/// One reply of the replay ROUTER, as a DEALER receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayMessage<'a> {
    /// `[b"", seq, payload]` (vLLM <= 0.25) or `[b"", topic, seq, payload]` (>= 0.26).
    Batch {
        topic: Option<&'a [u8]>,
        seq: u64,
        payload: &'a [u8],
    },
    /// The end of the replay: seq `0xff × 8` and an empty payload.
    End,
}

fn seq_of(frame: &[u8]) -> Result<u64, FrameError> {
    let b: [u8; 8] = frame
        .try_into()
        .map_err(|_| FrameError::SeqLength(frame.len()))?;
    Ok(u64::from_be_bytes(b))
}

/// A batch's seq: never the end marker's, so `seq + 1` always exists.
fn batch_seq(seq: u64) -> Result<u64, FrameError> {
    if seq == REPLAY_END_SEQ {
        return Err(FrameError::ReservedSeq);
    }
    Ok(seq)
}

/// Parses a live message.
pub fn parse_live<F: AsRef<[u8]>>(frames: &[F]) -> Result<LiveMessage<'_>, FrameError> {
    match frames {
        [topic, seq, payload] => Ok(LiveMessage {
            topic: topic.as_ref(),
            seq: batch_seq(seq_of(seq.as_ref())?)?,
            payload: payload.as_ref(),
        }),
        _ => Err(FrameError::FrameCount {
            kind: "live",
            got: frames.len(),
            expected: "3 (topic, seq, payload)",
        }),
    }
}

/// Parses one replay reply received on a DEALER socket.
pub fn parse_replay<F: AsRef<[u8]>>(frames: &[F]) -> Result<ReplayMessage<'_>, FrameError> {
    let (delim, rest) = frames.split_first().ok_or(FrameError::FrameCount {
        kind: "replay",
        got: 0,
        expected: "3 or 4",
    })?;
    if !delim.as_ref().is_empty() {
        return Err(FrameError::NoDelimiter);
    }
    let (topic, seq, payload) = match rest {
        [seq, payload] => (None, seq.as_ref(), payload.as_ref()),
        [topic, seq, payload] => (Some(topic.as_ref()), seq.as_ref(), payload.as_ref()),
        _ => {
            return Err(FrameError::FrameCount {
                kind: "replay",
                got: frames.len(),
                expected: "3 or 4 (delimiter, [topic,] seq, payload)",
            })
        }
    };
    let seq = seq_of(seq)?;
    if payload.is_empty() {
        // vLLM's end marker; an empty payload is never a batch.
        return Ok(ReplayMessage::End);
    }
    Ok(ReplayMessage::Batch {
        topic,
        seq: batch_seq(seq)?,
        payload,
    })
}

/// The frames a DEALER sends to ask for every buffered batch with seq >= `start_seq`.
pub fn replay_request(start_seq: u64) -> [Vec<u8>; 2] {
    [Vec::new(), start_seq.to_be_bytes().to_vec()]
}

/// The frames of a live message (for publishers in tests and the simulator).
pub fn live_frames(topic: &[u8], seq: u64, payload: Vec<u8>) -> [Vec<u8>; 3] {
    [topic.to_vec(), seq.to_be_bytes().to_vec(), payload]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_needs_three_frames_and_an_eight_byte_seq() {
        let ok = live_frames(b"kv", 7, vec![0x90]);
        assert_eq!(
            parse_live(&ok),
            Ok(LiveMessage {
                topic: b"kv",
                seq: 7,
                payload: &[0x90]
            })
        );
        assert!(matches!(
            parse_live(&ok[..2]),
            Err(FrameError::FrameCount { got: 2, .. })
        ));
        let short = [b"kv".to_vec(), vec![0; 7], vec![0x90]];
        assert_eq!(parse_live(&short), Err(FrameError::SeqLength(7)));
    }

    /// vLLM numbers batches from 0 (`itertools.count()`); seq 0xff × 8 is only ever the replay
    /// end marker's (`END_SEQ`, with an empty payload). A batch under it is malformed.
    #[test]
    fn a_batch_under_the_end_markers_seq_is_refused() {
        let max = u64::MAX.to_be_bytes().to_vec();
        let live = [b"kv".to_vec(), max.clone(), vec![0x90]];
        assert_eq!(parse_live(&live), Err(FrameError::ReservedSeq));
        let old = [vec![], max.clone(), vec![0x92]];
        let new = [vec![], b"kv".to_vec(), max.clone(), vec![0x92]];
        assert_eq!(parse_replay(&old), Err(FrameError::ReservedSeq));
        assert_eq!(parse_replay(&new), Err(FrameError::ReservedSeq));
        let below = (u64::MAX - 1).to_be_bytes().to_vec();
        assert!(parse_live(&[b"kv".to_vec(), below, vec![0x90]]).is_ok());
    }

    #[test]
    fn replay_with_and_without_topic_and_end_marker() {
        let seq = 3u64.to_be_bytes().to_vec();
        let old = [vec![], seq.clone(), vec![0x92]];
        assert_eq!(
            parse_replay(&old),
            Ok(ReplayMessage::Batch {
                topic: None,
                seq: 3,
                payload: &[0x92]
            })
        );
        let new = [vec![], b"kv".to_vec(), seq, vec![0x92]];
        assert_eq!(
            parse_replay(&new),
            Ok(ReplayMessage::Batch {
                topic: Some(b"kv"),
                seq: 3,
                payload: &[0x92]
            })
        );
        let end_old = [vec![], vec![0xff; 8], vec![]];
        let end_new = [vec![], vec![], vec![0xff; 8], vec![]];
        assert_eq!(parse_replay(&end_old), Ok(ReplayMessage::End));
        assert_eq!(parse_replay(&end_new), Ok(ReplayMessage::End));
        assert_eq!(
            parse_replay(&[vec![1], vec![0; 8], vec![0x90]]),
            Err(FrameError::NoDelimiter)
        );
        assert_eq!(replay_request(2)[1], vec![0, 0, 0, 0, 0, 0, 0, 2]);
    }
}
