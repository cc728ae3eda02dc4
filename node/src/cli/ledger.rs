//! `anthill ledger ...`: the ledger's commands and queries from the shell.
//!
//! Every subcommand names its `--book`. Commands take `--command-id` (a retry with the same id
//! returns the first result; without one the node generates an id and a retry is a new command).
//! A rejection is an error naming its code and reason; `--json` prints answers as JSON.
//! `--server` may name several nodes of a cluster: commands and queries go to the leader of the
//! book's partition (`router.rs`), resent when nothing was written and, for a command with
//! `--command-id`, also when its outcome is unknown (it runs at most once).

use anthill_proto::v1 as pb;
use anyhow::anyhow;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::ServerArg;
use crate::api::ledger::REJECTION_TRAILER;
use crate::client;
use crate::router::Router;

#[derive(Args)]
pub struct LedgerArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The book (e.g. a shop or tenant) the accounts are in.
    #[arg(long, short, global = true, default_value = "main")]
    book: String,
    /// Id of the command, for safe retries (commands only).
    #[arg(long, global = true, default_value = "")]
    command_id: String,
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Open an account.
    OpenAccount {
        account: String,
        /// Three uppercase letters, e.g. EUR.
        currency: String,
        #[arg(long, default_value_t = 0)]
        credit_limit: u64,
    },
    /// Put money into an account (amount in minor units, e.g. cents).
    Deposit { account: String, amount: u64 },
    /// Take money out of an account.
    Withdraw { account: String, amount: u64 },
    /// Move money between two accounts of one currency.
    Transfer {
        from: String,
        to: String,
        amount: u64,
        /// Transfer id (default: the command id).
        #[arg(long, default_value = "")]
        transfer: String,
    },
    /// Reserve funds on an account.
    Hold { hold: String, account: String, amount: u64 },
    /// Capture a hold (all of it unless --amount), to --to or out of the book.
    Capture {
        hold: String,
        #[arg(long, default_value_t = 0)]
        amount: u64,
        #[arg(long, default_value = "")]
        to: String,
    },
    /// Release a hold.
    Release { hold: String },
    /// Close an account (at zero balance, without holds).
    Close { account: String },
    /// Show an account's balance.
    Balance { account: String },
    /// Show a hold: its account, amount and status (open, captured or released).
    ShowHold { hold: String },
    /// Show an account's history.
    History {
        account: String,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show the book's totals per currency.
    Totals,
    /// Check every invariant of the book; fails when one is broken.
    Audit,
}

/// A rejection or failure as one line: the rejection code when there is one.
fn status_error(status: tonic::Status) -> anyhow::Error {
    match status.metadata().get(REJECTION_TRAILER).and_then(|v| v.to_str().ok()) {
        Some(_) => anyhow!("rejected: {}", status.message()),
        None => client::status_error(status),
    }
}

/// A command's request, to send to whichever node leads the book's partition.
#[derive(Clone)]
enum CommandRequest {
    Open(pb::OpenAccountRequest),
    Deposit(pb::DepositRequest),
    Withdraw(pb::WithdrawRequest),
    Transfer(pb::TransferRequest),
    Hold(pb::PlaceHoldRequest),
    Capture(pb::CaptureHoldRequest),
    Release(pb::ReleaseHoldRequest),
    Close(pb::CloseAccountRequest),
}

impl CommandRequest {
    async fn send(self, ledger: &mut pb::ledger_client::LedgerClient<crate::client::Conn>) -> Result<pb::CommandResponse, tonic::Status> {
        let response = match self {
            CommandRequest::Open(r) => ledger.open_account(r).await,
            CommandRequest::Deposit(r) => ledger.deposit(r).await,
            CommandRequest::Withdraw(r) => ledger.withdraw(r).await,
            CommandRequest::Transfer(r) => ledger.transfer(r).await,
            CommandRequest::Hold(r) => ledger.place_hold(r).await,
            CommandRequest::Capture(r) => ledger.capture_hold(r).await,
            CommandRequest::Release(r) => ledger.release_hold(r).await,
            CommandRequest::Close(r) => ledger.close_account(r).await,
        };
        response.map(tonic::Response::into_inner)
    }
}

pub async fn run(args: LedgerArgs) -> anyhow::Result<()> {
    let seeds: Vec<String> = args.server.server.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    let router = Router::connect(&seeds).await?;
    let partition = router.partition_of(&crate::app::stream_of("ledger", &args.book));
    let (book, command_id) = (args.book.clone(), args.command_id.clone());
    let request = match args.action {
        Action::OpenAccount { account, currency, credit_limit } => {
            CommandRequest::Open(pb::OpenAccountRequest { book, command_id, account, currency, credit_limit })
        }
        Action::Deposit { account, amount } => CommandRequest::Deposit(pb::DepositRequest { book, command_id, account, amount }),
        Action::Withdraw { account, amount } => CommandRequest::Withdraw(pb::WithdrawRequest { book, command_id, account, amount }),
        Action::Transfer { from, to, amount, transfer } => {
            CommandRequest::Transfer(pb::TransferRequest { book, command_id, from, to, amount, transfer })
        }
        Action::Hold { hold, account, amount } => CommandRequest::Hold(pb::PlaceHoldRequest { book, command_id, hold, account, amount }),
        Action::Capture { hold, amount, to } => CommandRequest::Capture(pb::CaptureHoldRequest { book, command_id, hold, amount, to }),
        Action::Release { hold } => CommandRequest::Release(pb::ReleaseHoldRequest { book, command_id, hold }),
        Action::Close { account } => CommandRequest::Close(pb::CloseAccountRequest { book, command_id, account }),
        query => {
            let json = args.json;
            let leader = router.on_leader(partition, |c| async move { Ok(c) }).await.map_err(status_error)?;
            return run_query(&mut leader.ledger.clone(), book, query, json).await;
        }
    };
    // With an id of the caller's the command runs at most once: resend it until it is answered.
    let send = |mut c: client::Clients| {
        let request = request.clone();
        async move { request.send(&mut c.ledger).await }
    };
    let done = if args.command_id.is_empty() {
        router.on_leader(partition, send).await
    } else {
        router.on_leader_idempotent(partition, send).await
    }
    .map_err(status_error)?;
    let answer = json!({
        "command_id": done.command_id, "duplicate": done.duplicate, "partition": done.partition,
        "first_position": done.first_position, "last_position": done.last_position,
        "stream_version": done.stream_version, "events": done.events,
    });
    if args.json {
        println!("{answer}");
    } else {
        let first = if done.duplicate { "duplicate of an accepted command; its first result:" } else { "accepted:" };
        println!(
            "{first} command {} wrote {} event(s) at positions {}..{} of partition {} (book {} at version {})",
            done.command_id, done.events, done.first_position, done.last_position, done.partition, args.book, done.stream_version
        );
    }
    Ok(())
}

async fn run_query(
    ledger: &mut pb::ledger_client::LedgerClient<crate::client::Conn>,
    book: String,
    query: Action,
    json_out: bool,
) -> anyhow::Result<()> {
    let (answer, text): (Value, String) = match query {
        Action::Balance { account } => {
            let b = ledger.get_balance(pb::GetBalanceRequest { book, account }).await.map_err(status_error)?.into_inner();
            let text = format!(
                "{} {}: balance {}, held {}, available {} (credit limit {}, {} holds{})\n",
                b.account,
                b.currency,
                b.balance,
                b.held,
                b.available,
                b.credit_limit,
                b.holds,
                if b.closed { ", closed" } else { "" }
            );
            let answer = json!({"account": b.account, "currency": b.currency, "balance": b.balance, "held": b.held,
                "available": b.available, "credit_limit": b.credit_limit, "holds": b.holds, "closed": b.closed});
            (answer, text)
        }
        Action::ShowHold { hold } => {
            let h = ledger.get_hold(pb::GetHoldRequest { book, hold }).await.map_err(status_error)?.into_inner();
            let text = format!("hold {} on {}: {} ({}), placed at {} µs\n", h.hold, h.account, h.amount, h.status, h.placed_at_us);
            (json!({"hold": h.hold, "account": h.account, "amount": h.amount, "status": h.status, "placed_at_us": h.placed_at_us}), text)
        }
        Action::History { account, from, limit } => {
            let h = ledger.get_history(pb::GetHistoryRequest { book, account, from, limit }).await.map_err(status_error)?.into_inner();
            let mut text = String::new();
            let entries: Vec<Value> = h
                .entries
                .iter()
                .map(|e| {
                    text.push_str(&format!(
                        "{:>6} {:<14} {:>+12} balance {:>12} held {:>10} {} {}\n",
                        e.entry, e.event, e.change, e.balance, e.held, e.counterparty, e.reference
                    ));
                    json!({"entry": e.entry, "event": e.event, "change": e.change, "balance": e.balance, "held": e.held,
                        "counterparty": e.counterparty, "reference": e.reference})
                })
                .collect();
            if h.next > 0 {
                text.push_str(&format!("more from entry {} (--from {})\n", h.next, h.next));
            }
            (json!({"entries": entries, "next": h.next}), text)
        }
        Action::Totals => {
            let t = ledger.get_totals(pb::GetTotalsRequest { book }).await.map_err(status_error)?.into_inner();
            let mut currencies: Vec<_> = t.currencies.into_iter().collect();
            currencies.sort_by(|a, b| a.0.cmp(&b.0));
            let mut text = String::new();
            let mut answer = serde_json::Map::new();
            for (currency, c) in currencies {
                text.push_str(&format!(
                    "{currency}: balance {} = deposited {} - withdrawn {}; held {}; accounts {} opened, {} closed\n",
                    c.balance, c.deposited, c.withdrawn, c.held, c.accounts_opened, c.accounts_closed
                ));
                answer.insert(
                    currency,
                    json!({"balance": c.balance, "held": c.held, "deposited": c.deposited, "withdrawn": c.withdrawn,
                        "accounts_opened": c.accounts_opened, "accounts_closed": c.accounts_closed}),
                );
            }
            (Value::Object(answer), text)
        }
        Action::Audit => {
            let a = ledger.audit(pb::AuditRequest { book }).await.map_err(status_error)?.into_inner();
            let mut text = format!(
                "{}: {} accounts, {} holds{}\n",
                if a.ok { "ok" } else { "BROKEN" },
                a.accounts,
                a.holds,
                if a.complete { "" } else { " (incomplete: too many to read at once)" }
            );
            for v in &a.violations {
                text.push_str(&format!("  - {v}\n"));
            }
            let answer = json!({"ok": a.ok, "complete": a.complete, "accounts": a.accounts, "holds": a.holds, "violations": a.violations});
            if json_out {
                println!("{answer}");
            } else {
                print!("{text}");
            }
            if !a.ok {
                anyhow::bail!("the audit found {} broken invariant(s)", a.violations.len());
            }
            return Ok(());
        }
        _ => unreachable!("commands are handled by run"),
    };
    if json_out {
        println!("{answer}");
    } else {
        print!("{text}");
    }
    Ok(())
}
