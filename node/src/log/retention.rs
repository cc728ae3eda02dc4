//! Retention: each partition gives up its oldest events beyond `storage.retention_max_events`
//! and those older than `storage.retention_max_age_s` (docs/storage.md, "Retention"). The state
//! they made stays; reads start at the oldest event kept.
//!
//! Every [`CHECK_INTERVAL`] the task works out, per partition, how far the limits allow giving
//! events up — never past what is committed, at most [`MAX_EVENTS_PER_TRIM`] at a time, back to
//! the end of an append — and asks the writer to trim there ([`Log::trim_partition`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::Log;
use crate::storage::{ReadLimit, StorageError};

pub const CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// Most events one trim gives up, so the writer (which trims between group commits, holding
/// reads off) pauses briefly; a partition far over its limits catches up over several checks.
pub const MAX_EVENTS_PER_TRIM: u64 = 100_000;

/// The limits: 0 turns one off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_events: u64,
    pub max_age_s: u64,
}

impl Retention {
    pub fn is_on(&self) -> bool {
        self.max_events > 0 || self.max_age_s > 0
    }
}

/// The position `partition` may be trimmed through now (`None`: nothing to give up).
pub fn target(log: &Log, partition: u32, retention: Retention, now_us: u64) -> Result<Option<u64>, StorageError> {
    let store = log.store();
    let floor = store.partition_floor(partition);
    let committed = log.committed_through(partition);
    let cap = committed.min(floor + MAX_EVENTS_PER_TRIM);
    if cap <= floor {
        return Ok(None);
    }
    let mut want = floor;
    if retention.max_events > 0 {
        want = want.max(committed.saturating_sub(retention.max_events));
    }
    if retention.max_age_s > 0 {
        // Events are in append order, and append times grow along a partition (a new leader's
        // clock may lag an old one's a little: the scan stops at the first young event).
        let oldest_kept_us = now_us.saturating_sub(retention.max_age_s.saturating_mul(1_000_000));
        let mut from = want + 1;
        'scan: while from <= cap {
            let slice = store.read_partition(partition, from, cap, ReadLimit { max_events: 1024, max_bytes: 4 << 20 })?;
            if slice.events.is_empty() {
                break;
            }
            for event in &slice.events {
                if event.append_time_us >= oldest_kept_us {
                    break 'scan;
                }
                want = event.position;
            }
            from = want + 1;
        }
    }
    let want = want.min(cap);
    if want <= floor {
        return Ok(None);
    }
    append_end_at_or_before(log, partition, floor, want)
}

/// The last position at or before `position` (and after `floor`) where an append ends.
fn append_end_at_or_before(log: &Log, partition: u32, floor: u64, position: u64) -> Result<Option<u64>, StorageError> {
    let mut window = 64;
    loop {
        let from = position.saturating_sub(window - 1).max(floor + 1);
        let slice =
            log.store().read_partition(partition, from, position, ReadLimit { max_events: window as usize, max_bytes: usize::MAX })?;
        if let Some(end) = slice.events.iter().rev().find(|e| !e.atomic_with_next) {
            return Ok(Some(end.position));
        }
        if from == floor + 1 {
            return Ok(None);
        }
        window *= 4;
    }
}

/// Trims every partition as the limits allow, every [`CHECK_INTERVAL`], until `stopped`.
pub async fn run(log: Arc<Log>, retention: Retention, mut stopped: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        trim_all(&log, retention).await;
    }
}

/// One round of [`run`]: each partition trimmed as far as the limits allow now.
pub async fn trim_all(log: &Log, retention: Retention) {
    let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
    for partition in 0..log.partition_count() {
        let through = match target(log, partition, retention, now_us) {
            Ok(Some(through)) => through,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(partition, error = %e, "retention: cannot read the partition's oldest events");
                continue;
            }
        };
        if let Err(e) = log.trim_partition(partition, through).await {
            tracing::warn!(partition, through, error = %e, "retention: cannot give up the partition's oldest events");
        }
    }
}
