//! Paged KV bookkeeping: which cache blocks hold what. Ids only; the tensors live in the
//! backend's cache, indexed by the block ids handed out here.
//!
//! - Blocks have a reference count; a sequence holds one reference to each block of its
//!   block table, and a prefix hit adds a reference to a block another sequence filled.
//! - A full block gets the hash of its contents chained to its parent's
//!   ([`hash_block`]). When its last reference goes, the block joins the back of the free
//!   queue *keeping its hash*, so a later request with the same prefix can take it back
//!   ([`BlockPool::acquire_cached`]) until allocation reaches it at the front of the queue
//!   (least recently freed first) and forgets the hash.

use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};

/// 128 bits of SHA-256 over (parent, extra key, tokens): collisions are not a practical concern.
pub type BlockHash = [u8; 16];

/// Hash of one full block given its parent's hash (`None` for the first block) and an extra
/// key (a tenant salt, an adapter id; 0 when unused).
pub fn hash_block(parent: Option<&BlockHash>, extra: u64, tokens: &[u32]) -> BlockHash {
    let mut h = Sha256::new();
    h.update(parent.map_or([0u8; 16], |p| *p));
    h.update(extra.to_le_bytes());
    for t in tokens {
        h.update(t.to_le_bytes());
    }
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Blocks looked up in the prefix cache.
    pub queries: u64,
    /// Of those, found.
    pub hits: u64,
}

pub struct BlockPool {
    block_size: usize,
    /// `[num_blocks]`
    refs: Vec<u32>,
    /// `[num_blocks]` hash of a full block's contents, kept while free
    hashes: Vec<Option<BlockHash>>,
    /// `[num_blocks]` bumped each time a block enters the free queue; queue entries with an
    /// older generation are stale (the block was taken back from the cache meanwhile)
    generation: Vec<u32>,
    free: VecDeque<(u32, u32)>,
    num_free: usize,
    cached: HashMap<BlockHash, u32>,
    pub stats: PoolStats,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        BlockPool {
            block_size,
            refs: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            generation: vec![0; num_blocks],
            free: (0..num_blocks as u32).map(|b| (b, 0)).collect(),
            num_free: num_blocks,
            cached: HashMap::new(),
            stats: PoolStats::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.refs.len()
    }

    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free
    }

    fn is_free(&self, b: u32) -> bool {
        self.refs[b as usize] == 0
    }

    /// A fresh block (its old cached contents forgotten), or `None` when all are in use.
    pub fn allocate(&mut self) -> Option<u32> {
        while let Some((b, g)) = self.free.pop_front() {
            if !self.is_free(b) || self.generation[b as usize] != g {
                continue; // stale entry
            }
            if let Some(h) = self.hashes[b as usize].take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                }
            }
            self.refs[b as usize] = 1;
            self.num_free -= 1;
            return Some(b);
        }
        None
    }

    /// Take a reference to the cached block with this hash, if any (a prefix hit).
    pub fn acquire_cached(&mut self, h: &BlockHash) -> Option<u32> {
        self.stats.queries += 1;
        let &b = self.cached.get(h)?;
        self.stats.hits += 1;
        if self.is_free(b) {
            self.num_free -= 1; // its queue entry goes stale
        }
        self.refs[b as usize] += 1;
        Some(b)
    }

    /// Record that a block is full and holds the contents `h` describes.
    pub fn set_hash(&mut self, b: u32, h: BlockHash) {
        self.hashes[b as usize] = Some(h);
        self.cached.entry(h).or_insert(b);
    }

    /// Drop one reference; a block nobody holds goes to the back of the free queue.
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released twice");
        *r = r.saturating_sub(1);
        if *r == 0 {
            let g = &mut self.generation[b as usize];
            *g = g.wrapping_add(1);
            self.free.push_back((b, *g));
            self.num_free += 1;
        }
    }

    pub fn release_all(&mut self, blocks: &mut Vec<u32>) {
        // newest blocks first, so a sequence's tail is reused before its shareable head
        for b in blocks.drain(..).rev() {
            self.release(b);
        }
    }
}

/// Test-only views of the pool, for the scheduler's model-based test.
#[cfg(test)]
impl BlockPool {
    pub(crate) fn refcount(&self, b: u32) -> u32 {
        self.refs[b as usize]
    }

    /// The hash a block's contents were registered under (kept while free, until reused).
    pub(crate) fn hash_of(&self, b: u32) -> Option<BlockHash> {
        self.hashes[b as usize]
    }

    /// The pool's own bookkeeping agrees with itself: the free count, one live free-queue
    /// entry per free block, and every prefix-cache entry naming a block that holds its hash.
    pub(crate) fn check_invariants(&self) {
        let n = self.num_blocks();
        assert_eq!(self.hashes.len(), n);
        assert_eq!(self.generation.len(), n);
        let free = self.refs.iter().filter(|&&r| r == 0).count();
        assert_eq!(
            self.num_free, free,
            "num_free against the blocks with no reference"
        );
        let mut live = vec![0usize; n];
        for &(b, g) in &self.free {
            if self.generation[b as usize] == g {
                live[b as usize] += 1;
            }
        }
        for (b, (&r, &l)) in self.refs.iter().zip(&live).enumerate() {
            let want = if r == 0 { 1 } else { l.min(1) };
            assert_eq!(
                l, want,
                "block {b} (refs {r}) has {l} live free-queue entries"
            );
        }
        for (h, &b) in &self.cached {
            assert_eq!(
                self.hashes[b as usize],
                Some(*h),
                "prefix-cache entry names block {b}, which holds another hash"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_exhaust() {
        let mut p = BlockPool::new(3, 16);
        let a: Vec<u32> = (0..3).map(|_| p.allocate().unwrap()).collect();
        assert_eq!(p.allocate(), None);
        assert_eq!(p.num_free(), 0);
        p.release(a[1]);
        assert_eq!(p.num_free(), 1);
        assert_eq!(p.allocate(), Some(a[1]));
    }

    #[test]
    fn freed_blocks_keep_their_hash_until_reused() {
        let mut p = BlockPool::new(2, 4);
        let h1 = hash_block(None, 0, &[1, 2, 3, 4]);
        let h2 = hash_block(Some(&h1), 0, &[5, 6, 7, 8]);
        assert_ne!(
            h1,
            hash_block(None, 1, &[1, 2, 3, 4]),
            "the extra key separates tenants"
        );
        let b1 = p.allocate().unwrap();
        p.set_hash(b1, h1);
        p.release(b1);
        assert_eq!(p.num_free(), 2);
        // a hit takes it back out of the free queue
        assert_eq!(p.acquire_cached(&h1), Some(b1));
        assert_eq!(p.num_free(), 1);
        assert_eq!(p.acquire_cached(&h2), None);
        assert_eq!(
            p.stats,
            PoolStats {
                queries: 2,
                hits: 1
            }
        );
        // shared: two references, freed after both go
        assert_eq!(p.acquire_cached(&h1), Some(b1));
        p.release(b1);
        assert_eq!(p.num_free(), 1);
        p.release(b1);
        assert_eq!(p.num_free(), 2);
        // allocation takes the other block first (least recently freed), then evicts b1's hash
        let other = p.allocate().unwrap();
        assert_ne!(other, b1);
        assert_eq!(p.allocate(), Some(b1));
        p.release(b1);
        assert_eq!(p.acquire_cached(&h1), None);
    }
}
