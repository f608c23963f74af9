//! The router's own block hash chain and the hasher for u64-keyed maps.

use std::hash::{BuildHasher, Hasher};
use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3Builder};

/// The seed every kvsync replica uses unless configured otherwise: replicas must agree.
pub const DEFAULT_SEED: u64 = 0x6b76_7379_6e63_0001;

/// The root of a context's chain (`h_{-1}`): fixed for a seed, model and LoRA.
pub fn context_root(seed: u64, model: &str, lora: Option<&str>) -> u64 {
    let mut h = Xxh3Builder::new().with_seed(seed).build();
    h.write(model.as_bytes());
    h.write(&[0xff]);
    if let Some(l) = lora {
        h.write(&[1]);
        h.write(l.as_bytes());
    } else {
        h.write(&[0]);
    }
    h.finish()
}

/// Computes `h_i = xxh3_64(seed, h_{i-1} ‖ tokens of block i as u32 LE)` for one block.
#[derive(Debug, Default)]
pub struct ChainHasher {
    buf: Vec<u8>,
}

impl ChainHasher {
    #[inline]
    pub fn next(&mut self, seed: u64, prev: u64, tokens: &[u32]) -> u64 {
        self.buf.clear();
        self.buf.extend_from_slice(&prev.to_le_bytes());
        for t in tokens {
            self.buf.extend_from_slice(&t.to_le_bytes());
        }
        xxh3_64_with_seed(&self.buf, seed)
    }

    /// The chain of every full block of `tokens`, appended to `out`.
    pub fn chain(
        &mut self,
        seed: u64,
        root: u64,
        block_size: usize,
        tokens: &[u32],
        out: &mut Vec<u64>,
    ) {
        let mut prev = root;
        for block in tokens.chunks_exact(block_size) {
            prev = self.next(seed, prev, block);
            out.push(prev);
        }
    }
}

/// A fast hasher for keys that are already u64 hashes (or small test integers): one folded
/// 128-bit multiply, so both the high and the low bits mix well.
#[derive(Debug, Default, Clone, Copy)]
pub struct MixHasher(u64);

impl Hasher for MixHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        let m = u128::from(self.0 ^ x ^ 0x243f_6a88_85a3_08d3) * 0x9e37_79b9_7f4a_7c15;
        self.0 = (m as u64) ^ ((m >> 64) as u64);
    }

    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.write_u64(u64::from(x));
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Mix;

impl BuildHasher for Mix {
    type Hasher = MixHasher;
    #[inline]
    fn build_hasher(&self) -> MixHasher {
        MixHasher(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_every_earlier_block_and_the_context() {
        let mut h = ChainHasher::default();
        let root = context_root(DEFAULT_SEED, "m", None);
        let mut a = Vec::new();
        h.chain(DEFAULT_SEED, root, 2, &[1, 2, 3, 4, 5], &mut a);
        assert_eq!(a.len(), 2, "only full blocks are hashed");
        let mut b = Vec::new();
        h.chain(DEFAULT_SEED, root, 2, &[9, 2, 3, 4], &mut b);
        assert_ne!(a[0], b[0]);
        assert_ne!(a[1], b[1], "block 1 differs because block 0 does");
        assert_ne!(root, context_root(DEFAULT_SEED, "m", Some("lora")));
        assert_ne!(root, context_root(DEFAULT_SEED, "n", None));
        // Reproducible: the same inputs give the same chain in every process.
        let mut c = Vec::new();
        h.chain(DEFAULT_SEED, root, 2, &[1, 2, 3, 4], &mut c);
        assert_eq!(c, a);
    }
}
