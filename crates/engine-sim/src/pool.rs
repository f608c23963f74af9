//! vLLM's block pool with prefix caching (`vllm/v1/core/block_pool.py`,
//! `single_type_kv_cache_manager.py`, `kv_cache_utils.py`), reduced to one full-attention KV
//! cache group and kept exact where the events depend on it:
//!
//! - block 0 is the null block, taken off the free queue at start; blocks 1..N start free in
//!   order;
//! - a request's full blocks are hashed in a chain (parent hash, the block's tokens, the LoRA
//!   adapter), by default with vLLM's own `sha256` ([`crate::vllm_hash`]); its longest cached prefix is found block by block, stopping at the first miss,
//!   and never covers the last prompt token (vLLM recomputes it for the logits), so a fully
//!   cached, block-aligned prompt recomputes — and re-announces — its last block;
//! - hit blocks are touched (taken off the free queue, reference count + 1) before new blocks are
//!   allocated from the head of the free queue; a new block that still carries a hash is
//!   evicted: one `BlockRemoved` per block, in allocation order;
//! - newly full blocks are cached in one `BlockStored` per call with the parent's hash (nil at
//!   the prompt start) and the blocks' tokens; several blocks may carry the same hash (the map
//!   keeps each), and evicting one of them announces the hash as removed;
//! - a finished request's blocks are released tail first: reference count − 1, and blocks that
//!   reach 0 join the tail of the free queue, so its last blocks are the first to be evicted.
//!
//! Two ways in. [`BlockPool::start`] / [`BlockPool::append`] / [`BlockPool::finish`] take a
//! whole prompt at once (the old one-shot engine). The scheduler's path follows vLLM's
//! `KVCacheManager` step by step: [`BlockPool::request`] hashes a waiting request,
//! [`BlockPool::computed_blocks`] finds its cached prefix when it leaves the waiting queue,
//! [`BlockPool::allocate_slots`] gives it blocks for the tokens scheduled in this step (a
//! prefill chunk, then one decode token at a time: touch, evict, allocate, then `BlockStored`
//! for the blocks these tokens fill, at allocation, before they are computed, as vLLM does),
//! [`BlockPool::push_token`] appends a sampled token, and [`BlockPool::free`] releases the
//! blocks tail first on finish, abort or preemption (a preempted request keeps its tokens and
//! finds its prefix again when rescheduled).

use hashbrown::HashMap;
use kv_events::{BlockHash, BlockRemoved, BlockStored, ByteHash, Event, Medium};
use xxhash_rust::xxh3::xxh3_128_with_seed;

use crate::vllm_hash;

/// A block's position in the pool.
pub type BlockId = u32;
const NIL: BlockId = BlockId::MAX;

/// vLLM's internal block hash (32 bytes, as its sha256 is).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct EngineHash(pub [u8; 32]);

/// How hashes go on the wire: vLLM's default (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`) sends the
/// last 8 bytes as an unsigned integer, otherwise the 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum HashForm {
    #[default]
    Int,
    Bytes,
}

impl HashForm {
    /// The event form of an engine hash.
    pub fn external(self, h: &EngineHash) -> BlockHash {
        match self {
            HashForm::Int => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h.0[24..]);
                BlockHash::Uint(u64::from_be_bytes(b))
            }
            HashForm::Bytes => {
                BlockHash::Bytes(ByteHash::new(&h.0).expect("32 bytes fit a ByteHash"))
            }
        }
    }
}

/// How the pool hashes blocks.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HashAlgo {
    /// vLLM's `sha256` or `sha256_cbor` ([`crate::vllm_hash`]), chained from `none_hash`
    /// (vLLM's `NONE_HASH`): the hashes a real vLLM publishes for the same tokens.
    Vllm {
        algo: vllm_hash::Algo,
        none_hash: [u8; 32],
    },
    /// A cheaper stand-in (two xxh3-128 over the parent, tokens and LoRA name), keyed by `seed`:
    /// equality semantics only, not vLLM's bits.
    Xxh3 { seed: u64 },
}

impl HashAlgo {
    /// vLLM's default `sha256` with `NONE_HASH` as vLLM derives it: `seed` 0 plays
    /// `PYTHONHASHSEED` unset (the fixed `"vllm-none-hash"`, shared by every vLLM), any other
    /// value plays `PYTHONHASHSEED=<seed>`.
    pub fn vllm(seed: u64) -> HashAlgo {
        HashAlgo::vllm_with(vllm_hash::Algo::Sha256, seed)
    }

    /// [`HashAlgo::vllm`] with another of vLLM's algorithms.
    pub fn vllm_with(algo: vllm_hash::Algo, seed: u64) -> HashAlgo {
        let none_hash = if seed == 0 {
            vllm_hash::none_hash(algo, vllm_hash::DEFAULT_NONE_HASH_SEED)
        } else {
            vllm_hash::none_hash(algo, &seed.to_string())
        };
        HashAlgo::Vllm { algo, none_hash }
    }
}

/// A LoRA adapter a request runs under (vLLM's `LoRARequest`: id, name and path; vLLM 0.33
/// hashes the name and the path into every block).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lora {
    pub id: i64,
    pub name: String,
    pub path: String,
}

#[derive(Clone, Debug)]
struct Block {
    ref_cnt: u32,
    hash: Option<EngineHash>,
    prev: BlockId,
    next: BlockId,
    in_free_queue: bool,
}

/// The pool has fewer free blocks than a request needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the block pool has {free} free blocks, the request needs {needed}")]
pub struct PoolFull {
    pub needed: usize,
    pub free: usize,
}

/// A running request: its tokens (prompt, then output), the hashes of its full blocks and the
/// blocks it holds.
#[derive(Debug, Clone)]
pub struct Request {
    tokens: Vec<u32>,
    hashes: Vec<EngineHash>,
    blocks: Vec<BlockId>,
    num_cached: usize,
    lora: Option<Lora>,
    /// Prompt tokens served from the cache.
    pub hit_tokens: usize,
    pub prompt_tokens: usize,
}

impl Request {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Blocks held (hit blocks included).
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    pub fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }
}

/// The block pool.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    algo: HashAlgo,
    form: HashForm,
    blocks: Vec<Block>,
    head: BlockId,
    tail: BlockId,
    free_len: usize,
    cached: HashMap<EngineHash, Vec<BlockId>>,
    events: Vec<Event>,
    scratch: Vec<u8>,
}

impl BlockPool {
    /// `num_blocks` blocks (block 0 becomes the null block), hashing as vLLM does
    /// ([`HashAlgo::vllm`]): `seed` 0 gives every pool vLLM's default `NONE_HASH`, another
    /// value plays `PYTHONHASHSEED`, so two engines seeded apart hash differently.
    pub fn new(num_blocks: usize, block_size: usize, seed: u64, form: HashForm) -> BlockPool {
        BlockPool::with_algo(num_blocks, block_size, HashAlgo::vllm(seed), form)
    }

    /// A pool hashing with `algo`.
    pub fn with_algo(
        num_blocks: usize,
        block_size: usize,
        algo: HashAlgo,
        form: HashForm,
    ) -> BlockPool {
        assert!(num_blocks >= 2 && block_size >= 1, "a pool needs blocks");
        let n = num_blocks as BlockId;
        let blocks = (0..n)
            .map(|i| Block {
                ref_cnt: 0,
                hash: None,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
                in_free_queue: true,
            })
            .collect();
        let mut pool = BlockPool {
            block_size,
            algo,
            form,
            blocks,
            head: 0,
            tail: n - 1,
            free_len: num_blocks,
            cached: HashMap::new(),
            events: Vec::new(),
            scratch: Vec::new(),
        };
        // The null block.
        let null = pool.pop_free();
        debug_assert_eq!(null, 0);
        pool.blocks[0].ref_cnt = 1;
        pool
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn hash_algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn hash_form(&self) -> HashForm {
        self.form
    }

    /// Blocks a new request could take (free, cached or not).
    pub fn free_blocks(&self) -> usize {
        self.free_len
    }

    /// Blocks that carry a hash.
    pub fn cached_blocks(&self) -> usize {
        self.cached.values().map(Vec::len).sum()
    }

    /// Events waiting for [`BlockPool::take_events`].
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// The events since the last call (one engine step's worth).
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// The chained hashes of the full blocks of `tokens`.
    pub fn block_hashes(&mut self, tokens: &[u32], lora: Option<&Lora>) -> Vec<EngineHash> {
        let mut out = Vec::with_capacity(tokens.len() / self.block_size);
        for chunk in tokens.chunks_exact(self.block_size) {
            let parent = out.last().copied();
            out.push(self.hash_block(parent, chunk, lora));
        }
        out
    }

    fn hash_block(
        &mut self,
        parent: Option<EngineHash>,
        tokens: &[u32],
        lora: Option<&Lora>,
    ) -> EngineHash {
        let seed = match self.algo {
            HashAlgo::Vllm { algo, none_hash } => {
                let p = parent.map_or(none_hash, |p| p.0);
                let name = lora.map(|l| (l.name.as_str(), l.path.as_str()));
                return EngineHash(vllm_hash::hash_block_tokens_lora(
                    algo,
                    &mut self.scratch,
                    &p,
                    tokens,
                    name,
                ));
            }
            HashAlgo::Xxh3 { seed } => seed,
        };
        let buf = &mut self.scratch;
        buf.clear();
        match parent {
            Some(p) => buf.extend_from_slice(&p.0),
            None => buf.extend_from_slice(&[0xa5; 32]),
        }
        for t in tokens {
            buf.extend_from_slice(&t.to_le_bytes());
        }
        if let Some(l) = lora {
            buf.extend_from_slice(l.name.as_bytes());
        }
        let lo = xxh3_128_with_seed(buf, seed).to_le_bytes();
        let hi = xxh3_128_with_seed(buf, seed ^ 0x9e37_79b9_7f4a_7c15).to_le_bytes();
        let mut h = [0u8; 32];
        h[..16].copy_from_slice(&lo);
        h[16..].copy_from_slice(&hi);
        EngineHash(h)
    }

    /// Leading full blocks of `tokens` that are cached (no cap, nothing touched): what a
    /// router with perfect knowledge would see.
    pub fn cached_prefix_blocks(&mut self, tokens: &[u32], lora: Option<&Lora>) -> usize {
        let hashes = self.block_hashes(tokens, lora);
        hashes
            .iter()
            .take_while(|h| self.cached.contains_key(*h))
            .count()
    }

    /// Prompt tokens a request for `tokens` would find cached now (vLLM's cap included).
    pub fn peek_hit_tokens(&mut self, tokens: &[u32], lora: Option<&Lora>) -> usize {
        let max_blocks = tokens.len().saturating_sub(1) / self.block_size;
        self.cached_prefix_blocks(tokens, lora).min(max_blocks) * self.block_size
    }

    /// Schedules a request's prompt: finds its cached prefix, takes the hit blocks, allocates
    /// the rest (evicting), and caches every full prompt block.
    pub fn start(&mut self, prompt: &[u32], lora: Option<Lora>) -> Result<Request, PoolFull> {
        let bs = self.block_size;
        let hashes = self.block_hashes(prompt, lora.as_ref());
        let max_blocks = prompt.len().saturating_sub(1) / bs;
        let hit: Vec<BlockId> = hashes[..max_blocks.min(hashes.len())]
            .iter()
            .map_while(|h| self.cached.get(h).map(|bs| bs[0]))
            .collect();
        let needed = prompt.len().div_ceil(bs) - hit.len();
        let free_hits = hit
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_cnt == 0)
            .count();
        if needed > self.free_len - free_hits {
            return Err(PoolFull {
                needed,
                free: self.free_len - free_hits,
            });
        }
        for &b in &hit {
            self.touch(b);
        }
        let mut req = Request {
            tokens: prompt.to_vec(),
            hashes,
            num_cached: hit.len(),
            hit_tokens: hit.len() * bs,
            prompt_tokens: prompt.len(),
            blocks: hit,
            lora,
        };
        self.allocate(&mut req, needed);
        self.cache_full_blocks(&mut req);
        Ok(req)
    }

    /// One decode step: `token` is appended; a block is allocated when the sequence outgrows its
    /// blocks, and cached when it becomes full.
    pub fn append(&mut self, req: &mut Request, token: u32) -> Result<(), PoolFull> {
        if req.tokens.len() == req.blocks.len() * self.block_size {
            if self.free_len == 0 {
                return Err(PoolFull { needed: 1, free: 0 });
            }
            self.allocate(req, 1);
        }
        req.tokens.push(token);
        if req.tokens.len() % self.block_size == 0 {
            let start = req.tokens.len() - self.block_size;
            let parent = req.hashes.last().copied();
            let h = self.hash_block(parent, &req.tokens[start..], req.lora.as_ref());
            req.hashes.push(h);
            self.cache_full_blocks(req);
        }
        Ok(())
    }

    /// Releases a finished request's blocks, tail first.
    pub fn finish(&mut self, mut req: Request) {
        self.free(&mut req);
    }

    /// A request as it enters vLLM's waiting queue: its tokens hashed block by block, no block
    /// held. The scheduler then drives it with [`BlockPool::computed_blocks`],
    /// [`BlockPool::allocate_slots`], [`BlockPool::push_token`] and [`BlockPool::free`].
    pub fn request(&mut self, prompt: &[u32], lora: Option<Lora>) -> Request {
        let hashes = self.block_hashes(prompt, lora.as_ref());
        Request {
            tokens: prompt.to_vec(),
            hashes,
            blocks: Vec::new(),
            num_cached: 0,
            lora,
            hit_tokens: 0,
            prompt_tokens: prompt.len(),
        }
    }

    /// vLLM's `get_computed_blocks` for a request holding no blocks: its longest cached prefix
    /// of full blocks, never covering its last token. Nothing is touched.
    pub fn computed_blocks(&self, req: &Request) -> Vec<BlockId> {
        let max_blocks = req.tokens.len().saturating_sub(1) / self.block_size;
        req.hashes[..max_blocks.min(req.hashes.len())]
            .iter()
            .map_while(|h| self.cached.get(h).map(|bs| bs[0]))
            .collect()
    }

    /// vLLM's `allocate_slots`: makes `req` hold blocks for its first `num_computed +
    /// num_new` tokens, taking `new_computed` (from [`BlockPool::computed_blocks`], only when it
    /// holds none) before allocating from the free queue (evicting), then caches the full
    /// blocks among those tokens. Nothing changes when the free blocks do not suffice.
    pub fn allocate_slots(
        &mut self,
        req: &mut Request,
        new_computed: &[BlockId],
        num_computed: usize,
        num_new: usize,
    ) -> Result<(), PoolFull> {
        debug_assert!(new_computed.is_empty() || req.blocks.is_empty());
        let upto = num_computed + num_new;
        let needed = upto
            .div_ceil(self.block_size)
            .saturating_sub(req.blocks.len() + new_computed.len());
        let free_hits = new_computed
            .iter()
            .filter(|&&b| self.blocks[b as usize].ref_cnt == 0)
            .count();
        let free = self.free_len - free_hits;
        if needed > free {
            return Err(PoolFull { needed, free });
        }
        for &b in new_computed {
            self.touch(b);
        }
        req.blocks.extend_from_slice(new_computed);
        if !new_computed.is_empty() {
            req.num_cached = req.blocks.len();
        }
        self.allocate(req, needed);
        self.cache_blocks(req, upto);
        Ok(())
    }

    /// Appends a sampled token to `req` (hashing a block it fills); blocks come with
    /// [`BlockPool::allocate_slots`] when the token is computed.
    pub fn push_token(&mut self, req: &mut Request, token: u32) {
        req.tokens.push(token);
        if req.tokens.len() % self.block_size == 0 {
            let start = req.tokens.len() - self.block_size;
            let parent = req.hashes.last().copied();
            let h = self.hash_block(parent, &req.tokens[start..], req.lora.as_ref());
            req.hashes.push(h);
        }
    }

    /// Releases `req`'s blocks tail first (vLLM's `free`, on finish, abort or preemption); it
    /// keeps its tokens and hashes and can be scheduled again.
    pub fn free(&mut self, req: &mut Request) {
        for &b in req.blocks.iter().rev() {
            let blk = &mut self.blocks[b as usize];
            blk.ref_cnt -= 1;
            if blk.ref_cnt == 0 {
                self.push_free(b);
            }
        }
        req.blocks.clear();
        req.num_cached = 0;
    }

    /// Blocks in the pool, the null block included.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// vLLM's `reset_prefix_cache`: refused (false) while a request holds blocks; otherwise
    /// every hash is dropped and `AllBlocksCleared` announced.
    pub fn reset(&mut self) -> bool {
        if self.free_len + 1 != self.blocks.len() {
            return false;
        }
        self.cached.clear();
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.events.push(Event::AllBlocksCleared);
        true
    }

    fn touch(&mut self, b: BlockId) {
        if self.blocks[b as usize].ref_cnt == 0 {
            self.unlink(b);
        }
        self.blocks[b as usize].ref_cnt += 1;
    }

    fn allocate(&mut self, req: &mut Request, n: usize) {
        for _ in 0..n {
            let b = self.pop_free();
            if let Some(h) = self.blocks[b as usize].hash.take() {
                if let Some(holders) = self.cached.get_mut(&h) {
                    if let Some(i) = holders.iter().position(|&x| x == b) {
                        holders.swap_remove(i);
                        if holders.is_empty() {
                            self.cached.remove(&h);
                        }
                        self.events.push(Event::BlockRemoved(BlockRemoved {
                            block_hashes: vec![self.form.external(&h)],
                            medium: Some(Medium::Gpu),
                            ..Default::default()
                        }));
                    }
                }
            }
            self.blocks[b as usize].ref_cnt = 1;
            req.blocks.push(b);
        }
    }

    fn cache_full_blocks(&mut self, req: &mut Request) {
        let n = req.tokens.len();
        self.cache_blocks(req, n);
    }

    /// vLLM's `cache_blocks(request, num_tokens_to_cache)`: the full blocks among the first
    /// `upto` tokens that are not cached yet, in one `BlockStored`.
    fn cache_blocks(&mut self, req: &mut Request, upto: usize) {
        let bs = self.block_size;
        let full = upto.min(req.tokens.len()) / bs;
        if full <= req.num_cached {
            return;
        }
        let from = req.num_cached;
        let mut hashes = Vec::with_capacity(full - from);
        for i in from..full {
            let b = req.blocks[i];
            let h = req.hashes[i];
            debug_assert!(self.blocks[b as usize].hash.is_none());
            self.blocks[b as usize].hash = Some(h);
            self.cached.entry(h).or_default().push(b);
            hashes.push(self.form.external(&h));
        }
        self.events.push(Event::BlockStored(BlockStored {
            block_hashes: hashes,
            parent_block_hash: (from > 0).then(|| self.form.external(&req.hashes[from - 1])),
            token_ids: req.tokens[from * bs..full * bs].to_vec(),
            block_size: bs as u32,
            lora_id: req.lora.as_ref().map(|l| l.id),
            medium: Some(Medium::Gpu),
            lora_name: req.lora.as_ref().map(|l| l.name.clone()),
            ..Default::default()
        }));
        req.num_cached = full;
    }

    fn pop_free(&mut self) -> BlockId {
        let b = self.head;
        debug_assert_ne!(b, NIL, "pop from an empty free queue");
        self.unlink(b);
        b
    }

    fn unlink(&mut self, b: BlockId) {
        let (prev, next) = {
            let blk = &mut self.blocks[b as usize];
            debug_assert!(blk.in_free_queue);
            blk.in_free_queue = false;
            (
                std::mem::replace(&mut blk.prev, NIL),
                std::mem::replace(&mut blk.next, NIL),
            )
        };
        match prev {
            NIL => self.head = next,
            p => self.blocks[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.blocks[n as usize].prev = prev,
        }
        self.free_len -= 1;
    }

    fn push_free(&mut self, b: BlockId) {
        let tail = self.tail;
        {
            let blk = &mut self.blocks[b as usize];
            debug_assert!(!blk.in_free_queue);
            blk.in_free_queue = true;
            blk.prev = tail;
            blk.next = NIL;
        }
        match tail {
            NIL => self.head = b,
            t => self.blocks[t as usize].next = b,
        }
        self.tail = b;
        self.free_len += 1;
    }

    /// Checks the free queue against the reference counts (tests).
    pub fn check(&self) {
        let mut n = 0;
        let mut cur = self.head;
        let mut prev = NIL;
        while cur != NIL {
            let b = &self.blocks[cur as usize];
            assert!(
                b.in_free_queue && b.ref_cnt == 0,
                "block {cur} in the free queue"
            );
            assert_eq!(b.prev, prev);
            prev = cur;
            cur = b.next;
            n += 1;
        }
        assert_eq!(prev, self.tail);
        assert_eq!(n, self.free_len);
        let outside = self.blocks.iter().filter(|b| !b.in_free_queue).count();
        assert_eq!(outside + n, self.blocks.len());
        for (h, bs) in &self.cached {
            for &b in bs {
                assert_eq!(self.blocks[b as usize].hash.as_ref(), Some(h));
            }
        }
    }
}
