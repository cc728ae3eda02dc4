//! `anthill demo`: the README's main job. Starts a real node on loopback with a fresh data
//! directory, pushes a short load at it while a subscriber follows along, shows optimistic
//! concurrency (two writers racing at the same expected version), restarts the node and checks
//! that every acknowledged event is still there, then prints what happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::{Context, ensure};
use clap::Args;
use tokio_stream::StreamExt;

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
    let node_args = ["--log-level".to_string(), "warn".to_string()];
    let node = ChildNode::spawn(&exe, &data_dir, &node_args)?;
    say(&args, format!("started a node at {} with data in {}", node.url(), data_dir.display()));
    let mut clients = client::connect(&node.url()).await?;
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
                let request = pb::AppendRequest { stream: format!("order-{}", i % STREAMS), expected_version: None, events };
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

    let order = clients
        .log
        .read(pb::ReadRequest { stream: "order-7".into(), from_version: 1, max_count: 3 })
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
    let node = ChildNode::spawn(&exe, &data_dir, &node_args)?;
    let mut clients = client::connect(&node.url()).await?;
    let reopened = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
    let expected_total = before + acknowledged + 2; // + the race's winner (1 event) and the setup event
    ensure!(
        reopened.total_events == status.total_events && status.total_events == expected_total,
        "after restart the node holds {} events; before it held {}, and {expected_total} were acknowledged",
        reopened.total_events,
        status.total_events
    );
    say(
        &args,
        format!(
            "restarted the node: all {} events are there, {} of storage used",
            reopened.total_events,
            client::human_bytes(reopened.db_size_bytes)
        ),
    );
    node.terminate(Duration::from_secs(30))?;

    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "events_acknowledged": acknowledged,
                "seconds": elapsed,
                "events_per_sec": acknowledged as f64 / elapsed,
                "subscriber_live_events": live,
                "events_after_restart": reopened.total_events,
                "race": race,
                "status": client::status_json(&reopened),
            })
        );
    } else {
        print!("\n{}", client::status_text(&reopened));
    }
    Ok(())
}

/// Two writers append to a new stream, both expecting it not to exist: exactly one wins.
async fn race(clients: &mut Clients) -> anyhow::Result<String> {
    let stream = format!("account-{}", std::process::id());
    let open = |who: &str| pb::AppendRequest {
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

fn say(args: &DemoArgs, line: String) {
    if args.json {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}
