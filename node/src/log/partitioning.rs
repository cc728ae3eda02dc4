//! Which partition a stream lives in: `fnv1a_64(stream id as UTF-8 bytes) mod partition_count`.
//!
//! FNV-1a (64-bit: offset basis 0xcbf29ce484222325, prime 0x100000001b3) is a few lines in any
//! language, so clients can route without this crate. The mapping is part of the storage
//! format: changing it would move streams, so it must never change (tests pin known values).

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub fn fnv1a_64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// The partition of `stream` among `partition_count` partitions.
pub fn partition_of(stream: &str, partition_count: u32) -> u32 {
    assert!(partition_count > 0, "partition count must be positive");
    (fnv1a_64(stream.as_bytes()) % u64::from(partition_count)) as u32
}

/// The system stream of a partition's epoch markers (`$epochs-{partition}`, written by each new
/// leader, docs/replication.md) lives in that partition, wherever its name hashes.
const MARKER_STREAM_PREFIX: &str = "$epochs-";

/// The partition whose log holds `stream`'s events: [`partition_of`], but for a partition's
/// epoch-marker stream, which is that partition's own.
pub fn home_partition(stream: &str, partition_count: u32) -> u32 {
    match stream.strip_prefix(MARKER_STREAM_PREFIX).and_then(|p| p.parse::<u32>().ok()) {
        Some(p) if p < partition_count => p,
        _ => partition_of(stream, partition_count),
    }
}

/// The name of `partition`'s epoch-marker stream.
pub fn marker_stream(partition: u32) -> String {
    format!("{MARKER_STREAM_PREFIX}{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitions_marker_stream_is_at_home_in_that_partition_and_other_streams_where_they_hash() {
        for p in 0..64 {
            assert_eq!(home_partition(&marker_stream(p), 64), p);
        }
        assert_ne!(partition_of(&marker_stream(0), 64), 0, "the name alone hashes elsewhere");
        assert_eq!(home_partition("foobar", 64), 40);
        assert_eq!(home_partition("$epochs-64", 64), partition_of("$epochs-64", 64), "no such partition");
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(fnv1a_64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a_64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a_64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn given_the_default_64_partitions_then_known_streams_stay_where_they_are() {
        // Pinned literals: a change here moves stored streams and breaks every existing data
        // directory. (fnv1a_64("foobar") = 0x85944171f73967e8, and 0xe8 % 64 = 40.)
        assert_eq!(partition_of("foobar", 64), 40);
        assert_eq!(partition_of("a", 64), 12);
        assert_eq!(partition_of("", 64), 37);
        assert_eq!(partition_of("foobar", 7), (0x85944171f73967e8u64 % 7) as u32);
    }

    #[test]
    fn streams_spread_over_all_partitions() {
        let mut seen = [0u32; 64];
        for i in 0..6400 {
            seen[partition_of(&format!("s-{i}"), 64) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (50..=150).contains(&n)), "{seen:?}");
    }
}
