//! Expected-version rules: the condition an append puts on its stream's current version.
//!
//! Versions count a stream's events: a stream with no events is at version 0, its first event
//! has version 1. Racing writers that each append at the version they read are serialized by
//! these rules: exactly one wins, the others learn the actual version and can retry.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpectedVersion {
    /// No condition.
    #[default]
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream must be at exactly this version (0 is the same as `NoStream`).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether an append may go ahead on a stream at version `current`.
    pub fn allows(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::StreamExists => current > 0,
            ExpectedVersion::Exact(v) => current == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("stream exists"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_always_allows(current in any::<u64>()) {
            prop_assert!(ExpectedVersion::Any.allows(current));
        }

        #[test]
        fn exact_allows_only_its_own_version(v in 0u64..50, current in 0u64..50) {
            prop_assert_eq!(ExpectedVersion::Exact(v).allows(current), v == current);
        }

        #[test]
        fn no_stream_and_exact_zero_agree(current in 0u64..5) {
            prop_assert_eq!(ExpectedVersion::NoStream.allows(current), ExpectedVersion::Exact(0).allows(current));
        }

        #[test]
        fn no_stream_and_stream_exists_split_every_version(current in any::<u64>()) {
            prop_assert_ne!(ExpectedVersion::NoStream.allows(current), ExpectedVersion::StreamExists.allows(current));
        }
    }
}
