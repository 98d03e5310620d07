//! Typed identifiers: chunk hashes, generations, epochs, names.
//!
//! Raw integers and strings are easy to swap by accident (a gen passed where an epoch was
//! meant); these newtypes make the compiler catch it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The blake3 hash of one chunk's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub const LEN: usize = 32;

    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    pub fn from_slice(b: &[u8]) -> Option<Self> {
        b.try_into().ok().map(ChunkHash)
    }

    pub fn short(&self) -> String {
        self.0[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.short())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The number of a group snapshot; one more per successful cycle.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct Gen(pub u64);

impl Gen {
    pub fn next(self) -> Gen {
        Gen(self.0 + 1)
    }
}

impl fmt::Display for Gen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A counter of role changes; a site never applies data from a peer with an older epoch.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug, Default,
)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifies one attempt at a gen: a retried gen gets a new id, so a receiver can tell
/// stale staging from the attempt in front of it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Debug, Default)]
pub struct CycleId(pub u64);

impl CycleId {
    pub fn random() -> Self {
        CycleId(rand::random::<u64>() | 1)
    }
}

impl fmt::Display for CycleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Checks a name used in keys and paths: 1..=63 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err(format!("{s:?} must be 1 to 63 characters long"));
    }
    if s.starts_with('.') {
        return Err(format!("{s:?} must not start with '.'"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{s:?} contains {c:?}; expected letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$m:meta])* $t:ident) => {
        $(#[$m])*
        // Read back from the state store and the wire through `new`, so a stored or
        // received name is as valid as a configured one.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Debug)]
        #[serde(try_from = "String", into = "String")]
        pub struct $t(String);

        impl $t {
            pub fn new(s: &str) -> Result<Self, String> {
                check_name(s)?;
                Ok($t(s.to_string()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                check_name(&s)?;
                Ok($t(s))
            }
        }

        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }

        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// The name of a protection (the unit of DR), unique per pair.
    ProtectionName
);
name_type!(
    /// The name of one volume inside a protection's group.
    VolumeName
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reject_path_characters_and_accept_plain_words() {
        assert!(ProtectionName::new("pg-main_1.a").is_ok());
        for bad in ["", "a/b", "..", ".hidden", "white space", &"x".repeat(64)] {
            assert!(ProtectionName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}

/// A committed gen: which attempt, and when its group snapshot was taken. The consistent
/// point at the DR site; the acknowledged base at the primary.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub gen: Gen,
    pub cycle: CycleId,
    /// Unix time of the group snapshot, in milliseconds.
    pub taken_at_ms: u64,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
