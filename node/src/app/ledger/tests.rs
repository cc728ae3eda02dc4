//! Property tests of the ledger through the processor's own [`execute`], in a real LMDB sandbox:
//! random command sequences keep every invariant, a rejection changes nothing, and replaying the
//! produced events into an empty state rebuilds exactly the same state.

use std::collections::HashMap;

use proptest::prelude::*;
use serde_json::Value as Json;

use super::query::{audit, balance};
use super::{Ledger, LedgerCommand as C, LedgerEvent as E};
use crate::app::commands::CommandRecord;
use crate::app::processor::{Executed, Failure, execute};
use crate::app::specs::runner::Sandbox;
use crate::app::{Context, StateView, state};
use crate::storage::keys::Value;

const SCOPE: &str = "prop";
const ACCOUNTS: [&str; 4] = ["a0", "a1", "a2", "a3"];
const HOLDS: [&str; 3] = ["h0", "h1", "h2"];

fn account() -> impl Strategy<Value = String> {
    (0..ACCOUNTS.len()).prop_map(|i| ACCOUNTS[i].to_string())
}

fn amount() -> impl Strategy<Value = u64> {
    prop_oneof![1 => Just(0u64), 8 => 1u64..300, 1 => Just(super::MAX_AMOUNT + 1)]
}

fn command() -> impl Strategy<Value = C> {
    let hold = (0..HOLDS.len()).prop_map(|i| HOLDS[i].to_string());
    prop_oneof![
        3 => (account(), prop_oneof![3 => Just("EUR"), 1 => Just("USD"), 1 => Just("bad")], 0u64..100)
            .prop_map(|(account, currency, credit_limit)| C::OpenAccount { account, currency: currency.into(), credit_limit }),
        4 => (account(), amount()).prop_map(|(account, amount)| C::Deposit { account, amount }),
        3 => (account(), amount()).prop_map(|(account, amount)| C::Withdraw { account, amount }),
        4 => (account(), account(), amount()).prop_map(|(from, to, amount)| C::Transfer { from, to, amount, transfer: None }),
        2 => (hold.clone(), account(), amount()).prop_map(|(hold, account, amount)| C::PlaceHold { hold, account, amount }),
        2 => (hold.clone(), proptest::option::of(amount()), proptest::option::of(account()))
            .prop_map(|(hold, amount, to)| C::CaptureHold { hold, amount, to }),
        1 => hold.prop_map(|hold| C::ReleaseHold { hold }),
        1 => account().prop_map(|account| C::CloseAccount { account }),
    ]
}

/// Every key and value of the scope's subspace.
fn dump(view: &StateView<'_>) -> Vec<(Vec<Value>, Json)> {
    view.scan(&[], None, usize::MAX).unwrap()
}

/// Balances as a plain model of the events computes them (independent of `evolve`).
fn model_apply(balances: &mut HashMap<String, i64>, event: &E) {
    match event {
        E::AccountOpened { account, .. } => {
            balances.insert(account.clone(), 0);
        }
        E::Deposited { account, amount } => *balances.get_mut(account).unwrap() += *amount as i64,
        E::Withdrawn { account, amount } => *balances.get_mut(account).unwrap() -= *amount as i64,
        E::Transferred { from, to, amount, .. } => {
            *balances.get_mut(from).unwrap() -= *amount as i64;
            *balances.get_mut(to).unwrap() += *amount as i64;
        }
        E::HoldCaptured { account, amount, to, .. } => {
            *balances.get_mut(account).unwrap() -= *amount as i64;
            if let Some(to) = to {
                *balances.get_mut(to).unwrap() += *amount as i64;
            }
        }
        E::HoldPlaced { .. } | E::HoldReleased { .. } | E::AccountClosed { .. } => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn random_commands_keep_every_invariant_and_replaying_their_events_rebuilds_the_state(
        commands in proptest::collection::vec((command(), 0u8..12), 1..60)
    ) {
        let sandbox = Sandbox::new().unwrap();
        let stream = crate::app::stream_of("ledger", SCOPE);
        let prefix = state::subspace("ledger", SCOPE);
        let (produced, final_state) = sandbox.scratch(|txn, db| {
            let mut produced = Vec::new();
            let mut balances = HashMap::new();
            let mut version = 0u64;
            for (i, (command, id)) in commands.iter().enumerate() {
                // Ids 0..=3 repeat across the sequence (retries); the others are unique.
                let command_id = if *id < 4 { format!("retry-{id}") } else { format!("c-{i}") };
                let ctx = Context { now_us: 1_000 + i as u64, command_id: &command_id, remember_id: true, ids_since_us: 0 };
                let before = dump(&StateView::new(txn, db, &prefix));
                let place = |_: &mut heed::RwTxn<'_>, events: &[E], _hash: u64| {
                    version += events.len() as u64;
                    Ok(CommandRecord { partition: 0, first_position: 0, last_position: 0, stream_version: version, events: events.len() as u32, recorded_at_us: 0, command_hash: 0 })
                };
                match execute::<Ledger>(txn, db, &stream, SCOPE, command, &ctx, None, None, place).unwrap() {
                    Ok(Executed::Accepted { events, .. }) => {
                        prop_assert_eq!(events.len(), 1, "every ledger command makes one event");
                        for event in &events {
                            model_apply(&mut balances, event);
                        }
                        produced.extend(events);
                    }
                    Ok(Executed::Duplicate(_)) | Err(Failure::Rejected(_) | Failure::IdReused) => {
                        prop_assert_eq!(&dump(&StateView::new(txn, db, &prefix)), &before, "{:?} changed state without events", command);
                    }
                    Err(Failure::Unreadable(e)) => prop_assert!(false, "state unreadable: {}", e),
                }
                let view = StateView::new(txn, db, &prefix);
                let report = audit(&view).map_err(|_| TestCaseError::fail("audit refused")).unwrap();
                prop_assert!(report.ok, "after {:?}: {:?}", command, report.violations);
                for (account, expected) in &balances {
                    let b = balance(&view, account).map_err(|_| TestCaseError::fail("balance refused")).unwrap();
                    prop_assert_eq!(b.balance, *expected, "balance of {}", account);
                    prop_assert!(i128::from(b.balance) - i128::from(b.held) >= -i128::from(b.credit_limit));
                    prop_assert!(b.available >= 0, "available of {} went negative", account);
                }
            }
            Ok((produced, dump(&StateView::new(txn, db, &prefix))))
        }).unwrap()?;
        let rebuilt = sandbox.replay::<Ledger, _>(SCOPE, &produced, dump).unwrap();
        prop_assert_eq!(rebuilt, final_state, "replaying the events must rebuild the same state");
    }
}
