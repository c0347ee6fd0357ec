//! An RFC 6962-shaped Merkle tree over record hashes, with blake3.
//!
//! Leaves are record hashes: `leaf = blake3(0x00 || record hash)`, interior
//! nodes `blake3(0x01 || left || right)`, the empty tree `blake3("")`. Tree
//! shape, inclusion paths and consistency proofs follow RFC 6962 section 2.1;
//! proof checking follows RFC 9162 sections 2.1.3.2 and 2.1.4.2.
//!
//! [`Frontier`] keeps only the roots of the perfect subtrees of the left part
//! (O(log n) hashes), which is all an appender needs to produce roots; proofs
//! are produced from the full list of leaf hashes, which the CLI reads from the log.

use serde::{Deserialize, Serialize};

use super::record::Hash;

/// `blake3(0x00 || record hash)`.
pub fn leaf_hash(record_hash: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[0]);
    h.update(record_hash);
    *h.finalize().as_bytes()
}

/// `blake3(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(&[1]);
    h.update(left);
    h.update(right);
    *h.finalize().as_bytes()
}

/// The root of the empty tree.
pub fn empty_root() -> Hash {
    *blake3::hash(b"").as_bytes()
}

/// Largest power of two strictly less than `n` (n >= 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Root over leaf hashes (already `leaf_hash`ed).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The audit path for leaf `index` in the tree of all `leaves` (RFC 6962 PATH).
pub fn inclusion_proof(leaves: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut out = Vec::new();
    path(index, leaves, &mut out);
    Some(out)
}

fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
    if d.len() <= 1 {
        return;
    }
    let k = split(d.len());
    if m < k {
        path(m, &d[..k], out);
        out.push(root(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(root(&d[..k]));
    }
}

/// The proof that the tree of the first `old_size` leaves is a prefix of the
/// tree of all `leaves` (RFC 6962 PROOF).
pub fn consistency_proof(leaves: &[Hash], old_size: usize) -> Option<Vec<Hash>> {
    if old_size > leaves.len() {
        return None;
    }
    let mut out = Vec::new();
    if old_size > 0 {
        subproof(old_size, leaves, true, &mut out);
    }
    Some(out)
}

fn subproof(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        if !complete {
            out.push(root(d));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &d[..k], complete, out);
        out.push(root(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(root(&d[..k]));
    }
}

/// Checks an inclusion proof (RFC 9162 2.1.3.2).
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// Checks a consistency proof (RFC 9162 2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> bool {
    if old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    if old_size == 0 {
        return proof.is_empty();
    }
    let mut nodes: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        nodes.push(*old_root);
    }
    nodes.extend_from_slice(proof);
    let Some((first, rest)) = nodes.split_first() else {
        return false;
    };
    let (mut f, mut s) = (old_size - 1, new_size - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && fr == *old_root && sr == *new_root
}

/// The right edge of a tree: roots of its perfect subtrees, largest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frontier {
    size: u64,
    #[serde(with = "hex_hashes")]
    nodes: Vec<Hash>,
}

impl Frontier {
    /// Number of leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The perfect-subtree roots, largest (leftmost) first.
    pub fn nodes(&self) -> &[Hash] {
        &self.nodes
    }

    /// Whether this is a well-formed frontier (one node per set bit of `size`).
    pub fn is_well_formed(&self) -> bool {
        self.nodes.len() == self.size.count_ones() as usize
    }

    /// Adds a record hash as the next leaf.
    pub fn push(&mut self, record_hash: &Hash) {
        let mut h = leaf_hash(record_hash);
        let mut s = self.size;
        while s & 1 == 1 {
            let left = self.nodes.pop().expect("a node per set bit");
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.nodes.push(h);
        self.size += 1;
    }

    /// The root of the tree so far.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(last) = it.next() else {
            return empty_root();
        };
        it.fold(*last, |acc, n| node_hash(n, &acc))
    }
}

/// One hash as 64 hex digits (serde `with`).
pub(crate) mod hex_hash {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::Hash;

    pub fn serialize<S: Serializer>(h: &Hash, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(h))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        let raw = String::deserialize(d)?;
        crate::audit::record::decode_hash(&raw)
            .ok_or_else(|| D::Error::custom("not a 64-digit hex hash"))
    }
}

mod hex_hashes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error, ser::SerializeSeq};

    use super::Hash;

    pub fn serialize<S: Serializer>(v: &[Hash], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for h in v {
            seq.serialize_element(&hex::encode(h))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Hash>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|s| {
                crate::audit::record::decode_hash(s)
                    .ok_or_else(|| D::Error::custom("not a 64-digit hex hash"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn record_hashes(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
            .collect()
    }

    fn leaves(n: usize) -> Vec<Hash> {
        record_hashes(n).iter().map(leaf_hash).collect()
    }

    #[test]
    fn frontier_root_matches_full_root() {
        let rh = record_hashes(70);
        let mut f = Frontier::default();
        assert_eq!(f.root(), empty_root());
        for (i, h) in rh.iter().enumerate() {
            f.push(h);
            assert!(f.is_well_formed());
            let l: Vec<Hash> = rh[..=i].iter().map(leaf_hash).collect();
            assert_eq!(f.root(), root(&l), "size {}", i + 1);
        }
    }

    #[test]
    fn known_shape_of_three_leaves() {
        let l = leaves(3);
        let expect = node_hash(&node_hash(&l[0], &l[1]), &l[2]);
        assert_eq!(root(&l), expect);
    }

    proptest! {
        #[test]
        fn inclusion_proofs_verify_and_reject_tampering(n in 1usize..300, i_seed in any::<usize>(), flip in any::<(usize, u8)>()) {
            let l = leaves(n);
            let r = root(&l);
            let i = i_seed % n;
            let p = inclusion_proof(&l, i).unwrap();
            prop_assert!(verify_inclusion(i as u64, n as u64, &l[i], &p, &r));
            // Wrong index, wrong leaf, wrong size and a flipped proof byte all fail.
            if n > 1 {
                let j = (i + 1) % n;
                prop_assert!(!verify_inclusion(j as u64, n as u64, &l[i], &p, &r));
            }
            prop_assert!(!verify_inclusion(i as u64, n as u64, &leaf_hash(&l[i]), &p, &r));
            // The root of a longer tree does not verify (size and root are signed together).
            let longer = leaves(n + 1);
            prop_assert!(!verify_inclusion(i as u64, n as u64 + 1, &l[i], &p, &root(&longer)));
            prop_assert!(!verify_inclusion(n as u64, n as u64, &l[i], &p, &r));
            if !p.is_empty() {
                let mut bad = p.clone();
                let k = flip.0 % bad.len();
                bad[k][usize::from(flip.1) % 32] ^= 1;
                prop_assert!(!verify_inclusion(i as u64, n as u64, &l[i], &bad, &r));
            }
        }

        #[test]
        fn consistency_proofs_verify_and_reject_tampering(n in 1usize..300, m_seed in any::<usize>(), flip in any::<(usize, u8)>()) {
            let l = leaves(n);
            let m = 1 + m_seed % n;
            let new_root = root(&l);
            let old_root = root(&l[..m]);
            let p = consistency_proof(&l, m).unwrap();
            prop_assert!(verify_consistency(m as u64, n as u64, &old_root, &new_root, &p));
            // An old tree that is not a prefix fails.
            let mut other = l[..m].to_vec();
            other[m - 1] = leaf_hash(&other[m - 1]);
            prop_assert!(!verify_consistency(m as u64, n as u64, &root(&other), &new_root, &p));
            if m < n {
                prop_assert!(!verify_consistency(m as u64, n as u64, &old_root, &old_root, &p));
            }
            if !p.is_empty() {
                let mut bad = p.clone();
                let k = flip.0 % bad.len();
                bad[k][usize::from(flip.1) % 32] ^= 1;
                prop_assert!(!verify_consistency(m as u64, n as u64, &old_root, &new_root, &bad));
            }
        }
    }
}
