//! Reconnect backoff with jitter: the delay before a subscriber's sockets are recreated after an
//! idle timeout (libzmq's own reconnects use the same start and cap).

use std::time::Duration;

/// Reconnect backoff: `start × factor^attempt`, capped, with jitter in [½, 1] of that.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub start: Duration,
    pub cap: Duration,
    pub factor: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            start: Duration::from_millis(100),
            cap: Duration::from_secs(10),
            factor: 2.0,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based), given a random `u64`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let base = self.start.as_secs_f64() * self.factor.max(1.0).powi(attempt.min(64) as i32);
        let base = base.min(self.cap.as_secs_f64());
        let jitter = 0.5 + 0.5 * (random >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(base * jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_factor_to_the_cap_with_jitter_in_half_to_full() {
        let b = Backoff {
            start: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            factor: 3.0,
        };
        for (attempt, base_ms) in [
            (0, 100.0),
            (1, 300.0),
            (2, 900.0),
            (3, 2000.0),
            (30, 2000.0),
        ] {
            for r in [0u64, u64::MAX / 3, u64::MAX] {
                let d = b.delay(attempt, r).as_secs_f64() * 1000.0;
                assert!(
                    d >= base_ms * 0.5 - 1e-6 && d <= base_ms + 1e-6,
                    "attempt {attempt}: {d} ms not in [{}, {base_ms}]",
                    base_ms * 0.5
                );
            }
        }
        assert_ne!(
            b.delay(1, 1 << 40),
            b.delay(1, u64::MAX >> 1),
            "jitter varies"
        );
    }
}
