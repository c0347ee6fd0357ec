//! Inclusion proofs made while streaming the log, without keeping every leaf
//! (`audit prove`, and the records an evidence report cites).
//!
//! Keeping all leaf hashes costs 32 bytes a record (320 MB for 10 million
//! records). Here a pass keeps only the subtree roots the cited records'
//! audit paths need: when a record is cited, the Merkle frontier at
//! that moment holds exactly its left siblings; its right siblings are the
//! perfect subtrees that complete later (caught as they complete); the partial
//! subtrees at the right edge come from the frontier at the newest checkpoint's
//! size. Memory: O(cited × log n) hashes. Starting from a retention anchor's
//! frontier, records after a retention deletion are provable too. Every proof
//! made is checked with [`verify_inclusion_proof`] before it is handed out
//! (fails closed).

use std::collections::HashMap;

use super::{
    checkpoint::Checkpoint,
    merkle::{self, Frontier, node_hash},
    proof::{InclusionProof, verify_inclusion_proof},
    record::Hash,
};

/// A perfect subtree: `level` (0 = a leaf) and its index at that level.
type Block = (u32, u64);
/// The right edge of the tree with positions: (level, index, root), largest first.
type Edge = Vec<(u32, u64, Hash)>;

#[derive(Debug, Default)]
pub(crate) struct PathCollector {
    /// The right edge with positions: (level, index, hash), largest first.
    stack: Edge,
    size: u64,
    /// Subtree roots cited records need (`None` until they complete).
    known: HashMap<Block, Option<Hash>>,
    /// The right edge when the newest checkpoint was reached, and that checkpoint.
    at_checkpoint: Option<(Edge, Checkpoint)>,
}

impl PathCollector {
    /// Starts after `frontier` (the retention anchor's, or empty for seq 0).
    pub fn starting_at(frontier: &Frontier) -> PathCollector {
        let size = frontier.size();
        let mut stack = Vec::with_capacity(frontier.nodes().len());
        let mut nodes = frontier.nodes().iter();
        for level in (0..64u32).rev() {
            if size >> level & 1 == 1 {
                let index = size >> (level + 1) << 1;
                let hash = *nodes.next().expect("a node per set bit");
                stack.push((level, index, hash));
            }
        }
        PathCollector {
            stack,
            size,
            ..PathCollector::default()
        }
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Marks the next leaf (seq = `size()`) as cited: remembers its left
    /// siblings and asks for its right ones. Call before [`Self::push`].
    pub fn cite_next(&mut self) {
        for &(level, index, hash) in &self.stack {
            self.known.insert((level, index), Some(hash));
        }
        let i = self.size;
        // 2^48 records is beyond any log; higher levels are never needed.
        for level in 0..48u32 {
            if (i >> level) & 1 == 0 {
                self.known.entry((level, (i >> level) + 1)).or_insert(None);
            }
        }
    }

    /// A checkpoint record was reached (before it is pushed): keep the edge.
    pub fn checkpoint(&mut self, cp: Checkpoint) {
        if cp.size == self.size {
            self.at_checkpoint = Some((self.stack.clone(), cp));
        }
    }

    /// Adds the next record hash as a leaf.
    pub fn push(&mut self, record_hash: &Hash) {
        let mut node = (0u32, self.size, merkle::leaf_hash(record_hash));
        self.complete(node);
        while let Some(&(level, index, left)) = self.stack.last() {
            if level != node.0 || index + 1 != node.1 {
                break;
            }
            self.stack.pop();
            node = (level + 1, index >> 1, node_hash(&left, &node.2));
            self.complete(node);
        }
        self.stack.push(node);
        self.size += 1;
    }

    fn complete(&mut self, (level, index, hash): (u32, u64, Hash)) {
        if let Some(slot) = self.known.get_mut(&(level, index)) {
            *slot = Some(hash);
        }
    }

    /// The proof for cited record `seq` (its stored line `record`) against the
    /// newest checkpoint, checked before it is returned.
    pub fn proof(&self, seq: u64, record: String) -> Result<InclusionProof, String> {
        let Some((edge, cp)) = &self.at_checkpoint else {
            return Err("no checkpoint in the log".into());
        };
        if seq >= cp.size {
            return Err(format!(
                "no checkpoint covers it yet (the newest covers seqs below {})",
                cp.size
            ));
        }
        let lookup = |level: u32, index: u64| -> Option<Hash> {
            edge.iter()
                .find(|(l, i, _)| *l == level && *i == index)
                .map(|(_, _, h)| *h)
                .or_else(|| self.known.get(&(level, index)).copied().flatten())
        };
        let mut path = Vec::new();
        audit_path(seq, 0, cp.size, &lookup, &mut path)
            .ok_or_else(|| format!("a subtree of the path of seq {seq} was not kept"))?;
        let proof = InclusionProof {
            v: 1,
            seq,
            record,
            path: path.iter().map(hex::encode).collect(),
            checkpoint: cp.clone(),
        };
        verify_inclusion_proof(&proof, None)?;
        Ok(proof)
    }
}

/// RFC 6962 PATH(m, D[a:b]) with subtree roots from `lookup`.
fn audit_path(
    m: u64,
    a: u64,
    b: u64,
    lookup: &impl Fn(u32, u64) -> Option<Hash>,
    out: &mut Vec<Hash>,
) -> Option<()> {
    if b - a <= 1 {
        return Some(());
    }
    let k = split(b - a);
    if m < a + k {
        audit_path(m, a, a + k, lookup, out)?;
        out.push(range_hash(a + k, b, lookup)?);
    } else {
        audit_path(m, a + k, b, lookup, out)?;
        out.push(range_hash(a, a + k, lookup)?);
    }
    Some(())
}

/// MTH(D[a:b]): a perfect aligned subtree is looked up, anything else is split.
fn range_hash(a: u64, b: u64, lookup: &impl Fn(u32, u64) -> Option<Hash>) -> Option<Hash> {
    let n = b - a;
    if n.is_power_of_two() && a.is_multiple_of(n) {
        let level = n.trailing_zeros();
        return lookup(level, a >> level);
    }
    let k = split(n);
    Some(node_hash(
        &range_hash(a, a + k, lookup)?,
        &range_hash(a + k, b, lookup)?,
    ))
}

/// Largest power of two strictly less than `n` (n >= 2).
fn split(n: u64) -> u64 {
    1 << (n - 1).ilog2()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rh(i: u64) -> Hash {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    /// Paths match the reference built from all leaves, for every leaf, tree
    /// size and starting point (as after retention).
    #[test]
    fn paths_match_the_reference_from_all_leaves() {
        for n in 1..70u64 {
            let leaves: Vec<Hash> = (0..n).map(|i| merkle::leaf_hash(&rh(i))).collect();
            for start in [0, 1, 3, 8, 13].into_iter().filter(|s| *s < n) {
                let mut f = Frontier::default();
                for i in 0..start {
                    f.push(&rh(i));
                }
                let mut c = PathCollector::starting_at(&f);
                for i in start..n {
                    c.cite_next();
                    c.push(&rh(i));
                }
                for i in start..n {
                    let lookup = |level: u32, index: u64| {
                        c.stack
                            .iter()
                            .find(|(l, x, _)| *l == level && *x == index)
                            .map(|(_, _, h)| *h)
                            .or_else(|| c.known.get(&(level, index)).copied().flatten())
                    };
                    let mut got = Vec::new();
                    audit_path(i, 0, n, &lookup, &mut got).expect("all subtrees kept");
                    let want = merkle::inclusion_proof(&leaves, i as usize).unwrap();
                    assert_eq!(got, want, "n {n} start {start} leaf {i}");
                }
            }
        }
    }
}
