//! The ledger over real gRPC against a real `anthill` process: commands, rejections with their
//! trailers, command-id retries (also across a restart), queries, and a `kill -9` in the middle
//! of concurrent transfers after which the books still balance and match a replay of the log.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anthill_node::api::ledger::{REJECTION_DETAIL_TRAILER, REJECTION_TRAILER};
use anthill_node::app::ledger::query::balance;
use anthill_node::app::ledger::{Ledger, LedgerEvent};
use anthill_node::app::specs::runner::Sandbox;
use anthill_node::app::{COMMAND_ID_METADATA_KEY, from_log_event};
use anthill_node::client::Clients;
use anthill_proto::v1 as pb;
use common::{start, start_in};
use parking_lot::Mutex;

fn open(book: &str, account: &str, currency: &str, credit_limit: u64) -> pb::OpenAccountRequest {
    pb::OpenAccountRequest {
        book: book.into(),
        command_id: String::new(),
        account: account.into(),
        currency: currency.into(),
        credit_limit,
    }
}

fn deposit(book: &str, id: &str, account: &str, amount: u64) -> pb::DepositRequest {
    pb::DepositRequest { book: book.into(), command_id: id.into(), account: account.into(), amount }
}

fn transfer(book: &str, id: &str, from: &str, to: &str, amount: u64) -> pb::TransferRequest {
    pb::TransferRequest { book: book.into(), command_id: id.into(), from: from.into(), to: to.into(), amount, transfer: String::new() }
}

async fn balance_of(clients: &mut Clients, book: &str, account: &str) -> pb::Balance {
    clients.ledger.get_balance(pb::GetBalanceRequest { book: book.into(), account: account.into() }).await.unwrap().into_inner()
}

/// Every event of a book's stream, decoded.
async fn book_events(clients: &mut Clients, book: &str) -> Vec<(LedgerEvent, pb::RecordedEvent)> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let r = clients
            .log
            .read(pb::ReadRequest { stream: format!("ledger/{book}"), from_version: from, max_count: 1000, linearizable: false })
            .await
            .unwrap()
            .into_inner();
        for e in r.events {
            let event: LedgerEvent = from_log_event(&e.r#type, &e.payload).unwrap();
            out.push((event, e));
        }
        from = r.next;
        if r.end_of_stream {
            return out;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_accounts_when_money_moves_then_balances_history_and_totals_follow_and_rejections_carry_their_code() {
    let mut t = start(&[]).await;
    let c = &mut t.clients;
    c.ledger.open_account(open("shop", "alice", "EUR", 0)).await.unwrap();
    c.ledger.open_account(open("shop", "bob", "EUR", 50)).await.unwrap();
    c.ledger.deposit(deposit("shop", "", "alice", 100)).await.unwrap();
    let moved = c.ledger.transfer(transfer("shop", "t-1", "alice", "bob", 70)).await.unwrap().into_inner();
    assert_eq!((moved.events, moved.stream_version, moved.duplicate), (1, 4, false));

    let refused = c.ledger.transfer(transfer("shop", "t-2", "bob", "alice", 121)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert_eq!(refused.metadata().get(REJECTION_TRAILER).unwrap(), "InsufficientFunds");
    let detail: serde_json::Value =
        serde_json::from_str(refused.metadata().get(REJECTION_DETAIL_TRAILER).unwrap().to_str().unwrap()).unwrap();
    assert_eq!(detail["InsufficientFunds"]["available"], 120, "{detail}");
    let unknown = c.ledger.deposit(deposit("shop", "", "carol", 1)).await.unwrap_err();
    assert_eq!(
        (unknown.code(), unknown.metadata().get(REJECTION_TRAILER).unwrap().to_str().unwrap()),
        (tonic::Code::NotFound, "AccountNotFound")
    );
    let bad_book = c.ledger.deposit(deposit("no spaces", "", "alice", 1)).await.unwrap_err();
    assert_eq!(bad_book.code(), tonic::Code::InvalidArgument);

    let (alice, bob) = (balance_of(c, "shop", "alice").await, balance_of(c, "shop", "bob").await);
    assert_eq!((alice.balance, alice.available), (30, 30));
    assert_eq!((bob.balance, bob.available), (70, 120));
    let history = c
        .ledger
        .get_history(pb::GetHistoryRequest { book: "shop".into(), account: "bob".into(), from: 0, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    let lines: Vec<(&str, i64, &str)> = history.entries.iter().map(|e| (e.event.as_str(), e.change, e.reference.as_str())).collect();
    assert_eq!(lines, [("AccountOpened", 0, ""), ("Transferred", 70, "t-1")]);
    let totals = c.ledger.get_totals(pb::GetTotalsRequest { book: "shop".into() }).await.unwrap().into_inner();
    let eur = &totals.currencies["EUR"];
    assert_eq!((eur.balance.as_str(), eur.deposited.as_str(), eur.accounts_opened), ("100", "100", 2));
    // A captured hold keeps its record, with its status.
    let hold =
        pb::PlaceHoldRequest { book: "shop".into(), command_id: String::new(), hold: "h-1".into(), account: "bob".into(), amount: 20 };
    c.ledger.place_hold(hold).await.unwrap();
    let capture =
        pb::CaptureHoldRequest { book: "shop".into(), command_id: String::new(), hold: "h-1".into(), amount: 0, to: "alice".into() };
    c.ledger.capture_hold(capture).await.unwrap();
    let info = c.ledger.get_hold(pb::GetHoldRequest { book: "shop".into(), hold: "h-1".into() }).await.unwrap().into_inner();
    assert_eq!((info.status.as_str(), info.amount), ("captured", 20));
    assert!(c.ledger.audit(pb::AuditRequest { book: "shop".into() }).await.unwrap().into_inner().ok);

    // Rejected commands wrote nothing: the book's stream holds exactly the four accepted ones,
    // each with its command id in its metadata.
    let events = book_events(c, "shop").await;
    assert_eq!(events.len(), 6, "four commands, a hold and its capture");
    assert_eq!(events[3].1.metadata.get(COMMAND_ID_METADATA_KEY).map(String::as_str), Some("t-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_retried_command_id_then_the_first_result_returns_even_after_a_restart_and_nothing_is_written_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let (node, mut c) = start_in(&data, &[]).await;
    c.ledger.open_account(open("b", "alice", "EUR", 0)).await.unwrap();
    let first = c.ledger.deposit(deposit("b", "pay-1", "alice", 40)).await.unwrap().into_inner();
    let again = c.ledger.deposit(deposit("b", "pay-1", "alice", 40)).await.unwrap().into_inner();
    assert!(again.duplicate && !first.duplicate);
    assert_eq!((again.first_position, again.stream_version), (first.first_position, first.stream_version));
    // The same id for another command is refused, not taken for a retry.
    let reused = c.ledger.deposit(deposit("b", "pay-1", "alice", 41)).await.unwrap_err();
    assert_eq!(reused.code(), tonic::Code::AlreadyExists);
    assert_eq!(reused.metadata().get(REJECTION_TRAILER).unwrap(), "CommandIdReused");
    // The same id on another book is another command.
    c.ledger.open_account(open("other", "alice", "EUR", 0)).await.unwrap();
    assert!(!c.ledger.deposit(deposit("other", "pay-1", "alice", 5)).await.unwrap().into_inner().duplicate);
    drop(c);
    tokio::task::spawn_blocking(move || node.kill9()).await.unwrap().unwrap();

    let (node, mut c) = start_in(&data, &[]).await;
    let after_restart = c.ledger.deposit(deposit("b", "pay-1", "alice", 40)).await.unwrap().into_inner();
    assert!(after_restart.duplicate, "the command id was forgotten by the restart");
    assert_eq!(after_restart.stream_version, first.stream_version);
    assert_eq!(balance_of(&mut c, "b", "alice").await.balance, 40, "the retried deposit was counted twice");
    drop(c);
    tokio::task::spawn_blocking(move || node.terminate(Duration::from_secs(20))).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_ledger_stream_when_appended_to_directly_then_it_is_refused() {
    let mut t = start(&[]).await;
    let request = common::append("ledger/shop", None, vec![common::event("Deposited", r#"{"account":"a","amount":5}"#)]);
    let refused = t.clients.log.append(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("belongs to a domain"), "{}", refused.message());
}

const ACCOUNTS: usize = 8;
const INITIAL_BALANCE: u64 = 1_000;
const WORKERS: usize = 16;

/// Transfers acknowledged by the node.
type Acked = Arc<Mutex<Vec<pb::TransferRequest>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_sigkill_during_concurrent_transfers_when_restarted_then_money_is_conserved_and_state_matches_a_replay_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let (node, mut c) = start_in(&data, &[]).await;
    for a in 0..ACCOUNTS {
        c.ledger.open_account(open("load", &format!("acct-{a}"), "EUR", 0)).await.unwrap();
        c.ledger.deposit(deposit("load", &format!("seed-{a}"), &format!("acct-{a}"), INITIAL_BALANCE)).await.unwrap();
    }
    let acked: Acked = Arc::default();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (mut c, acked) = (c.clone(), acked.clone());
            tokio::spawn(async move {
                for i in 0u64.. {
                    let (from, to) = ((w + i as usize) % ACCOUNTS, (w * 3 + i as usize + 1) % ACCOUNTS);
                    if from == to {
                        continue;
                    }
                    let id = format!("w{w}-{i}");
                    let request = transfer("load", &id, &format!("acct-{from}"), &format!("acct-{to}"), 1 + i % 97);
                    match c.ledger.transfer(request.clone()).await {
                        Ok(_) => acked.lock().push(request),
                        Err(status) if status.code() == tonic::Code::FailedPrecondition => {}
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    tokio::task::spawn_blocking(move || node.kill9()).await.unwrap().unwrap();
    for w in workers {
        w.await.unwrap();
    }
    drop(c);
    let acked = acked.lock().clone();
    assert!(acked.len() > 50, "only {} transfers acknowledged before the kill", acked.len());

    let (node, mut c) = start_in(&data, &[]).await;
    let audit = c.ledger.audit(pb::AuditRequest { book: "load".into() }).await.unwrap().into_inner();
    assert!(audit.ok, "{:?}", audit.violations);
    let totals = c.ledger.get_totals(pb::GetTotalsRequest { book: "load".into() }).await.unwrap().into_inner();
    assert_eq!(totals.currencies["EUR"].balance, (ACCOUNTS as u64 * INITIAL_BALANCE).to_string(), "transfers created or destroyed money");

    // Every acknowledged transfer is in the log, once; retrying it is a duplicate.
    let events = book_events(&mut c, "load").await;
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for (_, e) in &events {
        *by_id.entry(e.metadata[COMMAND_ID_METADATA_KEY].as_str()).or_default() += 1;
    }
    for request in &acked {
        let id = &request.command_id;
        assert_eq!(by_id.get(id.as_str()), Some(&1), "acknowledged transfer {id} is missing or stored twice");
    }
    let retry = c.ledger.transfer(acked[acked.len() / 2].clone()).await.unwrap().into_inner();
    assert!(retry.duplicate);

    // The state the node holds is what the log rebuilds.
    let decoded: Vec<LedgerEvent> = events.into_iter().map(|(event, _)| event).collect();
    let sandbox = Sandbox::new().unwrap();
    let rebuilt: BTreeMap<String, i64> = sandbox
        .replay::<Ledger, _>("load", &decoded, |view| {
            (0..ACCOUNTS).map(|a| format!("acct-{a}")).map(|id| (id.clone(), balance(view, &id).unwrap().balance)).collect()
        })
        .unwrap();
    for (account, expected) in rebuilt {
        assert_eq!(balance_of(&mut c, "load", &account).await.balance, expected, "{account} differs from a replay of the log");
    }
    drop(c);
    tokio::task::spawn_blocking(move || node.terminate(Duration::from_secs(20))).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn given_a_command_id_older_than_the_retention_when_retried_then_it_is_a_new_command() {
    let mut t = start(&["--command-id-retention-s", "1"]).await;
    let c = &mut t.clients;
    c.ledger.open_account(open("b", "alice", "EUR", 0)).await.unwrap();
    c.ledger.deposit(deposit("b", "old", "alice", 10)).await.unwrap();
    assert!(c.ledger.deposit(deposit("b", "old", "alice", 10)).await.unwrap().into_inner().duplicate, "within the window");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    // Any command's group commit expires the records past the window.
    c.ledger.deposit(deposit("b", "new", "alice", 1)).await.unwrap();
    let retried = c.ledger.deposit(deposit("b", "old", "alice", 10)).await.unwrap().into_inner();
    assert!(!retried.duplicate, "the id outlived its retention");
    assert_eq!(balance_of(c, "b", "alice").await.balance, 21);
}
