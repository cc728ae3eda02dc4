//! The ledger's queries: balances, holds, history, totals, and an audit of every invariant.
//!
//! Queries read a snapshot of state and write nothing. `Totals` and `Audit` are how the stress
//! and chaos tests check the ledger from outside: per currency, the sum of balances must equal
//! deposits minus withdrawals, and `Audit` recomputes that from every account.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::model::{self, Account, HistoryEntry, Hold, HoldStatus, Totals};
use super::{LedgerError, check_id};
use crate::app::{Refusal, StateError, StateView};
use crate::storage::keys::{Elem, Value};

/// Most history entries one query returns.
pub const MAX_HISTORY_ENTRIES: u32 = 1_000;

/// Most accounts and open holds one audit reads; past it the audit says it is incomplete and
/// checks only what it read (each account's own invariants). An audit holds one LMDB snapshot
/// for its whole run, so this also bounds how long it holds back map growth.
pub const MAX_AUDIT_RECORDS: usize = 250_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum LedgerQuery {
    Balance {
        account: String,
    },
    Hold {
        hold: String,
    },
    /// Entries from `from` (1 when absent), at most `limit` (100 when absent, up to 1,000).
    History {
        account: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// The book's totals per currency.
    Totals {},
    /// Recomputes totals from every account and hold and lists every broken invariant.
    Audit {},
}

type Answer<T> = Result<T, Refusal<LedgerError>>;

/// Runs a query; the answer as JSON (the shape specs compare).
pub fn run(state: &StateView<'_>, query: &LedgerQuery) -> Answer<Json> {
    fn json<T: Serialize>(answer: T) -> Json {
        serde_json::to_value(answer).expect("query answers serialize")
    }
    Ok(match query {
        LedgerQuery::Balance { account } => json(balance(state, account)?),
        LedgerQuery::Hold { hold } => json(hold_info(state, hold)?),
        LedgerQuery::History { account, from, limit } => json(history(state, account, from.unwrap_or(1), limit.unwrap_or(100))?),
        LedgerQuery::Totals {} => json(totals(state)?),
        LedgerQuery::Audit {} => json(audit(state)?),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalanceView {
    pub account: String,
    pub currency: String,
    pub balance: i64,
    pub held: u64,
    /// `balance - held + credit_limit`.
    pub available: i64,
    pub credit_limit: u64,
    pub holds: u32,
    pub closed: bool,
}

pub fn balance(state: &StateView<'_>, id: &str) -> Answer<BalanceView> {
    check_id("account", id)?;
    let Some(a) = model::account(state, id)? else {
        return Err(Refusal::Rejected(LedgerError::AccountNotFound { account: id.into() }));
    };
    Ok(BalanceView {
        account: id.into(),
        available: i64::try_from(a.available()).unwrap_or(i64::MAX),
        currency: a.currency,
        balance: a.balance,
        held: a.held,
        credit_limit: a.credit_limit,
        holds: a.holds,
        closed: a.closed,
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HoldView {
    pub hold: String,
    pub account: String,
    pub amount: u64,
    pub placed_at_us: u64,
    pub status: HoldStatus,
}

pub fn hold_info(state: &StateView<'_>, hold: &str) -> Answer<HoldView> {
    check_id("hold", hold)?;
    match model::hold(state, hold)? {
        None => Err(Refusal::Rejected(LedgerError::HoldNotFound { hold: hold.into() })),
        Some(Hold { account, amount, placed_at_us, status }) => Ok(HoldView { hold: hold.into(), account, amount, placed_at_us, status }),
    }
}

/// The book's totals by currency.
pub fn totals(state: &StateView<'_>) -> Answer<BTreeMap<String, Totals>> {
    let all: Vec<(Vec<Value>, Totals)> = state.scan(&[Elem::Str("t")], None, usize::MAX)?;
    Ok(all
        .into_iter()
        .filter_map(|(key, t)| if let [Value::Str(currency)] = key.as_slice() { Some((currency.clone(), t)) } else { None })
        .collect())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// The entry to continue from, when more follow.
    pub next: Option<u64>,
}

pub fn history(state: &StateView<'_>, id: &str, from: u64, limit: u32) -> Answer<HistoryPage> {
    check_id("account", id)?;
    if limit == 0 || limit > MAX_HISTORY_ENTRIES {
        return Err(Refusal::Rejected(LedgerError::InvalidCommand {
            field: "limit".into(),
            reason: format!("must be 1 to {MAX_HISTORY_ENTRIES}, got {limit}"),
        }));
    }
    if model::account(state, id)?.is_none() {
        return Err(Refusal::Rejected(LedgerError::AccountNotFound { account: id.into() }));
    }
    // One more than asked, to tell whether more follow.
    let mut entries: Vec<(Vec<Value>, HistoryEntry)> =
        state.scan(&[Elem::Str("x"), Elem::Str(id)], Some(Elem::U64(from.max(1))), limit as usize + 1)?;
    let next = (entries.len() > limit as usize).then(|| entries.pop().map(|(_, e)| e.entry)).flatten();
    Ok(HistoryPage { entries: entries.into_iter().map(|(_, e)| e).collect(), next })
}

/// What the audit sums per currency.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Sums {
    pub accounts: u64,
    #[serde(serialize_with = "as_string")]
    pub balance: i128,
    #[serde(serialize_with = "as_string")]
    pub held: i128,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    pub ok: bool,
    /// False when the book has more than [`MAX_AUDIT_RECORDS`] accounts or open holds.
    pub complete: bool,
    pub accounts: usize,
    /// Open holds.
    pub holds: usize,
    pub currencies: BTreeMap<String, Sums>,
    pub violations: Vec<String>,
}

fn as_string<S: serde::Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub fn audit(state: &StateView<'_>) -> Answer<AuditReport> {
    let mut violations = Vec::new();
    // Open holds, summed per account (ended holds are under another key and hold nothing).
    let mut held_by: BTreeMap<String, (u64, u32)> = BTreeMap::new();
    let holds = state.for_each(&[Elem::Str("h")], None, MAX_AUDIT_RECORDS + 1, |_, hold: Hold| {
        let entry = held_by.entry(hold.account).or_default();
        entry.0 = entry.0.saturating_add(hold.amount);
        entry.1 = entry.1.saturating_add(1);
        Ok(())
    })?;
    let holds_complete = holds <= MAX_AUDIT_RECORDS;
    let mut sums: BTreeMap<String, Sums> = BTreeMap::new();
    // One account past the limit is read only to learn that there are more.
    let mut seen = 0;
    let visited = state.for_each(&[Elem::Str("a")], None, MAX_AUDIT_RECORDS + 1, |key, a: Account| {
        seen += 1;
        if seen > MAX_AUDIT_RECORDS {
            return Ok(());
        }
        let [Value::Str(id)] = key.as_slice() else {
            return Err(StateError::Inconsistent(format!("account key {key:?} is not (\"a\", id)")));
        };
        let s = sums.entry(a.currency.clone()).or_default();
        s.accounts += 1;
        s.balance += i128::from(a.balance);
        s.held += i128::from(a.held);
        if i128::from(a.balance) - i128::from(a.held) < -i128::from(a.credit_limit) {
            violations
                .push(format!("account {id}: balance {} minus held {} is below its credit limit {}", a.balance, a.held, a.credit_limit));
        }
        let holds_of = held_by.remove(id).unwrap_or_default();
        if holds_complete && holds_of != (a.held, a.holds) {
            violations.push(format!(
                "account {id}: held {} in {} holds, but its open holds add up to {} in {}",
                a.held, a.holds, holds_of.0, holds_of.1
            ));
        }
        if a.closed && (a.balance != 0 || a.holds != 0) {
            violations.push(format!("account {id} is closed with balance {} and {} holds", a.balance, a.holds));
        }
        Ok(())
    })?;
    let accounts = visited.min(MAX_AUDIT_RECORDS);
    let complete = holds_complete && visited <= MAX_AUDIT_RECORDS;
    if complete {
        for account in held_by.keys() {
            violations.push(format!("open holds name account {account}, which does not exist"));
        }
    }
    let totals: Vec<(Vec<Value>, Totals)> = state.scan(&[Elem::Str("t")], None, usize::MAX)?;
    for (key, t) in &totals {
        let [Value::Str(currency)] = key.as_slice() else { continue };
        let (balance, held, count) = sums.get(currency.as_str()).map_or((0, 0, 0), |s| (s.balance, s.held, s.accounts));
        if t.deposited - t.withdrawn != t.balance {
            violations.push(format!(
                "{currency}: deposited {} minus withdrawn {} is not the total balance {}",
                t.deposited, t.withdrawn, t.balance
            ));
        }
        if complete && (balance != t.balance || held != t.held || count != t.accounts_opened) {
            violations.push(format!(
                "{currency}: accounts add up to balance {balance}, held {held}, {count} accounts; totals say {}, {}, {}",
                t.balance, t.held, t.accounts_opened
            ));
        }
    }
    for currency in sums.keys().filter(|c| totals.iter().all(|(k, _)| !matches!(k.as_slice(), [Value::Str(t)] if t == *c))) {
        violations.push(format!("{currency}: accounts exist but the book has no totals for it"));
    }
    Ok(AuditReport { ok: violations.is_empty(), complete, accounts, holds: holds.min(MAX_AUDIT_RECORDS), currencies: sums, violations })
}
