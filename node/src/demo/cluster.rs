//! The demo's second act: a 3-node cluster on loopback (127.0.0.11 on) with the embedded
//! coordination store. Writers append with `quorum` durability through the routing client, and a
//! ledger book per partition takes transfers (commands, resent with their command id when their
//! outcome is unknown); midway the node leading the most partitions is killed with SIGKILL; its
//! partitions fail over and the writers go on. Then the node comes back and catches up, every
//! acknowledged append is read back from the partitions' leaders, and every book's balances are
//! checked against the acknowledged transfers on its leader and on the restarted node.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::{Context, ensure};
use parking_lot::Mutex;
use serde::Serialize;

use super::{DemoArgs, say};
use crate::client;
use crate::local::{ClusterSpec, LocalCluster};
use crate::router::Router;

const PARTITIONS: u32 = 16;
const STREAMS: u64 = 200;
const WRITERS: u64 = 16;
const SESSION_TTL_MS: u64 = 1_000;
/// What each book's account `a` starts with; every transfer moves 1 to `b`.
const OPENING: u64 = 1_000_000;

/// An acknowledged append: (partition, sent, answered, stream, payload).
type Ack = (u32, Instant, Instant, String, String);

#[derive(Debug, Serialize)]
pub struct ClusterRun {
    pub nodes: usize,
    pub killed: String,
    /// Partitions the killed node led.
    pub partitions_failed_over: usize,
    /// From the kill until every one of those partitions acknowledged an append sent after it.
    pub failover_ms: f64,
    pub appends_acknowledged: u64,
    /// Appends that failed (their outcome unknown, as the leader died under them): not counted.
    pub appends_failed: u64,
    /// Acknowledged appends missing when read back (must be 0).
    pub lost: u64,
    /// From the restart until the node held every partition's log again.
    pub caught_up_ms: f64,
    pub ledger: LedgerRun,
}

/// The ledger's part of the act.
#[derive(Debug, Serialize)]
pub struct LedgerRun {
    pub books: usize,
    pub transfers_acknowledged: u64,
    /// Sends of a transfer after its first one failed with an unknown outcome (same command id).
    pub resends: u64,
    /// Resends answered as a duplicate: the first send had been applied (by the killed leader,
    /// or by its successor).
    pub duplicates: u64,
    /// Every book's balances equal its acknowledged transfers on its leader and, from its own
    /// state, on the restarted node.
    pub balances_match: bool,
}

pub async fn run(args: &DemoArgs, dir: &std::path::Path) -> anyhow::Result<ClusterRun> {
    let nodes = usize::from(args.nodes);
    let exe = std::env::current_exe()?;
    let spec = ClusterSpec {
        nodes,
        partitions: PARTITIONS,
        replication_factor: nodes.min(3) as u32,
        session_ttl_ms: SESSION_TTL_MS,
        node_args: vec!["--log-level".to_string(), "warn".to_string()],
        consul: None,
        tls: !args.no_tls,
        encrypt: false,
    };
    let mut cluster = LocalCluster::start(&exe, dir, &spec)?;
    say(args, format!("started a {nodes}-node cluster at {} (embedded coordination store, no other service)", cluster.urls().join(", ")));
    cluster.wait_whole(&spec, Duration::from_secs(60)).await?;
    let router = Arc::new(Router::connect(&cluster.urls()).await?);
    let view = status_of(&cluster, 0).await?.cluster.context("a cluster node reports its cluster")?;
    say(args, format!("every partition has a leader: {}", leaders_line(&view)));

    // Writers append with `quorum` acks until stopped.
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let (stop, failed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (router, acks, stop, failed) = (router.clone(), acks.clone(), stop.clone(), failed.clone());
        writers.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.load(Ordering::Relaxed) {
                let stream = format!("cart-{}", i % STREAMS);
                let payload = format!("{{\"writer\":{w},\"n\":{i}}}");
                let request = pb::AppendRequest {
                    durability: pb::Durability::Quorum as i32,
                    stream: stream.clone(),
                    expected_version: None,
                    events: vec![pb::EventData {
                        r#type: "ItemAdded".into(),
                        payload: payload.clone().into_bytes(),
                        metadata: Default::default(),
                    }],
                };
                let sent = Instant::now();
                match router.append(request).await {
                    Ok(r) => acks.lock().push((r.partition, sent, Instant::now(), stream, payload)),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += WRITERS;
            }
        }));
    }
    say(args, format!("{WRITERS} writers append with quorum acks through the routing client"));
    let books = open_books(&router, PARTITIONS).await?;
    let mut tellers = Vec::new();
    for book in books.clone() {
        let (router, stop) = (router.clone(), stop.clone());
        tellers.push(tokio::spawn(async move { transfers(&router, &book, &stop).await }));
    }
    say(args, format!("a ledger book on each of the {} partitions takes transfers, resent with their command id when unsure", books.len()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Kill the node that leads the most partitions.
    let view = status_of(&cluster, 0).await?.cluster.context("cluster status")?;
    let mut led: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for p in &view.partitions {
        led.entry(p.leader.clone()).or_default().push(p.partition);
    }
    let (victim_name, lost_partitions) = led.into_iter().max_by_key(|(_, ps)| ps.len()).context("partitions have leaders")?;
    let victim = LocalCluster::index_of(&victim_name).context("a node's name")?;
    let before = acks.lock().len();
    let killed_at = Instant::now();
    cluster.kill9(victim)?;
    say(args, format!("killed {victim_name} (SIGKILL) after {before} acknowledged appends; it led partitions {lost_partitions:?}"));
    // Until each of its partitions acknowledged an append sent after the kill (at most 30 s).
    let failover = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let acks = acks.lock();
        let back: Vec<Duration> = lost_partitions
            .iter()
            .filter_map(|p| acks.iter().find(|(ap, sent, _, _, _)| ap == p && *sent > killed_at).map(|a| a.2 - killed_at))
            .collect();
        if back.len() == lost_partitions.len() {
            break back.into_iter().max().unwrap_or_default();
        }
        ensure!(killed_at.elapsed() < Duration::from_secs(30), "partitions of {victim_name} did not come back within 30 s");
    };
    let view = status_of(&cluster, (victim + 1) % nodes).await?.cluster.context("cluster status")?;
    say(
        args,
        format!(
            "failover: all {} of its partitions took appends again {:.0} ms after the kill: {}",
            lost_partitions.len(),
            failover.as_secs_f64() * 1000.0,
            leaders_line(&view)
        ),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await?;
    }
    let mut done = BTreeMap::new();
    let (mut resends, mut duplicates) = (0, 0);
    for (book, teller) in books.iter().zip(tellers) {
        let (acked, resent, duplicate) = teller.await??;
        done.insert(book.clone(), acked);
        (resends, duplicates) = (resends + resent, duplicates + duplicate);
    }

    // The node comes back and catches up: every leader shows it at lag 0.
    let restarted_at = Instant::now();
    cluster.start_node(victim, &spec.node_args)?;
    let replicated = view.partitions.iter().filter(|p| p.replicas.contains(&victim_name)).count();
    let caught_up = loop {
        if lags_of(&cluster, &victim_name).await.is_some_and(|lags| lags.len() == replicated && lags.iter().all(|l| *l == 0)) {
            break restarted_at.elapsed();
        }
        ensure!(restarted_at.elapsed() < Duration::from_secs(60), "{victim_name} did not catch up within 60 s of its restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    say(
        args,
        format!(
            "{victim_name} restarted and caught up on every partition in {:.1} s (it leads none: leadership does not flap)",
            caught_up.as_secs_f64()
        ),
    );

    // Every acknowledged append is in its stream on the partition's leader.
    let acks = std::mem::take(&mut *acks.lock());
    let mut by_stream: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    for (_, _, _, stream, payload) in &acks {
        by_stream.entry(stream).or_default().insert(payload);
    }
    let mut lost = 0;
    for (stream, payloads) in &by_stream {
        let events = router.read_stream_all(stream).await.map_err(client::status_error)?;
        let stored: HashSet<String> = events.into_iter().map(|e| String::from_utf8_lossy(&e.payload).into_owned()).collect();
        lost += payloads.iter().filter(|p| !stored.contains(**p)).count() as u64;
    }
    // Every book: `a` gave exactly its acknowledged transfers to `b`, on its leader and in the
    // restarted node's own state (it rebuilt what the failover truncated).
    let mut balances_match = true;
    for (book, acked) in &done {
        let want = vec![(OPENING - acked) as i64, *acked as i64];
        let partition = router.partition_of(&format!("ledger/{book}"));
        let on_leader = router.on_leader(partition, |mut c| async move { Ok(balances(&mut c.ledger, book).await) }).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let on_victim = loop {
            let mut c = client::connect(&cluster.url(victim)).await?;
            let got = balances(&mut c.ledger, book).await;
            if got.as_ref() == Some(&want) || Instant::now() > deadline {
                break got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        balances_match &= on_leader.ok().flatten().as_ref() == Some(&want) && on_victim.as_ref() == Some(&want);
    }
    let transfers_acknowledged: u64 = done.values().sum();
    say(
        args,
        format!(
            "ledger: {transfers_acknowledged} transfers acknowledged over {} books ({resends} resent after an unknown outcome, {duplicates} of them answered as duplicates); balances {} on the leaders and on {victim_name}",
            done.len(),
            if balances_match { "match them" } else { "DO NOT match them" }
        ),
    );
    let ledger = LedgerRun { books: done.len(), transfers_acknowledged, resends, duplicates, balances_match };
    let run = ClusterRun {
        nodes,
        killed: victim_name,
        partitions_failed_over: lost_partitions.len(),
        failover_ms: failover.as_secs_f64() * 1000.0,
        appends_acknowledged: acks.len() as u64,
        appends_failed: failed.load(Ordering::Relaxed),
        lost,
        caught_up_ms: caught_up.as_secs_f64() * 1000.0,
        ledger,
    };
    say(
        args,
        format!(
            "read back {} acknowledged quorum appends from the leaders: {} missing ({} appends failed while their leader died, outcome unknown, not counted)",
            run.appends_acknowledged, run.lost, run.appends_failed
        ),
    );
    ensure!(run.lost == 0, "{} acknowledged appends are missing after the failover", run.lost);
    ensure!(run.ledger.balances_match, "a book's balances do not match its acknowledged transfers");
    for i in 0..nodes {
        cluster.kill9(i)?;
    }
    Ok(run)
}

/// A book on each partition, each with accounts `a` (holding [`OPENING`]) and `b`.
async fn open_books(router: &Router, partitions: u32) -> anyhow::Result<Vec<String>> {
    let mut books = Vec::new();
    for p in 0..partitions {
        let book = (0..)
            .map(|k| format!("demo-{k}"))
            .find(|b| crate::log::partition_of(&format!("ledger/{b}"), partitions) == p)
            .expect("some book lands on every partition");
        let partition = router.partition_of(&format!("ledger/{book}"));
        for account in ["a", "b"] {
            let open = pb::OpenAccountRequest {
                book: book.clone(),
                command_id: format!("open-{account}"),
                account: account.into(),
                currency: "EUR".into(),
                credit_limit: 0,
            };
            router
                .on_leader_idempotent(partition, |mut c| {
                    let open = open.clone();
                    async move { c.ledger.open_account(open).await }
                })
                .await
                .map_err(client::status_error)?;
        }
        let deposit = pb::DepositRequest { book: book.clone(), command_id: "deposit".into(), account: "a".into(), amount: OPENING };
        router
            .on_leader_idempotent(partition, |mut c| {
                let deposit = deposit.clone();
                async move { c.ledger.deposit(deposit).await }
            })
            .await
            .map_err(client::status_error)?;
        books.push(book);
    }
    Ok(books)
}

/// Transfers 1 from `a` to `b` of `book` until stopped, each resent with its command id until
/// acknowledged; returns (acknowledged, resends, resends answered as duplicates).
async fn transfers(router: &Router, book: &str, stop: &AtomicBool) -> anyhow::Result<(u64, u64, u64)> {
    let partition = router.partition_of(&format!("ledger/{book}"));
    let (mut acked, mut resends, mut duplicates) = (0, 0, 0);
    while !stop.load(Ordering::Relaxed) {
        let request = pb::TransferRequest {
            book: book.into(),
            command_id: format!("t-{acked}"),
            from: "a".into(),
            to: "b".into(),
            amount: 1,
            transfer: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut first = true;
        loop {
            let answer = router
                .on_leader(partition, |mut c| {
                    let request = request.clone();
                    async move { c.ledger.transfer(request).await.map(tonic::Response::into_inner) }
                })
                .await;
            match answer {
                Ok(done) => {
                    duplicates += u64::from(done.duplicate && !first);
                    break;
                }
                Err(status) => ensure!(Instant::now() < deadline, "{book}: transfer {} never acknowledged: {status}", request.command_id),
            }
            resends += 1;
            first = false;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        acked += 1;
    }
    Ok((acked, resends, duplicates))
}

/// Accounts `a` and `b` of `book` as a node's state has them (None if it cannot answer).
async fn balances(ledger: &mut pb::ledger_client::LedgerClient<crate::client::Conn>, book: &str) -> Option<Vec<i64>> {
    let mut out = Vec::new();
    for account in ["a", "b"] {
        let request = pb::GetBalanceRequest { book: book.into(), account: account.into() };
        out.push(ledger.get_balance(request).await.ok()?.into_inner().balance);
    }
    Some(out)
}

async fn status_of(cluster: &LocalCluster, i: usize) -> anyhow::Result<pb::StatusResponse> {
    let mut c = client::connect(&cluster.url(i)).await?;
    Ok(c.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner())
}

/// `p0=node-1@1 p1=node-3@2 …`
fn leaders_line(view: &pb::ClusterStatus) -> String {
    let cells: Vec<String> = view
        .partitions
        .iter()
        .map(|p| format!("p{}={}@{}", p.partition, if p.leader.is_empty() { "none" } else { &p.leader }, p.epoch))
        .collect();
    cells.join(" ")
}

/// `node`'s lag on every partition, as the partitions' leaders report it (None while a node
/// does not answer).
async fn lags_of(cluster: &LocalCluster, node: &str) -> Option<Vec<u64>> {
    let mut lags = Vec::new();
    for i in (0..cluster.nodes.len()).filter(|i| cluster.nodes[*i].is_some() && LocalCluster::name(*i) != node) {
        let status = status_of(cluster, i).await.ok()?;
        lags.extend(status.partitions.iter().flat_map(|p| p.followers.iter()).filter(|f| f.node == node).map(|f| f.lag));
    }
    Some(lags)
}
