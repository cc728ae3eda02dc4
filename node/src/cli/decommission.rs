//! `anthill decommission`: takes a member out of every partition's replica set (or lets it back
//! in with `--undo`), then follows the moves until no replica set names it (with `--undo`, until
//! no partition is moving), showing progress; `--json` for the report.

use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::bail;
use clap::Args;
use serde_json::json;

use super::ServerArg;
use crate::client;

#[derive(Args)]
pub(crate) struct DecommissionArgs {
    /// The member's name (`cluster.members[].name`).
    node: String,
    #[command(flatten)]
    server: ServerArg,
    /// Let a decommissioned member back into the replica sets.
    #[arg(long)]
    undo: bool,
    /// Return once the request is taken, without following the moves.
    #[arg(long)]
    no_wait: bool,
    /// Give up following after this many seconds (the moves go on).
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    #[arg(long)]
    json: bool,
}

/// Whom to follow the moves through: `asked`, unless it is the member being decommissioned,
/// which leaves the coordination group once its replicas moved and from then on no longer hears
/// of the cluster; then the first other live member that answers (or `asked` if none does).
async fn watcher(mut asked: client::Clients, node: &str) -> client::Clients {
    let Ok(status) = asked.node.status(pb::StatusRequest {}).await.map(|s| s.into_inner()) else { return asked };
    if status.node_id != node {
        return asked;
    }
    let others = status.cluster.iter().flat_map(|c| &c.members).filter(|m| m.live && m.name != node && !m.address.is_empty());
    for member in others {
        if let Ok(clients) = client::connect(&member.address).await {
            return clients;
        }
    }
    asked
}

/// Where the moves stand: partitions whose set still names the node, and partitions moving.
fn progress(status: &pb::StatusResponse, node: &str) -> (Vec<u32>, Vec<u32>) {
    let partitions = status.cluster.as_ref().map(|c| c.partitions.as_slice()).unwrap_or_default();
    let naming = partitions.iter().filter(|p| p.replicas.iter().any(|r| r == node)).map(|p| p.partition).collect();
    let moving = partitions.iter().filter(|p| !p.target.is_empty()).map(|p| p.partition).collect();
    (naming, moving)
}

pub(crate) async fn run(args: DecommissionArgs) -> anyhow::Result<()> {
    let server = args.server.server.split(',').next().unwrap_or_default().trim().to_string();
    let mut clients = client::connect(&server).await?;
    let request = pb::DecommissionRequest { node: args.node.clone(), undo: args.undo };
    let at_start = clients.node.decommission(request).await.map_err(client::status_error)?.into_inner().partitions;
    let started = Instant::now();
    if !args.json {
        let what = if args.undo { "back in the replica sets" } else { "out of the replica sets" };
        eprintln!("{}: {what}; {} partitions name it now", args.node, at_start.len());
    }
    let (mut naming, mut moving) = (at_start.clone(), Vec::new());
    let mut done = args.no_wait;
    if !done {
        clients = watcher(clients, &args.node).await;
    }
    let mut shown: Option<((usize, usize), Instant)> = None;
    while !done {
        let status = clients.node.status(pb::StatusRequest {}).await.map_err(client::status_error)?.into_inner();
        (naming, moving) = progress(&status, &args.node);
        done = moving.is_empty() && (args.undo || naming.is_empty());
        // A line when the counts change, else every 10 s.
        let now = (naming.len(), moving.len());
        if !args.json && (done || shown.is_none_or(|(then, at)| then != now || at.elapsed() >= Duration::from_secs(10))) {
            shown = Some((now, Instant::now()));
            eprintln!("  {:>6.1} s: {} partitions name {}, {} moving", started.elapsed().as_secs_f64(), now.0, args.node, now.1);
        }
        if done {
            break;
        }
        if started.elapsed() > Duration::from_secs(args.timeout_s) {
            bail!(
                "{} partitions still name {} after {} s (the moves go on; `anthill status` shows them): {naming:?}",
                naming.len(),
                args.node,
                args.timeout_s
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let report = json!({
            "node": args.node, "undo": args.undo, "waited": !args.no_wait, "seconds": seconds,
            "partitions_at_start": at_start, "partitions_naming_it": naming, "partitions_moving": moving,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if args.no_wait {
        println!("{}: requested; `anthill status` shows the partitions moving", args.node);
    } else if args.undo {
        println!("{}: back in the replica sets; {} partitions name it ({seconds:.1} s)", args.node, naming.len());
    } else {
        println!("{}: no replica set names it any more ({seconds:.1} s); it can be stopped", args.node);
    }
    Ok(())
}
