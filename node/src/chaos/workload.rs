//! The chaos run's clients: tasks that send operations through the routing client as fast as
//! they are answered (max rate) or paced to a total rate (fixed rate), and record each one in the
//! history ([`super::history`]).
//!
//! Two kinds of operation, half and half:
//! - a raw append of one event, `quorum`-acknowledged, to one of 32 streams spread over the
//!   partitions; its payload is the operation's id. A raw append carries no command id, so an
//!   unknown outcome is not resent: the read decides whether it was applied.
//! - a ledger transfer between two accounts of a book (one book per partition, opened before the
//!   load starts), with the command id `chaos-{id}`. An unknown outcome is resent with the same
//!   id (the node answers a resend with the first result), and a rejection (insufficient funds,
//!   from the ledger's rules) is a definite failure: nothing was written. Its one event
//!   (`Transferred`) carries the command id in its metadata, which is how the checker finds it.
//!
//! The routing client waits at most [`ATTEMPT_TIMEOUT`] for one attempt's answer; then it
//! reloads its table, so a stopped leader keeps the clients no longer than that.
//!
//! Every account starts with [`OPENING_DEPOSIT`]; half of them may go [`CREDIT_LIMIT`] below
//! zero. Transfers move money only inside a book, so each book's totals stay what was deposited
//! ([`super::run`] checks them and the ledger's audit on every replica).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anthill_proto::v1 as pb;
use anyhow::Context;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;
use tonic::Status;

use super::history::{OpKind, Outcome, Record};
use crate::api::ledger::REJECTION_TRAILER;
use crate::app::stream_of;
use crate::log;
use crate::router::Router;

/// How long one operation may take before its outcome counts as unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the routing client waits for one attempt's answer before it reloads its table and
/// takes the outcome as unknown (`Router::attempt_timeout`): a stopped leader keeps a request
/// no longer than this.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Streams the raw appends go to (spread over the partitions).
const STREAMS: u64 = 32;
/// Accounts in each book.
pub const BOOK_ACCOUNTS: usize = 6;
/// What each account is opened with.
pub const OPENING_DEPOSIT: u64 = 1_000;
/// How far below zero the odd-numbered accounts may go (the others not at all).
pub const CREDIT_LIMIT: u64 = 200;
/// The largest transfer: large enough that some are refused for want of funds.
const MAX_TRANSFER: u64 = 400;
/// The command ids of the clients' transfers start with this, followed by the operation's id.
pub const COMMAND_ID_PREFIX: &str = "chaos-";

/// A ledger book the transfers use: all its accounts on one partition.
#[derive(Debug, Clone)]
pub struct Book {
    pub name: String,
    pub partition: u32,
}

/// One book per partition, so every partition runs ledger commands.
pub fn books(partitions: u32) -> Vec<Book> {
    (0..partitions)
        .map(|p| {
            let name = (0..)
                .map(|n| format!("chaos-book-{n}"))
                .find(|name| log::partition_of(&stream_of("ledger", name), partitions) == p)
                .expect("some name hashes to every partition");
            Book { name, partition: p }
        })
        .collect()
}

pub fn account(k: usize) -> String {
    format!("account-{k}")
}

pub fn credit_limit(k: usize) -> u64 {
    if k % 2 == 1 { CREDIT_LIMIT } else { 0 }
}

/// Opens every book's accounts and makes the opening deposits (command ids make this safe to
/// resend; it runs before any fault).
pub async fn open_books(router: &Router, books: &[Book]) -> anyhow::Result<()> {
    for book in books {
        for k in 0..BOOK_ACCOUNTS {
            let open = pb::OpenAccountRequest {
                book: book.name.clone(),
                command_id: format!("setup-open-{k}"),
                account: account(k),
                currency: "EUR".into(),
                credit_limit: credit_limit(k),
            };
            router
                .on_leader_idempotent(book.partition, |mut c| {
                    let open = open.clone();
                    async move { c.ledger.open_account(open).await }
                })
                .await
                .with_context(|| format!("cannot open {} in book {}", account(k), book.name))?;
            let deposit = pb::DepositRequest {
                book: book.name.clone(),
                command_id: format!("setup-deposit-{k}"),
                account: account(k),
                amount: OPENING_DEPOSIT,
            };
            router
                .on_leader_idempotent(book.partition, |mut c| {
                    let deposit = deposit.clone();
                    async move { c.ledger.deposit(deposit).await }
                })
                .await
                .with_context(|| format!("cannot deposit into {} in book {}", account(k), book.name))?;
        }
    }
    Ok(())
}

/// How the clients send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub clients: usize,
    /// Operations per second, all clients together; `None`: as fast as they are answered.
    pub rate: Option<f64>,
    pub partitions: u32,
    pub seed: u64,
}

/// The running clients.
pub struct Load {
    tasks: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<Vec<Record>>>,
}

impl Load {
    /// Starts the clients; times in the history count from `started`.
    pub fn start(router: Arc<Router>, books: Arc<Vec<Book>>, spec: &LoadSpec, started: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let history: Arc<Mutex<Vec<Record>>> = Arc::default();
        let next_op = Arc::new(AtomicU64::new(1));
        let tasks = (0..spec.clients)
            .map(|c| {
                let client = Client {
                    router: router.clone(),
                    books: books.clone(),
                    partitions: spec.partitions,
                    started,
                    rng: StdRng::seed_from_u64(spec.seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                };
                let pace = spec.rate.map(|rate| Duration::from_secs_f64(spec.clients as f64 / rate));
                tokio::spawn(client.run(pace, stop.clone(), history.clone(), next_op.clone()))
            })
            .collect();
        Load { tasks, stop, history }
    }

    /// Operations completed so far, and how many of them were acknowledged.
    pub fn progress(&self) -> (usize, usize) {
        let history = self.history.lock();
        (history.len(), history.iter().filter(|r| r.outcome == Outcome::Ok).count())
    }

    /// Stops the clients once their operations in flight are answered (or timed out), and
    /// returns the history.
    pub async fn stop(self) -> anyhow::Result<Vec<Record>> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.context("a client task panicked")?;
        }
        let mut history = std::mem::take(&mut *self.history.lock());
        history.sort_by_key(|r| r.invoked_ms);
        Ok(history)
    }
}

struct Client {
    router: Arc<Router>,
    books: Arc<Vec<Book>>,
    partitions: u32,
    started: Instant,
    rng: StdRng,
}

impl Client {
    async fn run(mut self, pace: Option<Duration>, stop: Arc<AtomicBool>, history: Arc<Mutex<Vec<Record>>>, next_op: Arc<AtomicU64>) {
        let mut ticks = pace.map(|every| {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        while !stop.load(Ordering::Relaxed) {
            if let Some(ticks) = ticks.as_mut() {
                ticks.tick().await;
            }
            let id = next_op.fetch_add(1, Ordering::Relaxed);
            let invoked_ms = self.now_ms();
            let (kind, (partition, value, outcome)) = if !self.books.is_empty() && self.rng.random_bool(0.5) {
                (OpKind::Transfer, self.transfer(id).await)
            } else {
                (OpKind::Append, self.append(id).await)
            };
            let completed_ms = self.now_ms();
            history.lock().push(Record { id, kind, value, partition, invoked_ms, completed_ms, outcome });
            if outcome == Outcome::Unknown {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Appends; the partition, what was asked (the stream), and the outcome.
    async fn append(&mut self, id: u64) -> (u32, String, Outcome) {
        let stream = format!("chaos-{}", id % STREAMS);
        let value = stream.clone();
        let partition = log::partition_of(&stream, self.partitions);
        let request = pb::AppendRequest {
            durability: pb::Durability::Quorum as i32,
            stream,
            expected_version: None,
            events: vec![pb::EventData { r#type: "Op".into(), payload: id.to_string().into_bytes(), metadata: Default::default() }],
        };
        // Any error may follow a write (the router resends only refusals that wrote nothing).
        let outcome = match tokio::time::timeout(OP_TIMEOUT, self.router.append(request)).await {
            Ok(Ok(_)) => Outcome::Ok,
            _ => Outcome::Unknown,
        };
        (partition, value, outcome)
    }

    /// Transfers; the partition, what was asked (book, accounts, amount), and the outcome.
    async fn transfer(&mut self, id: u64) -> (u32, String, Outcome) {
        let book = &self.books[self.rng.random_range(0..self.books.len())];
        let from = self.rng.random_range(0..BOOK_ACCOUNTS);
        let to = (from + self.rng.random_range(1..BOOK_ACCOUNTS)) % BOOK_ACCOUNTS;
        let request = pb::TransferRequest {
            book: book.name.clone(),
            command_id: format!("{COMMAND_ID_PREFIX}{id}"),
            from: account(from),
            to: account(to),
            amount: self.rng.random_range(1..=MAX_TRANSFER),
            transfer: String::new(),
        };
        let value = format!("{} {} -> {} {}", book.name, request.from, request.to, request.amount);
        // Sent once more with the same id when the first outcome is unknown.
        for _ in 0..2 {
            let sent = self.router.on_leader_idempotent(book.partition, |mut c| {
                let request = request.clone();
                async move { c.ledger.transfer(request).await }
            });
            match tokio::time::timeout(OP_TIMEOUT, sent).await {
                Ok(Ok(_)) => return (book.partition, value, Outcome::Ok),
                Ok(Err(status)) if is_rejection(&status) => return (book.partition, value, Outcome::Fail),
                _ => {}
            }
        }
        (book.partition, value, Outcome::Unknown)
    }
}

/// A refusal by the ledger's rules: nothing was written.
fn is_rejection(status: &Status) -> bool {
    status.metadata().get(REJECTION_TRAILER).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_gets_one_book_whose_stream_hashes_there() {
        let books = books(8);
        assert_eq!(books.len(), 8);
        for (p, book) in books.iter().enumerate() {
            assert_eq!((book.partition, log::partition_of(&stream_of("ledger", &book.name), 8)), (p as u32, p as u32));
        }
    }
}
