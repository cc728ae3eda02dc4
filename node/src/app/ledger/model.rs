//! The ledger's state records, their keys, and `evolve`: how each event changes them.
//!
//! Keys within a book's subspace (`("ledger", book, ...)`, see [`crate::app::state`]):
//!
//! | key                       | value            | what                                     |
//! |---------------------------|------------------|------------------------------------------|
//! | `("a", account)`          | [`Account`]      | balance, held, limits, open/closed       |
//! | `("h", hold)`             | [`Hold`]         | an open hold                             |
//! | `("e", hold)`             | [`Hold`]         | an ended hold (kept: ids are single-use) |
//! | `("x", account, entry)`   | [`HistoryEntry`] | the account's history, `entry` dense from 1 |
//! | `("t", currency)`         | [`Totals`]       | the book's totals in one currency        |
//!
//! `evolve` never rejects: events are facts. If one does not fit the state (a deposit to an
//! account that does not exist), the state does not match the log and it fails with
//! [`StateError::Inconsistent`]; so does arithmetic that would overflow.

use serde::{Deserialize, Serialize};

use super::LedgerEvent;
use crate::app::{State, StateError, StateView};
use crate::storage::keys::Elem;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub currency: String,
    pub credit_limit: u64,
    pub balance: i64,
    /// Sum of the account's open holds.
    pub held: u64,
    /// Number of open holds.
    pub holds: u32,
    pub closed: bool,
    /// Entries in the account's history so far.
    pub entries: u64,
}

impl Account {
    /// What the account may still spend: `balance - held + credit_limit`.
    pub fn available(&self) -> i128 {
        i128::from(self.balance) - i128::from(self.held) + i128::from(self.credit_limit)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub account: String,
    pub amount: u64,
    pub placed_at_us: u64,
    #[serde(default)]
    pub status: HoldStatus,
}

/// Where a hold is in its life. An ended hold keeps its record, so its id cannot be placed
/// again: a retried `PlaceHold` without a command id must not reserve the money twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldStatus {
    #[default]
    Open,
    Captured,
    Released,
}

/// One line of an account's history: the event, and the account right after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub entry: u64,
    /// The event's type, e.g. `Deposited`.
    pub event: String,
    /// Money in (positive) or out (negative) of the balance; 0 for opening, holds and closing.
    pub change: i64,
    pub balance: i64,
    pub held: u64,
    /// The other account of a transfer or capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counterparty: Option<String>,
    /// The transfer or hold id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// A book's totals in one currency. Sums are 128-bit, written as decimal strings in JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub accounts_opened: u64,
    pub accounts_closed: u64,
    #[serde(with = "decimal")]
    pub balance: i128,
    #[serde(with = "decimal")]
    pub held: i128,
    #[serde(with = "decimal")]
    pub deposited: i128,
    #[serde(with = "decimal")]
    pub withdrawn: i128,
}

/// 128-bit integers as decimal strings (JSON numbers are not safe past 2^53 for many readers).
mod decimal {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &i128, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

pub fn account(state: &StateView<'_>, account: &str) -> Result<Option<Account>, StateError> {
    state.get(&[Elem::Str("a"), Elem::Str(account)])
}

/// The hold, open or ended.
pub fn hold(state: &StateView<'_>, hold: &str) -> Result<Option<Hold>, StateError> {
    match state.get(&[Elem::Str("h"), Elem::Str(hold)])? {
        Some(open) => Ok(Some(open)),
        None => state.get(&[Elem::Str("e"), Elem::Str(hold)]),
    }
}

pub fn totals(state: &StateView<'_>, currency: &str) -> Result<Option<Totals>, StateError> {
    state.get(&[Elem::Str("t"), Elem::Str(currency)])
}

fn inconsistent(what: String) -> StateError {
    StateError::Inconsistent(what)
}

fn existing(state: &State<'_, '_>, id: &str) -> Result<Account, StateError> {
    account(&state.view(), id)?.ok_or_else(|| inconsistent(format!("account {id} does not exist")))
}

/// What one event does to one account.
struct Change<'a> {
    event: &'static str,
    /// Added to the balance.
    balance: i128,
    /// Added to the held amount.
    held: i128,
    counterparty: Option<&'a str>,
    reference: Option<&'a str>,
}

impl<'a> Change<'a> {
    fn new(event: &'static str, balance: i128) -> Self {
        Change { event, balance, held: 0, counterparty: None, reference: None }
    }
    fn held(mut self, held: i128) -> Self {
        self.held = held;
        self
    }
    fn with(mut self, counterparty: Option<&'a str>, reference: Option<&'a str>) -> Self {
        self.counterparty = counterparty;
        self.reference = reference;
        self
    }
}

/// Applies a change to the account, appends its history entry, and stores both.
fn book_entry(state: &mut State<'_, '_>, id: &str, mut a: Account, c: Change<'_>) -> Result<Account, StateError> {
    let (event, change, held_change, counterparty, reference) = (c.event, c.balance, c.held, c.counterparty, c.reference);
    let overflow = || inconsistent(format!("account {id}: {event} overflows the balance or held amount"));
    a.balance = i64::try_from(i128::from(a.balance) + change).map_err(|_| overflow())?;
    a.held = u64::try_from(i128::from(a.held) + held_change).map_err(|_| overflow())?;
    a.entries += 1;
    let entry = HistoryEntry {
        entry: a.entries,
        event: event.to_string(),
        change: i64::try_from(change).map_err(|_| overflow())?,
        balance: a.balance,
        held: a.held,
        counterparty: counterparty.map(str::to_string),
        reference: reference.map(str::to_string),
    };
    state.put(&[Elem::Str("x"), Elem::Str(id), Elem::U64(a.entries)], &entry)?;
    state.put(&[Elem::Str("a"), Elem::Str(id)], &a)?;
    Ok(a)
}

/// Applies `change` to the book's totals in `currency`; `change` says `None` when a sum would
/// overflow (the state then does not match the events).
fn update_totals(state: &mut State<'_, '_>, currency: &str, change: impl FnOnce(&mut Totals) -> Option<()>) -> Result<(), StateError> {
    let mut t = totals(&state.view(), currency)?.unwrap_or_default();
    change(&mut t).ok_or_else(|| inconsistent(format!("the {currency} totals overflow")))?;
    state.put(&[Elem::Str("t"), Elem::Str(currency)], &t)
}

/// `*sum += by`, or `None` on overflow.
fn add(sum: &mut i128, by: i128) -> Option<()> {
    *sum = sum.checked_add(by)?;
    Some(())
}

/// `*count += by` (by may be negative), or `None` when it would leave the type's range.
fn count<T: TryFrom<i128> + Into<i128> + Copy>(count: &mut T, by: i128) -> Option<()> {
    *count = T::try_from((*count).into().checked_add(by)?).ok()?;
    Some(())
}

pub fn evolve(state: &mut State<'_, '_>, event: &LedgerEvent) -> Result<(), StateError> {
    use LedgerEvent as E;
    let amount_of = |amount: &u64| i128::from(*amount);
    match event {
        E::AccountOpened { account: id, currency, credit_limit, .. } => {
            if account(&state.view(), id)?.is_some() {
                return Err(inconsistent(format!("account {id} is opened twice")));
            }
            let a = Account {
                currency: currency.clone(),
                credit_limit: *credit_limit,
                balance: 0,
                held: 0,
                holds: 0,
                closed: false,
                entries: 0,
            };
            book_entry(state, id, a, Change::new("AccountOpened", 0))?;
            update_totals(state, currency, |t| count(&mut t.accounts_opened, 1))
        }
        E::Deposited { account: id, amount } => {
            let a = book_entry(state, id, existing(state, id)?, Change::new("Deposited", amount_of(amount)))?;
            update_totals(state, &a.currency, |t| {
                add(&mut t.balance, amount_of(amount))?;
                add(&mut t.deposited, amount_of(amount))
            })
        }
        E::Withdrawn { account: id, amount } => {
            let a = book_entry(state, id, existing(state, id)?, Change::new("Withdrawn", -amount_of(amount)))?;
            update_totals(state, &a.currency, |t| {
                add(&mut t.balance, -amount_of(amount))?;
                add(&mut t.withdrawn, amount_of(amount))
            })
        }
        E::Transferred { transfer, from, to, amount } => {
            book_entry(state, from, existing(state, from)?, Change::new("Transferred", -amount_of(amount)).with(Some(to), Some(transfer)))?;
            book_entry(state, to, existing(state, to)?, Change::new("Transferred", amount_of(amount)).with(Some(from), Some(transfer)))?;
            Ok(())
        }
        E::HoldPlaced { hold: hold_id, account: id, amount, placed_at_us } => {
            if hold(&state.view(), hold_id)?.is_some() {
                return Err(inconsistent(format!("hold {hold_id} is placed twice")));
            }
            let mut a = existing(state, id)?;
            count(&mut a.holds, 1).ok_or_else(|| inconsistent(format!("account {id} has too many holds")))?;
            let a = book_entry(state, id, a, Change::new("HoldPlaced", 0).held(amount_of(amount)).with(None, Some(hold_id)))?;
            let hold = Hold { account: id.clone(), amount: *amount, placed_at_us: *placed_at_us, status: HoldStatus::Open };
            state.put(&[Elem::Str("h"), Elem::Str(hold_id)], &hold)?;
            update_totals(state, &a.currency, |t| add(&mut t.held, amount_of(amount)))
        }
        E::HoldCaptured { hold: hold_id, account: id, amount, released, to } => {
            let freed = end_hold(state, hold_id, id, amount_of(amount) + amount_of(released), HoldStatus::Captured)?;
            let mut a = existing(state, id)?;
            count(&mut a.holds, -1).ok_or_else(|| inconsistent(format!("account {id} ends a hold it does not have")))?;
            let a =
                book_entry(state, id, a, Change::new("HoldCaptured", -amount_of(amount)).held(-freed).with(to.as_deref(), Some(hold_id)))?;
            if let Some(to) = to {
                book_entry(state, to, existing(state, to)?, Change::new("HoldCaptured", amount_of(amount)).with(Some(id), Some(hold_id)))?;
            }
            update_totals(state, &a.currency, |t| {
                add(&mut t.held, -freed)?;
                if to.is_none() {
                    add(&mut t.balance, -amount_of(amount))?;
                    add(&mut t.withdrawn, amount_of(amount))?;
                }
                Some(())
            })
        }
        E::HoldReleased { hold: hold_id, account: id, amount } => {
            let freed = end_hold(state, hold_id, id, amount_of(amount), HoldStatus::Released)?;
            let mut a = existing(state, id)?;
            count(&mut a.holds, -1).ok_or_else(|| inconsistent(format!("account {id} ends a hold it does not have")))?;
            let a = book_entry(state, id, a, Change::new("HoldReleased", 0).held(-freed).with(None, Some(hold_id)))?;
            update_totals(state, &a.currency, |t| add(&mut t.held, -freed))
        }
        E::AccountClosed { account: id } => {
            let mut a = existing(state, id)?;
            if a.closed || a.balance != 0 || a.holds != 0 {
                return Err(inconsistent(format!("account {id} closes while closed, not at zero, or holding")));
            }
            a.closed = true;
            let a = book_entry(state, id, a, Change::new("AccountClosed", 0))?;
            update_totals(state, &a.currency, |t| count(&mut t.accounts_closed, 1))
        }
    }
}

/// Ends a hold that must be open on `account` for exactly `amount`; returns that amount.
fn end_hold(state: &mut State<'_, '_>, hold_id: &str, account: &str, amount: i128, status: HoldStatus) -> Result<i128, StateError> {
    let mut h = match hold(&state.view(), hold_id)? {
        Some(h) if h.account == account && i128::from(h.amount) == amount && h.status == HoldStatus::Open => h,
        other => return Err(inconsistent(format!("open hold {hold_id} of {account} for {amount} ends, but the state has {other:?}"))),
    };
    h.status = status;
    state.delete(&[Elem::Str("h"), Elem::Str(hold_id)])?;
    state.put(&[Elem::Str("e"), Elem::Str(hold_id)], &h)?;
    Ok(amount)
}
