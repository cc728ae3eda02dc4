//! The reference domain: a ledger of accounts and transfers, for billing and retail.
//!
//! A *book* (the scope, e.g. one shop or one tenant) holds accounts, each in one currency and with
//! an optional credit limit. Money moves by deposit, withdrawal, transfer between two accounts of
//! the same currency, and by holds: a hold reserves funds on an account (they stop being
//! available) and is later captured (moved to another account, or out of the book) or released —
//! the same shape as reserving stock without overselling. Hold ids are single-use: an ended hold
//! keeps its record, so placing its id again is `HoldExists` and ending it again `HoldEnded`.
//!
//! Amounts are integers in the currency's minor unit (cents), 1 to [`MAX_AMOUNT`]. An account's
//! `available` is `balance - held + credit_limit`; no command may take it below zero.
//!
//! Invariants, checked by the `Audit` query and the property test:
//! - conservation: per currency, the sum of balances equals deposits minus withdrawals (a transfer
//!   moves money; a capture without a destination counts as a withdrawal);
//! - no balance goes below `-credit_limit`, and `held` never exceeds what the account can cover:
//!   `balance - held >= -credit_limit`;
//! - a closed account accepts nothing (it was closed at a zero balance with no holds).
//!
//! [`model`] holds the state records and `evolve`; [`query`] the queries. Everything here is
//! deterministic: the same events always give the same state.

pub mod model;
pub mod query;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{Context, Domain, Refusal, Rejection, RejectionKind, State, StateError, StateView};
use model::{Account, Hold, HoldStatus};

/// Largest amount of one command, and largest credit limit: 10^15 minor units.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;

/// Most bytes of an account or hold id.
pub const MAX_ID_BYTES: usize = 64;

pub struct Ledger;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum LedgerCommand {
    OpenAccount {
        account: String,
        /// Three uppercase letters (ISO 4217 style), e.g. `EUR`.
        currency: String,
        #[serde(default)]
        credit_limit: u64,
    },
    Deposit {
        account: String,
        amount: u64,
    },
    Withdraw {
        account: String,
        amount: u64,
    },
    Transfer {
        from: String,
        to: String,
        amount: u64,
        /// The transfer's id in events and history; the command id when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transfer: Option<String>,
    },
    PlaceHold {
        hold: String,
        account: String,
        amount: u64,
    },
    /// Captures `amount` of the hold (all of it when absent) and releases the rest; moves the
    /// captured money to `to`, or out of the book when absent.
    CaptureHold {
        hold: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        amount: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    ReleaseHold {
        hold: String,
    },
    CloseAccount {
        account: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum LedgerEvent {
    AccountOpened {
        account: String,
        currency: String,
        credit_limit: u64,
        opened_at_us: u64,
    },
    Deposited {
        account: String,
        amount: u64,
    },
    Withdrawn {
        account: String,
        amount: u64,
    },
    Transferred {
        transfer: String,
        from: String,
        to: String,
        amount: u64,
    },
    HoldPlaced {
        hold: String,
        account: String,
        amount: u64,
        placed_at_us: u64,
    },
    /// `amount` left the account (to `to`, or out of the book); `released` went back to available.
    HoldCaptured {
        hold: String,
        account: String,
        amount: u64,
        released: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    HoldReleased {
        hold: String,
        account: String,
        amount: u64,
    },
    AccountClosed {
        account: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum LedgerError {
    #[error("{field}: {reason}")]
    InvalidCommand { field: String, reason: String },
    #[error("account {account} already exists")]
    AccountExists { account: String },
    #[error("account {account} does not exist")]
    AccountNotFound { account: String },
    #[error("account {account} is closed")]
    AccountClosed { account: String },
    #[error("account {account} has {available} available, {requested} requested")]
    InsufficientFunds { account: String, available: i128, requested: u64 },
    #[error("account {from} is in {from_currency} but account {to} is in {to_currency}")]
    CurrencyMismatch { from: String, from_currency: String, to: String, to_currency: String },
    #[error("account {account} cannot send money to itself")]
    SameAccount { account: String },
    #[error("hold {hold} already exists")]
    HoldExists { hold: String },
    #[error("hold {hold} does not exist")]
    HoldNotFound { hold: String },
    #[error("hold {hold} was already {status}")]
    HoldEnded { hold: String, status: String },
    #[error("hold {hold} is for {held}, {requested} requested")]
    CaptureExceedsHold { hold: String, held: u64, requested: u64 },
    #[error("account {account} has balance {balance}; only an account at zero can close")]
    BalanceNotZero { account: String, balance: i64 },
    #[error("account {account} has {holds} open holds; capture or release them first")]
    HoldsOutstanding { account: String, holds: u32 },
    #[error("account {account}: the balance would pass the largest one stored")]
    BalanceOverflow { account: String },
}

impl Rejection for LedgerError {
    fn code(&self) -> &'static str {
        match self {
            LedgerError::InvalidCommand { .. } => "InvalidCommand",
            LedgerError::AccountExists { .. } => "AccountExists",
            LedgerError::AccountNotFound { .. } => "AccountNotFound",
            LedgerError::AccountClosed { .. } => "AccountClosed",
            LedgerError::InsufficientFunds { .. } => "InsufficientFunds",
            LedgerError::CurrencyMismatch { .. } => "CurrencyMismatch",
            LedgerError::SameAccount { .. } => "SameAccount",
            LedgerError::HoldExists { .. } => "HoldExists",
            LedgerError::HoldNotFound { .. } => "HoldNotFound",
            LedgerError::HoldEnded { .. } => "HoldEnded",
            LedgerError::CaptureExceedsHold { .. } => "CaptureExceedsHold",
            LedgerError::BalanceNotZero { .. } => "BalanceNotZero",
            LedgerError::HoldsOutstanding { .. } => "HoldsOutstanding",
            LedgerError::BalanceOverflow { .. } => "BalanceOverflow",
        }
    }

    fn kind(&self) -> RejectionKind {
        match self {
            LedgerError::InvalidCommand { .. } | LedgerError::SameAccount { .. } => RejectionKind::Invalid,
            LedgerError::AccountNotFound { .. } | LedgerError::HoldNotFound { .. } => RejectionKind::NotFound,
            LedgerError::AccountExists { .. } | LedgerError::HoldExists { .. } => RejectionKind::AlreadyExists,
            _ => RejectionKind::FailedPrecondition,
        }
    }
}

type Decided = Result<Vec<LedgerEvent>, Refusal<LedgerError>>;

fn reject<T>(error: LedgerError) -> Result<T, Refusal<LedgerError>> {
    Err(Refusal::Rejected(error))
}

fn invalid(field: &str, reason: impl Into<String>) -> Refusal<LedgerError> {
    Refusal::Rejected(LedgerError::InvalidCommand { field: field.into(), reason: reason.into() })
}

/// Checks an account or hold id.
pub fn check_id(field: &str, id: &str) -> Result<(), Refusal<LedgerError>> {
    super::validate_id(field, id, MAX_ID_BYTES).map_err(|reason| {
        let reason = reason.strip_prefix(&format!("{field}: ")).unwrap_or(&reason).to_string();
        invalid(field, reason)
    })
}

fn check_amount(field: &str, amount: u64) -> Result<(), Refusal<LedgerError>> {
    if amount == 0 || amount > MAX_AMOUNT {
        return Err(invalid(field, format!("must be 1 to {MAX_AMOUNT}, got {amount}")));
    }
    Ok(())
}

fn check_currency(currency: &str) -> Result<(), Refusal<LedgerError>> {
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        // Echo at most a few characters of what was sent: it can be as long as a request.
        let shown: String = currency.chars().take(8).collect();
        let more = if currency.chars().count() > 8 { "..." } else { "" };
        return Err(invalid("currency", format!("must be three uppercase letters (e.g. EUR), got {shown:?}{more}")));
    }
    Ok(())
}

/// The account, open: rejects a missing or closed one.
fn open_account(state: &StateView<'_>, account: &str) -> Result<Account, Refusal<LedgerError>> {
    match model::account(state, account)? {
        None => reject(LedgerError::AccountNotFound { account: account.into() }),
        Some(a) if a.closed => reject(LedgerError::AccountClosed { account: account.into() }),
        Some(a) => Ok(a),
    }
}

/// The hold, open: rejects a missing or ended one.
fn open_hold(state: &StateView<'_>, hold: &str) -> Result<Hold, Refusal<LedgerError>> {
    match model::hold(state, hold)? {
        None => reject(LedgerError::HoldNotFound { hold: hold.into() }),
        Some(h) if h.status != HoldStatus::Open => {
            let status = serde_json::to_value(h.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            reject(LedgerError::HoldEnded { hold: hold.into(), status })
        }
        Some(h) => Ok(h),
    }
}

/// Rejects taking `amount` from an account that does not have it available.
fn check_available(account_id: &str, account: &Account, amount: u64) -> Result<(), Refusal<LedgerError>> {
    let available = account.available();
    if available < i128::from(amount) {
        return reject(LedgerError::InsufficientFunds { account: account_id.into(), available, requested: amount });
    }
    Ok(())
}

/// Rejects adding `amount` to a balance that cannot hold it.
fn check_room(account_id: &str, account: &Account, amount: u64) -> Result<(), Refusal<LedgerError>> {
    if account.balance.checked_add_unsigned(amount).is_none() {
        return reject(LedgerError::BalanceOverflow { account: account_id.into() });
    }
    Ok(())
}

impl Domain for Ledger {
    const NAME: &'static str = "ledger";
    type Command = LedgerCommand;
    type Event = LedgerEvent;
    type Error = LedgerError;
    type Query = query::LedgerQuery;

    fn decide(state: &StateView<'_>, command: &LedgerCommand, ctx: &Context<'_>) -> Decided {
        use LedgerCommand as C;
        use LedgerEvent as E;
        match command {
            C::OpenAccount { account, currency, credit_limit } => {
                check_id("account", account)?;
                check_currency(currency)?;
                if *credit_limit > MAX_AMOUNT {
                    return Err(invalid("credit_limit", format!("must be at most {MAX_AMOUNT}, got {credit_limit}")));
                }
                if model::account(state, account)?.is_some() {
                    return reject(LedgerError::AccountExists { account: account.clone() });
                }
                Ok(vec![E::AccountOpened {
                    account: account.clone(),
                    currency: currency.clone(),
                    credit_limit: *credit_limit,
                    opened_at_us: ctx.now_us,
                }])
            }
            C::Deposit { account, amount } => {
                check_id("account", account)?;
                check_amount("amount", *amount)?;
                let a = open_account(state, account)?;
                check_room(account, &a, *amount)?;
                Ok(vec![E::Deposited { account: account.clone(), amount: *amount }])
            }
            C::Withdraw { account, amount } => {
                check_id("account", account)?;
                check_amount("amount", *amount)?;
                let a = open_account(state, account)?;
                check_available(account, &a, *amount)?;
                Ok(vec![E::Withdrawn { account: account.clone(), amount: *amount }])
            }
            C::Transfer { from, to, amount, transfer } => {
                check_id("from", from)?;
                check_id("to", to)?;
                check_amount("amount", *amount)?;
                if let Some(transfer) = transfer {
                    check_id("transfer", transfer)?;
                }
                if from == to {
                    return reject(LedgerError::SameAccount { account: from.clone() });
                }
                let (source, target) = (open_account(state, from)?, open_account(state, to)?);
                if source.currency != target.currency {
                    return reject(LedgerError::CurrencyMismatch {
                        from: from.clone(),
                        from_currency: source.currency,
                        to: to.clone(),
                        to_currency: target.currency,
                    });
                }
                check_available(from, &source, *amount)?;
                check_room(to, &target, *amount)?;
                let transfer = transfer.clone().unwrap_or_else(|| ctx.command_id.to_string());
                Ok(vec![E::Transferred { transfer, from: from.clone(), to: to.clone(), amount: *amount }])
            }
            C::PlaceHold { hold, account, amount } => {
                check_id("hold", hold)?;
                check_id("account", account)?;
                check_amount("amount", *amount)?;
                if model::hold(state, hold)?.is_some() {
                    return reject(LedgerError::HoldExists { hold: hold.clone() });
                }
                let a = open_account(state, account)?;
                check_available(account, &a, *amount)?;
                Ok(vec![E::HoldPlaced { hold: hold.clone(), account: account.clone(), amount: *amount, placed_at_us: ctx.now_us }])
            }
            C::CaptureHold { hold, amount, to } => {
                check_id("hold", hold)?;
                if let Some(amount) = amount {
                    check_amount("amount", *amount)?;
                }
                let Hold { account, amount: held, .. } = open_hold(state, hold)?;
                let captured = amount.unwrap_or(held);
                if captured > held {
                    return reject(LedgerError::CaptureExceedsHold { hold: hold.clone(), held, requested: captured });
                }
                if let Some(to) = to {
                    check_id("to", to)?;
                    if *to == account {
                        return reject(LedgerError::SameAccount { account: account.clone() });
                    }
                    let source = model::account(state, &account)?.ok_or_else(|| missing(&account))?;
                    let target = open_account(state, to)?;
                    if source.currency != target.currency {
                        return reject(LedgerError::CurrencyMismatch {
                            from: account.clone(),
                            from_currency: source.currency,
                            to: to.clone(),
                            to_currency: target.currency,
                        });
                    }
                    check_room(to, &target, captured)?;
                }
                Ok(vec![E::HoldCaptured { hold: hold.clone(), account, amount: captured, released: held - captured, to: to.clone() }])
            }
            C::ReleaseHold { hold } => {
                check_id("hold", hold)?;
                let Hold { account, amount, .. } = open_hold(state, hold)?;
                Ok(vec![E::HoldReleased { hold: hold.clone(), account, amount }])
            }
            C::CloseAccount { account } => {
                check_id("account", account)?;
                let a = open_account(state, account)?;
                if a.holds > 0 {
                    return reject(LedgerError::HoldsOutstanding { account: account.clone(), holds: a.holds });
                }
                if a.balance != 0 {
                    return reject(LedgerError::BalanceNotZero { account: account.clone(), balance: a.balance });
                }
                Ok(vec![E::AccountClosed { account: account.clone() }])
            }
        }
    }

    fn evolve(state: &mut State<'_, '_>, event: &LedgerEvent) -> Result<(), StateError> {
        model::evolve(state, event)
    }

    fn query(state: &StateView<'_>, query: &query::LedgerQuery) -> Result<serde_json::Value, Refusal<LedgerError>> {
        query::run(state, query)
    }
}

/// A hold names an account the state lacks: the state does not match the log.
fn missing(account: &str) -> Refusal<LedgerError> {
    Refusal::State(StateError::Inconsistent(format!("a hold names account {account}, which does not exist")))
}
