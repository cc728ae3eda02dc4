//! Which nodes replicate a partition: rendezvous (highest random weight) hashing over the live
//! members. Every node computes the same sets from the same member list, and changing the list
//! moves as few replicas as possible: removing a member changes only the sets it was in (its
//! place taken by one other member); adding one changes only the sets it enters (it displaces
//! one member each).
//!
//! A partition's replica set is computed once, when the cluster has enough members, and stored
//! in the coordination store ([`super::election`]); it does not follow later membership changes
//! by itself, because moving a replica safely needs the new one caught up first (docs/replication.md).

/// The replica set of `partition`: the `factor` members (all of them when fewer) with the highest
/// scores, highest first — the first is the preferred leader.
pub fn replica_set(partition: u32, members: &[String], factor: usize) -> Vec<String> {
    let mut scored: Vec<(u64, &String)> = members.iter().map(|m| (score(partition, m), m)).collect();
    // Ties (practically impossible) break by name, so every node orders them alike.
    scored.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(factor).map(|(_, m)| m.clone()).collect()
}

/// The rendezvous weight of `member` for `partition`: FNV-1a over both, then a 64-bit mix.
fn score(partition: u32, member: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in partition.to_be_bytes().iter().chain(member.as_bytes()) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer spreads FNV's weak low bits.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn given_members_then_each_set_has_the_factor_distinct_members_and_leaders_spread() {
        let m = members(5);
        let mut preferred = std::collections::HashMap::new();
        for p in 0..600 {
            let set = replica_set(p, &m, 3);
            assert_eq!(set.len(), 3);
            assert_eq!(set.iter().collect::<std::collections::HashSet<_>>().len(), 3);
            *preferred.entry(set[0].clone()).or_insert(0) += 1;
        }
        // 600 partitions over 5 nodes: each leads about 120; allow wide noise.
        assert!(preferred.values().all(|&n| (70..=170).contains(&n)), "{preferred:?}");
        assert_eq!(replica_set(7, &members(2), 3).len(), 2, "fewer members than the factor: all of them");
    }

    proptest! {
        #[test]
        fn removing_a_member_changes_only_the_sets_it_was_in_by_one_member(n in 3usize..9, gone in 0usize..9, partition in 0u32..10_000) {
            let all = members(n);
            let gone = &all[gone % n];
            let rest: Vec<String> = all.iter().filter(|m| *m != gone).cloned().collect();
            let (before, after) = (replica_set(partition, &all, 3), replica_set(partition, &rest, 3));
            if before.contains(gone) {
                let kept: Vec<&String> = before.iter().filter(|m| *m != gone).collect();
                prop_assert!(kept.iter().all(|m| after.contains(m)));
            } else {
                prop_assert_eq!(before, after);
            }
        }

        #[test]
        fn adding_a_member_displaces_at_most_one_member_of_a_set(n in 3usize..9, partition in 0u32..10_000) {
            let before = replica_set(partition, &members(n), 3);
            let after = replica_set(partition, &members(n + 1), 3);
            let displaced = before.iter().filter(|m| !after.contains(m)).count();
            prop_assert!(displaced <= 1);
            let newcomer = format!("node-{}", n + 1);
            if displaced == 1 {
                prop_assert!(after.contains(&newcomer));
            }
        }

        #[test]
        fn the_order_of_the_member_list_does_not_matter(n in 1usize..9, partition in 0u32..10_000, seed in any::<u64>()) {
            let mut shuffled = members(n);
            let len = shuffled.len();
            shuffled.rotate_left((seed % len as u64) as usize);
            prop_assert_eq!(replica_set(partition, &members(n), 3), replica_set(partition, &shuffled, 3));
        }
    }
}
