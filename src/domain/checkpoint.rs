//! Checkpoints of the whole log: a Merkle root over the heads of the tasks that changed, chained
//! to the previous checkpoint and signed with Ed25519. Pure: the store reads and writes them.

use super::task::TaskId;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

/// The head of one task's chain as a checkpoint records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub task_id: TaskId,
    /// The sequence number of the task's last event.
    pub version: i32,
    pub hash: Vec<u8>,
}

impl From<(TaskId, i32, Vec<u8>)> for Head {
    /// A head as stored: task id, version, hash.
    fn from((task_id, version, hash): (TaskId, i32, Vec<u8>)) -> Head {
        Head {
            task_id,
            version,
            hash,
        }
    }
}

/// The Merkle root over `heads` (sorted by task id by the caller): leaves are
/// `sha256(0x00 ‖ task id ‖ version ‖ hash)`, inner nodes `sha256(0x01 ‖ left ‖ right)`, an
/// odd node is carried up as it is. The root of no heads is `sha256("")`.
pub fn merkle_root(heads: &[Head]) -> [u8; 32] {
    let mut level: Vec<[u8; 32]> = heads
        .iter()
        .map(|h| {
            let mut d = Sha256::new();
            d.update([0u8]);
            d.update(h.task_id.as_bytes());
            d.update(h.version.to_be_bytes());
            d.update(&h.hash);
            d.finalize().into()
        })
        .collect();
    if level.is_empty() {
        return Sha256::digest([]).into();
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => {
                    let mut d = Sha256::new();
                    d.update([1u8]);
                    d.update(l);
                    d.update(r);
                    d.finalize().into()
                }
                [one] => *one,
                _ => unreachable!("chunks of two"),
            })
            .collect();
    }
    level[0]
}

/// The hash a checkpoint is signed over: its number, the log position it covers up to, how many
/// heads it holds, their Merkle root and the previous checkpoint's hash.
pub fn checkpoint_hash(
    seq: i64,
    upto_position: i64,
    tasks: i32,
    root: &[u8],
    prev_hash: Option<&[u8]>,
) -> [u8; 32] {
    let mut d = Sha256::new();
    d.update(b"arnela-checkpoint-v1");
    d.update(seq.to_be_bytes());
    d.update(upto_position.to_be_bytes());
    d.update(tasks.to_be_bytes());
    d.update(root);
    d.update(prev_hash.unwrap_or(&[0u8; 32]));
    d.finalize().into()
}

/// Reads a signing key: 64 hex digits (the 32-byte seed).
pub fn signing_key(hex_seed: &str) -> Result<SigningKey, String> {
    let bytes = hex::decode(hex_seed.trim()).map_err(|_| "must be 64 hex digits".to_owned())?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "must be 64 hex digits (a 32-byte Ed25519 seed)".to_owned())?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Reads a public key: 64 hex digits.
pub fn verifying_key(hex_key: &str) -> Result<VerifyingKey, String> {
    let bytes = hex::decode(hex_key.trim()).map_err(|_| "must be 64 hex digits".to_owned())?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "must be 64 hex digits (an Ed25519 public key)".to_owned())?;
    VerifyingKey::from_bytes(&key).map_err(|e| format!("not an Ed25519 public key: {e}"))
}

pub fn sign(key: &SigningKey, hash: &[u8]) -> Vec<u8> {
    key.sign(hash).to_bytes().to_vec()
}

/// Whether `signature` is `public_key`'s signature of `hash`.
pub fn signature_holds(public_key: &[u8], hash: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = <[u8; 32]>::try_from(public_key) else {
        return false;
    };
    let Ok(key) = VerifyingKey::from_bytes(&key) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    key.verify(hash, &Signature::from_bytes(&sig)).is_ok()
}

/// The fields of a signed checkpoint that its chain, its hash and its signature cover.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    pub seq: i64,
    pub upto_position: i64,
    pub tasks: i32,
    pub merkle_root: &'a [u8],
    pub prev_hash: Option<&'a [u8]>,
    pub hash: &'a [u8],
    pub public_key: &'a [u8],
    pub signature: &'a [u8],
}

/// What is wrong with checkpoint `c`, the `expected_seq`-th of a chain whose previous checkpoint
/// has the hash `prev`: its number, its link, its hash, its signature, and (when `trusted` is
/// given) the key it is signed with. Needs nothing but the checkpoints themselves, so it runs on
/// an exported copy as well as on the database's.
pub fn check_link(
    c: &Link<'_>,
    expected_seq: i64,
    prev: Option<&[u8]>,
    trusted: Option<&[u8]>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if c.seq != expected_seq {
        problems.push(format!(
            "expected checkpoint {expected_seq} (a checkpoint is missing)"
        ));
    }
    if c.prev_hash != prev {
        problems.push("does not link to the previous checkpoint's hash".into());
    }
    let hash = checkpoint_hash(c.seq, c.upto_position, c.tasks, c.merkle_root, prev);
    if hash.as_slice() != c.hash {
        problems.push("content does not match its hash (the checkpoint was altered)".into());
    }
    if !signature_holds(c.public_key, c.hash, c.signature) {
        problems.push("the signature does not hold (forged or altered)".into());
    }
    if trusted.is_some_and(|k| k != c.public_key) {
        problems.push("signed with another key than the trusted one".into());
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(n: u128, version: i32) -> Head {
        Head {
            task_id: TaskId::from(uuid::Uuid::from_u128(n)),
            version,
            hash: vec![n as u8; 32],
        }
    }

    #[test]
    fn the_root_changes_with_any_head() {
        let heads = vec![head(1, 2), head(2, 4), head(3, 1)];
        let root = merkle_root(&heads);
        assert_eq!(root, merkle_root(&heads.clone()));
        let mut other = heads.clone();
        other[2].version = 2;
        assert_ne!(root, merkle_root(&other));
        assert_ne!(root, merkle_root(&heads[..2]));
        assert_ne!(merkle_root(&[head(1, 1)]), merkle_root(&[]));
    }

    #[test]
    fn a_signature_holds_for_its_hash_and_key_only() {
        let key = signing_key(&"11".repeat(32)).unwrap();
        let public = key.verifying_key().to_bytes();
        let h = checkpoint_hash(1, 42 << 20, 3, &[7; 32], None);
        let sig = sign(&key, &h);
        assert!(signature_holds(&public, &h, &sig));
        let other = checkpoint_hash(1, 42 << 20, 4, &[7; 32], None);
        assert!(!signature_holds(&public, &other, &sig));
        let stranger = signing_key(&"22".repeat(32))
            .unwrap()
            .verifying_key()
            .to_bytes();
        assert!(!signature_holds(&stranger, &h, &sig));
        assert!(signing_key("abc").is_err());
    }
}
