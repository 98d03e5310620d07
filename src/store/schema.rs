//! The layout of the state store, in one place.
//!
//! One RocksDB per site. Every value starts with a format version (JSON records carry
//! `"v"`, index segments a leading byte). Names cannot contain NUL (see
//! [`crate::ids::check_name`]), so NUL separates key parts.
//!
//! | column family | key | value |
//! |---|---|---|
//! | `protections` | protection | [`ProtectionRecord`](super::ProtectionRecord) JSON: epoch, point (acknowledged base at the primary, consistent point at the DR site) with per-volume geometry and root, the primary's tentative gen, failover and fencing records |
//! | `index` | protection NUL volume NUL gen(u64 BE) segment(u64 BE) | packed chunk hashes ([`crate::engine::index::Segment`]) |
//! | `commits` | protection NUL gen(u64 BE) | [`CommitRecord`](super::CommitRecord) JSON: the DR site's group-commit record; while it exists the gen's staged chunks must be (re)applied |
//! | `staged` | protection NUL gen(u64 BE) NUL volume | [`StagedVolume`](super::StagedVolume) JSON: a verified, fsynced staging log of one volume of an uncommitted gen |
//! | `manifests` | protection NUL gen(u64 BE) | a gen's Kubernetes manifest bundle (`Bundle::encode` in src/k8s/bundle.rs: version byte, zstd JSON); written in the gen's commit batch, the last [`MANIFEST_GENS_KEPT`] gens kept |
//!
//! Index gens: the primary keeps the index of its point (the base) and of its tentative gen
//! (written during the scan); [`SCRATCH`] holds hashes fetched from, or scanned for, a peer
//! during a resync. The DR site keeps the index of its consistent point and of each kept
//! recovery point of file replicas (for `verify --gen`), plus the gen being received.
//! Everything else is garbage and is removed at start-up.

use crate::ids::Gen;

pub const CF_PROTECTIONS: &str = "protections";
pub const CF_INDEX: &str = "index";
pub const CF_COMMITS: &str = "commits";
pub const CF_STAGED: &str = "staged";
pub const CF_MANIFESTS: &str = "manifests";
pub const ALL_CFS: [&str; 5] = [
    CF_PROTECTIONS,
    CF_INDEX,
    CF_COMMITS,
    CF_STAGED,
    CF_MANIFESTS,
];

/// Manifest bundles kept per protection at the DR site (for `export --gen` and review).
pub const MANIFEST_GENS_KEPT: u64 = 16;

/// The index gen used for hashes exchanged in a resync.
pub const SCRATCH: Gen = Gen(u64::MAX);

pub const RECORD_VERSION: u32 = 1;

pub fn index_prefix(prot: &str, vol: &str, gen: Gen) -> Vec<u8> {
    let mut k = Vec::with_capacity(prot.len() + vol.len() + 10);
    k.extend_from_slice(prot.as_bytes());
    k.push(0);
    k.extend_from_slice(vol.as_bytes());
    k.push(0);
    k.extend_from_slice(&gen.0.to_be_bytes());
    k
}

pub fn index_key(prot: &str, vol: &str, gen: Gen, segment: u64) -> Vec<u8> {
    let mut k = index_prefix(prot, vol, gen);
    k.extend_from_slice(&segment.to_be_bytes());
    k
}

/// Splits an index key into (volume, gen, segment) given its protection prefix length.
pub fn parse_index_key(prot: &str, key: &[u8]) -> Option<(String, Gen, u64)> {
    let rest = key.strip_prefix(prot.as_bytes())?.strip_prefix(&[0])?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let vol = std::str::from_utf8(&rest[..nul]).ok()?.to_string();
    let nums = &rest[nul + 1..];
    if nums.len() != 16 {
        return None;
    }
    let gen = u64::from_be_bytes(nums[..8].try_into().ok()?);
    let seg = u64::from_be_bytes(nums[8..].try_into().ok()?);
    Some((vol, Gen(gen), seg))
}

pub fn commit_key(prot: &str, gen: Gen) -> Vec<u8> {
    let mut k = prot.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&gen.0.to_be_bytes());
    k
}

pub fn staged_key(prot: &str, gen: Gen, vol: &str) -> Vec<u8> {
    let mut k = commit_key(prot, gen);
    k.push(0);
    k.extend_from_slice(vol.as_bytes());
    k
}

/// The first key after every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only an all-0xff prefix gets here; our keys always start with a name.
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_parse_back_and_sort_by_segment() {
        let a = index_key("p", "v", Gen(3), 1);
        let b = index_key("p", "v", Gen(3), 256);
        assert!(a < b);
        assert_eq!(parse_index_key("p", &b), Some(("v".into(), Gen(3), 256)));
        assert!(b < prefix_end(&index_prefix("p", "v", Gen(3))));
        assert!(index_key("p", "v", Gen(4), 0) >= prefix_end(&index_prefix("p", "v", Gen(3))));
    }
}
