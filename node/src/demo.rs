//! `anthill demo`: the README's main job. Starts a real node on loopback with a fresh data
//! directory, pushes a short load at it while a subscriber follows along, shows optimistic
//! concurrency (two writers racing at the same expected version), runs ledger commands (transfers
//! between accounts from many clients, a retried command, a rejection, an audit), restarts the
//! node and checks that every acknowledged event is still there and the books still balance; then
//! runs a 3-node cluster, kills a leader under `quorum` load and shows the failover
//! ([`cluster`]), and prints what happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::{Context, ensure};
use clap::Args;
use tokio_stream::StreamExt;

mod cluster;

use crate::client::{self, Clients};
use crate::local::ChildNode;

#[derive(Args)]
pub struct DemoArgs {
    /// Events to append.
    #[arg(long, default_value_t = 50_000)]
    events: u64,
    /// Keep the node's data here (default: a temporary directory, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Nodes of the cluster act, on 127.0.0.11 on (2 to 12; 0 leaves the act out).
    #[arg(long, default_value_t = 3, value_parser = parse_nodes)]
    nodes: u16,
    /// Run the nodes in plain text (TLS is on by default, from a CA the demo makes).
    #[arg(long)]
    no_tls: bool,
    #[arg(long)]
    json: bool,
}

const STREAMS: u64 = 500;
const EVENTS_PER_APPEND: u64 = 10;
const WRITERS: u64 = 16;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let temp = tempfile::Builder::new().prefix("anthill-demo-").tempdir()?;
    let data_dir = args.data_dir.clone().unwrap_or_else(|| temp.path().join("node"));
    let exe = std::env::current_exe()?;
    let mut node_args = vec!["--log-level".to_string(), "warn".to_string()];
    // TLS: the node's port is fixed first, so its certificate can name its address.
    let listen: std::net::SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let scheme = if args.no_tls { "http" } else { "https" };
    if !args.no_tls {
        let certs = data_dir.with_extension("certs");
        let tls = crate::local::node_tls(&certs, "node-1", listen)?;
        crate::local::use_tls_as_admin(&certs)?;
        for (flag, file) in [("--tls-cert-file", &tls.cert_file), ("--tls-key-file", &tls.key_file), ("--tls-ca-file", &tls.ca_file)] {
            node_args.extend([flag.to_string(), file.display().to_string()]);
        }
        say(&args, format!("TLS on: a development CA and certificates in {} (the demo talks as client `admin`)", certs.display()));
    }
    let node = ChildNode::spawn_at(&exe, &data_dir, listen, &node_args)?;
    let url = format!("{scheme}://{}", node.grpc_addr);
    say(&args, format!("started a node at {url} with data in {}", data_dir.display()));
    let mut clients = client::connect(&url).await?;
    let initial = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
    let before = initial.total_events;

    // A subscriber follows every partition live (from just past its head) while the load runs.
    let partition_positions = initial.partitions.iter().map(|p| (p.partition, p.head_position + 1)).collect();
    let mut subscription = clients
        .log
        .subscribe(pb::SubscribeRequest { partition_positions, ..Default::default() })
        .await
        .map_err(client::status_error)?
        .into_inner();
    let live = Arc::new(AtomicU64::new(0));
    let follower = tokio::spawn({
        let live = live.clone();
        async move {
            while let Some(Ok(message)) = subscription.next().await {
                if let Some(pb::subscribe_response::Message::Event(_)) = message.message {
                    live.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    let appends = args.events.div_ceil(EVENTS_PER_APPEND);
    say(
        &args,
        format!("appending {} events to {STREAMS} streams, {EVENTS_PER_APPEND} per append, {WRITERS} writers", appends * EVENTS_PER_APPEND),
    );
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut c = clients.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = 0u64;
            for i in (w..appends).step_by(WRITERS as usize) {
                let events = (0..EVENTS_PER_APPEND)
                    .map(|k| pb::EventData {
                        r#type: "OrderLinePlaced".into(),
                        payload: format!(
                            "{{\"order\":{},\"line\":{k},\"sku\":\"sku-{}\",\"qty\":{}}}",
                            i % STREAMS,
                            (i * 7 + k) % 100,
                            k + 1
                        )
                        .into_bytes(),
                        metadata: [("source".to_string(), "demo".to_string())].into(),
                    })
                    .collect();
                let request = pb::AppendRequest {
                    durability: pb::Durability::Leader as i32,
                    stream: format!("order-{}", i % STREAMS),
                    expected_version: None,
                    events,
                };
                c.log.append(request).await.map_err(client::status_error)?;
                acknowledged += EVENTS_PER_APPEND;
            }
            anyhow::Ok(acknowledged)
        }));
    }
    let mut acknowledged = 0;
    for w in writers {
        acknowledged += w.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    say(
        &args,
        format!(
            "acknowledged {acknowledged} events in {elapsed:.2} s ({:.0} events/s, each durable before its ack)",
            acknowledged as f64 / elapsed
        ),
    );

    let race = race(&mut clients).await?;
    say(&args, race.clone());
    let ledger = ledger(&args, &clients).await?;

    let order = clients
        .log
        .read(pb::ReadRequest { stream: "order-7".into(), from_version: 1, max_count: 3, linearizable: false })
        .await
        .map_err(client::status_error)?
        .into_inner();
    say(&args, "first events of stream order-7:".into());
    for e in &order.events {
        say(&args, format!("  {}", client::event_line(e)));
    }

    // Let the subscriber catch up with everything acknowledged (bounded), then stop the node
    // cleanly and reopen its data.
    let status = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    while live.load(Ordering::Relaxed) < status.total_events - before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(clients);
    node.terminate(Duration::from_secs(30))?;
    let _ = follower.await;
    let live = live.load(Ordering::Relaxed);
    say(&args, format!("the subscriber saw {live} events live"));
    let node = ChildNode::spawn_at(&exe, &data_dir, listen, &node_args)?;
    let mut clients = client::connect(&url).await?;
    let reopened = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
    // + the race's winner (1 event), the setup event, and the ledger's events
    let expected_total = before + acknowledged + 2 + ledger.events;
    ensure!(
        reopened.total_events == status.total_events && status.total_events == expected_total,
        "after restart the node holds {} events; before it held {}, and {expected_total} were acknowledged",
        reopened.total_events,
        status.total_events
    );
    let audit = clients.ledger.audit(pb::AuditRequest { book: LEDGER_BOOK.into() }).await.map_err(client::status_error)?.into_inner();
    let totals =
        clients.ledger.get_totals(pb::GetTotalsRequest { book: LEDGER_BOOK.into() }).await.map_err(client::status_error)?.into_inner();
    ensure!(audit.ok, "after restart the ledger audit failed: {:?}", audit.violations);
    ensure!(totals.currencies["EUR"].balance == ledger.total_balance, "after restart the book's total balance changed");
    say(&args, format!("restarted: the ledger audit passes and book {LEDGER_BOOK} still holds {} EUR cents", ledger.total_balance));
    say(
        &args,
        format!(
            "restarted the node: all {} events are there, {} of storage used",
            reopened.total_events,
            client::human_bytes(reopened.db_size_bytes)
        ),
    );
    node.terminate(Duration::from_secs(30))?;

    if !args.json {
        print!("\n{}", client::status_text(&reopened));
    }
    let cluster = if args.nodes > 0 {
        say(&args, String::new());
        Some(cluster::run(&args, &temp.path().join("cluster")).await?)
    } else {
        None
    };

    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "url": url,
                "events_acknowledged": acknowledged,
                "seconds": elapsed,
                "events_per_sec": acknowledged as f64 / elapsed,
                "subscriber_live_events": live,
                "events_after_restart": reopened.total_events,
                "race": race,
                "ledger": {"events": ledger.events, "transfers_accepted": ledger.accepted, "transfers_rejected": ledger.rejected, "total_balance": ledger.total_balance},
                "status": client::status_json(&reopened),
                "cluster": cluster,
            })
        );
    }
    Ok(())
}

/// Two writers append to a new stream, both expecting it not to exist: exactly one wins.
async fn race(clients: &mut Clients) -> anyhow::Result<String> {
    let stream = format!("account-{}", std::process::id());
    let open = |who: &str| pb::AppendRequest {
        durability: pb::Durability::Leader as i32,
        stream: stream.clone(),
        expected_version: Some(pb::ExpectedVersion { kind: Some(pb::expected_version::Kind::NoStream(pb::Empty {})) }),
        events: vec![pb::EventData {
            r#type: "AccountOpened".into(),
            payload: format!("{{\"by\":\"{who}\"}}").into_bytes(),
            metadata: Default::default(),
        }],
    };
    let (mut a, mut b) = (clients.log.clone(), clients.log.clone());
    let (ra, rb) = tokio::join!(a.append(open("alice")), b.append(open("bob")));
    let (winner, loser) = match (ra, rb) {
        (Ok(_), Err(e)) => ("alice", e),
        (Err(e), Ok(_)) => ("bob", e),
        (ra, rb) => anyhow::bail!("expected exactly one winner, got {ra:?} and {rb:?}"),
    };
    ensure!(loser.code() == tonic::Code::FailedPrecondition, "the loser got {loser:?}");
    let actual = loser.metadata().get(crate::api::ACTUAL_VERSION_TRAILER).context("no actual version trailer")?.to_str()?.to_string();
    // The setup event: one more append after the race, at the exact version the loser learned.
    let mut retry = open("bob-retry");
    retry.expected_version = Some(pb::ExpectedVersion { kind: Some(pb::expected_version::Kind::Exact(actual.parse()?)) });
    clients.log.append(retry).await.map_err(client::status_error)?;
    Ok(format!("race on {stream}: {winner} won, the other got FAILED_PRECONDITION (actual version {actual}) and retried at that version"))
}

const LEDGER_BOOK: &str = "demo-shop";
const LEDGER_ACCOUNTS: u64 = 20;
const LEDGER_TRANSFERS: u64 = 2_000;

/// What the ledger part did.
struct LedgerRun {
    /// Events its accepted commands wrote.
    events: u64,
    accepted: u64,
    rejected: u64,
    total_balance: String,
}

/// Opens and funds accounts in one book, moves money between them from many clients (some
/// transfers are refused for lack of funds), retries one command by id, and audits the book.
async fn ledger(args: &DemoArgs, clients: &Clients) -> anyhow::Result<LedgerRun> {
    let book = || LEDGER_BOOK.to_string();
    let mut c = clients.clone();
    for a in 0..LEDGER_ACCOUNTS {
        let account = format!("acct-{a}");
        let open = pb::OpenAccountRequest {
            book: book(),
            command_id: format!("open-{a}"),
            account: account.clone(),
            currency: "EUR".into(),
            credit_limit: 0,
        };
        c.ledger.open_account(open).await.map_err(client::status_error)?;
        let fund = pb::DepositRequest { book: book(), command_id: format!("fund-{a}"), account, amount: 10_000 };
        c.ledger.deposit(fund).await.map_err(client::status_error)?;
    }
    say(
        args,
        format!(
            "ledger: opened {LEDGER_ACCOUNTS} accounts in book {LEDGER_BOOK} with 100.00 EUR each; {LEDGER_TRANSFERS} transfers from {WRITERS} clients"
        ),
    );
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WRITERS {
        let mut c = clients.clone();
        workers.push(tokio::spawn(async move {
            let (mut accepted, mut rejected) = (0u64, 0u64);
            for i in (w..LEDGER_TRANSFERS).step_by(WRITERS as usize) {
                let request = demo_transfer(i);
                match c.ledger.transfer(request).await {
                    Ok(_) => accepted += 1,
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => rejected += 1,
                    Err(status) => return Err(client::status_error(status)),
                }
            }
            anyhow::Ok((accepted, rejected))
        }));
    }
    let (mut accepted, mut rejected) = (0, 0);
    for w in workers {
        let (a, r) = w.await??;
        accepted += a;
        rejected += r;
    }
    let elapsed = started.elapsed().as_secs_f64();
    say(
        args,
        format!(
            "ledger: {accepted} transfers accepted, {rejected} refused for insufficient funds, in {elapsed:.2} s ({:.0} commands/s)",
            LEDGER_TRANSFERS as f64 / elapsed
        ),
    );
    // The very same command again, under its id: a client's retry after a lost answer.
    let retry = demo_transfer(0);
    // Events the retry wrote: none for a duplicate; t-0 may have been refused the first time, and
    // a refused command is decided again.
    let retry_events = match c.ledger.transfer(retry).await {
        Ok(r) if r.get_ref().duplicate => {
            say(
                args,
                format!(
                    "ledger: retrying command t-0 returned its first result (position {}), nothing new written",
                    r.get_ref().first_position
                ),
            );
            0
        }
        Ok(_) => {
            say(args, "ledger: command t-0 was refused the first time, so its retry was decided again and went through".into());
            1
        }
        Err(status) => {
            say(args, format!("ledger: command t-0 was refused the first time, and again: {}", status.message()));
            0
        }
    };
    let audit = c.ledger.audit(pb::AuditRequest { book: book() }).await.map_err(client::status_error)?.into_inner();
    ensure!(audit.ok, "the ledger audit failed: {:?}", audit.violations);
    let totals = c.ledger.get_totals(pb::GetTotalsRequest { book: book() }).await.map_err(client::status_error)?.into_inner();
    let total_balance = totals.currencies["EUR"].balance.clone();
    ensure!(total_balance == (LEDGER_ACCOUNTS * 10_000).to_string(), "transfers changed the book's total: {total_balance}");
    say(args, format!("ledger: audit ok, money conserved: the book holds {total_balance} EUR cents across {} accounts", audit.accounts));
    let stream = c
        .log
        .read(pb::ReadRequest { stream: format!("ledger/{LEDGER_BOOK}"), from_version: 1, max_count: 1, linearizable: false })
        .await
        .map_err(client::status_error)?
        .into_inner();
    if let Some(first) = stream.events.first() {
        say(args, format!("  {}", client::event_line(first)));
    }
    // Two events per account (opened, funded), one per accepted transfer, and the retry's.
    let events = 2 * LEDGER_ACCOUNTS + accepted + retry_events;
    let stored = ledger_stream_events(&mut c).await?;
    ensure!(stored == events, "the book's stream holds {stored} events, but {events} were acknowledged");
    Ok(LedgerRun { events, accepted, rejected, total_balance })
}

/// The demo's `i`-th transfer, with command id `t-{i}`.
fn demo_transfer(i: u64) -> pb::TransferRequest {
    let (from, to) = (i * 7 % LEDGER_ACCOUNTS, (i * 7 + 1 + i % 5) % LEDGER_ACCOUNTS);
    pb::TransferRequest {
        book: LEDGER_BOOK.into(),
        command_id: format!("t-{i}"),
        from: format!("acct-{from}"),
        to: format!("acct-{to}"),
        amount: 1 + i * 37 % 4_000,
        transfer: String::new(),
    }
}

/// Events in the demo book's stream.
async fn ledger_stream_events(c: &mut Clients) -> anyhow::Result<u64> {
    let mut events = 0;
    let mut from = 1;
    loop {
        let r = c
            .log
            .read(pb::ReadRequest { stream: format!("ledger/{LEDGER_BOOK}"), from_version: from, max_count: 0, linearizable: false })
            .await
            .map_err(client::status_error)?
            .into_inner();
        events += r.events.len() as u64;
        from = r.next;
        if r.end_of_stream {
            return Ok(events);
        }
    }
}

fn parse_nodes(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(n) if n == 0 || (2..=12).contains(&n) => Ok(n),
        _ => Err(format!("{text:?}: give 0 (no cluster) or 2 to 12 nodes")),
    }
}

fn say(args: &DemoArgs, line: String) {
    if args.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}
