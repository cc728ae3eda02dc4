//! The `Ledger` gRPC service (`proto/anthill/v1/ledger.proto`): typed commands and queries of
//! the [`crate::app::ledger`] domain.
//!
//! A command is validated (book, command id) here, then run by the log's processor; its outcome
//! maps to a status on purpose:
//!
//! | outcome                                   | status                                      |
//! |-------------------------------------------|---------------------------------------------|
//! | accepted, or a duplicate of an accepted id | OK (`duplicate` says which)                 |
//! | rejected: malformed command               | `INVALID_ARGUMENT` + rejection trailers     |
//! | rejected: unknown account or hold         | `NOT_FOUND` + rejection trailers            |
//! | rejected: account or hold id taken        | `ALREADY_EXISTS` + rejection trailers       |
//! | rejected: the state does not allow it     | `FAILED_PRECONDITION` + rejection trailers  |
//! | anything else                             | as an append's failure (see [`super`])      |
//!
//! The trailers are `anthill-rejection` (the code) and `anthill-rejection-detail` (JSON fields).

use std::sync::Arc;

use anthill_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::security::auth::{Caller, Role, scope_tenant};
use crate::security::keys::Keys;

use crate::app::ledger::query::{self, BalanceView, HistoryPage, HoldView};
use crate::app::ledger::{Ledger, LedgerCommand, LedgerError};
use crate::app::processor::{Command, Rejected};
use crate::app::{Domain, MAX_COMMAND_ID_BYTES, MAX_SCOPE_BYTES, Refusal, RejectionKind, StateView, validate_id};
use crate::log::{CommandError, Log};

/// Trailer with a rejection's code, e.g. `InsufficientFunds`.
pub const REJECTION_TRAILER: &str = "anthill-rejection";
/// Trailer with a rejection's fields as JSON.
pub const REJECTION_DETAIL_TRAILER: &str = "anthill-rejection-detail";

#[derive(Clone)]
pub struct LedgerApi {
    log: Arc<Log>,
    /// One audit at a time: each reads up to 500,000 records in one snapshot.
    audits: Arc<tokio::sync::Semaphore>,
    /// With encryption on: a forgotten tenant's books take no command and answer no query.
    keys: Option<Keys>,
}

impl LedgerApi {
    pub fn new(log: Arc<Log>) -> Self {
        LedgerApi { log, audits: Arc::new(tokio::sync::Semaphore::new(1)), keys: None }
    }

    pub fn with_keys(mut self, keys: Option<Keys>) -> Self {
        self.keys = keys;
        self
    }

    fn not_forgotten(&self, book: &str) -> Result<(), Status> {
        let tenant = scope_tenant(book);
        match &self.keys {
            Some(keys) if keys.is_forgotten(tenant) => {
                Err(Status::failed_precondition(format!("tenant {tenant:?} was forgotten: its books can never be used again")))
            }
            _ => Ok(()),
        }
    }

    /// Runs a command on `book`: the caller needs `write` on the book's tenant.
    async fn run(
        &self,
        caller: &Caller,
        book: String,
        command_id: String,
        command: LedgerCommand,
    ) -> Result<Response<pb::CommandResponse>, Status> {
        caller.require(scope_tenant(&book), Role::Write)?;
        self.not_forgotten(&book)?;
        validate_id("book", &book, MAX_SCOPE_BYTES).map_err(Status::invalid_argument)?;
        let command_id = if command_id.is_empty() {
            None
        } else {
            validate_id("command_id", &command_id, MAX_COMMAND_ID_BYTES).map_err(Status::invalid_argument)?;
            Some(command_id)
        };
        if let Some(keys) = &self.keys {
            // The writer seals the book's events and state with the tenant's key: made here at
            // the tenant's first write, since the writer cannot wait for the store.
            keys.data_key_for_write(scope_tenant(&book)).await?;
        }
        let command = Command::<Ledger>::new(book, command_id, command);
        let command_id = command.command_id.clone();
        let done = self.log.command(Box::new(command)).await.map_err(|e| match e {
            CommandError::Rejected(rejected) => rejection_status(&rejected),
            CommandError::Failed(e) => super::append_status(e),
        })?;
        let r = done.record;
        Ok(Response::new(pb::CommandResponse {
            command_id,
            duplicate: done.duplicate,
            partition: r.partition,
            first_position: r.first_position,
            last_position: r.last_position,
            stream_version: r.stream_version,
            events: r.events,
        }))
    }

    /// Answers a query on `book`: the caller needs `read` on the book's tenant.
    async fn query<T, F>(&self, caller: &Caller, book: &str, read: F) -> Result<T, Status>
    where
        F: FnOnce(&StateView<'_>) -> Result<T, Refusal<LedgerError>> + Send + 'static,
        T: Send + 'static,
    {
        caller.require(scope_tenant(book), Role::Read)?;
        self.not_forgotten(book)?;
        validate_id("book", book, MAX_SCOPE_BYTES).map_err(Status::invalid_argument)?;
        match self.log.query(Ledger::NAME, book, read).await.map_err(super::append_status)? {
            Ok(answer) => Ok(answer),
            Err(Refusal::Rejected(e)) => Err(rejection_status(&Rejected::from_domain(&e))),
            Err(Refusal::State(e)) => Err(Status::internal(format!("reading ledger state: {e}"))),
        }
    }
}

/// The status of a rejection, with its code and fields in trailers.
pub fn rejection_status(rejected: &Rejected) -> Status {
    let code = match rejected.kind {
        RejectionKind::Invalid => tonic::Code::InvalidArgument,
        RejectionKind::NotFound => tonic::Code::NotFound,
        RejectionKind::AlreadyExists => tonic::Code::AlreadyExists,
        RejectionKind::FailedPrecondition => tonic::Code::FailedPrecondition,
    };
    let mut status = Status::new(code, format!("{}: {}", rejected.code, rejected.message));
    let metadata = status.metadata_mut();
    metadata.insert(REJECTION_TRAILER, rejected.code.parse().expect("codes are ASCII identifiers"));
    // Ids are ASCII by validation; a detail that is not valid metadata is left out.
    if let Ok(detail) = rejected.detail.to_string().parse() {
        metadata.insert(REJECTION_DETAIL_TRAILER, detail);
    }
    status
}

fn optional(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[tonic::async_trait]
impl pb::ledger_server::Ledger for LedgerApi {
    async fn open_account(&self, request: Request<pb::OpenAccountRequest>) -> Result<Response<pb::CommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        self.run(
            &caller,
            r.book,
            r.command_id,
            LedgerCommand::OpenAccount { account: r.account, currency: r.currency, credit_limit: r.credit_limit },
        )
        .await
    }

    async fn deposit(&self, request: Request<pb::DepositRequest>) -> Result<Response<pb::CommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        self.run(&caller, r.book, r.command_id, LedgerCommand::Deposit { account: r.account, amount: r.amount }).await
    }

    async fn withdraw(&self, request: Request<pb::WithdrawRequest>) -> Result<Response<pb::CommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        self.run(&caller, r.book, r.command_id, LedgerCommand::Withdraw { account: r.account, amount: r.amount }).await
    }

    async fn transfer(&self, request: Request<pb::TransferRequest>) -> Result<Response<pb::CommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let command = LedgerCommand::Transfer { from: r.from, to: r.to, amount: r.amount, transfer: optional(r.transfer) };
        self.run(&caller, r.book, r.command_id, command).await
    }

    async fn place_hold(&self, request: Request<pb::PlaceHoldRequest>) -> Result<Response<pb::CommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        self.run(&caller, r.book, r.command_id, LedgerCommand::PlaceHold { hold: r.hold, account: r.account, amount: r.amount }).await
    }

    async fn capture_hold(&self, request: Request<pb::CaptureHoldRequest>) -> Result<Response<pb::CommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let command = LedgerCommand::CaptureHold { hold: r.hold, amount: (r.amount > 0).then_some(r.amount), to: optional(r.to) };
        self.run(&caller, r.book, r.command_id, command).await
    }

    async fn release_hold(&self, request: Request<pb::ReleaseHoldRequest>) -> Result<Response<pb::CommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        self.run(&caller, r.book, r.command_id, LedgerCommand::ReleaseHold { hold: r.hold }).await
    }

    async fn close_account(&self, request: Request<pb::CloseAccountRequest>) -> Result<Response<pb::CommandResponse>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        self.run(&caller, r.book, r.command_id, LedgerCommand::CloseAccount { account: r.account }).await
    }

    async fn get_balance(&self, request: Request<pb::GetBalanceRequest>) -> Result<Response<pb::Balance>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let b: BalanceView = self.query(&caller, &r.book, move |state| query::balance(state, &r.account)).await?;
        Ok(Response::new(pb::Balance {
            account: b.account,
            currency: b.currency,
            balance: b.balance,
            held: b.held,
            available: b.available,
            credit_limit: b.credit_limit,
            holds: b.holds,
            closed: b.closed,
        }))
    }

    async fn get_hold(&self, request: Request<pb::GetHoldRequest>) -> Result<Response<pb::HoldInfo>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let h: HoldView = self.query(&caller, &r.book, move |state| query::hold_info(state, &r.hold)).await?;
        let status = serde_json::to_value(h.status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        Ok(Response::new(pb::HoldInfo { hold: h.hold, account: h.account, amount: h.amount, placed_at_us: h.placed_at_us, status }))
    }

    async fn get_history(&self, request: Request<pb::GetHistoryRequest>) -> Result<Response<pb::History>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let limit = if r.limit == 0 { 100 } else { r.limit };
        let page: HistoryPage = self.query(&caller, &r.book, move |state| query::history(state, &r.account, r.from.max(1), limit)).await?;
        let entries = page
            .entries
            .into_iter()
            .map(|e| pb::HistoryEntry {
                entry: e.entry,
                event: e.event,
                change: e.change,
                balance: e.balance,
                held: e.held,
                counterparty: e.counterparty.unwrap_or_default(),
                reference: e.reference.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::History { entries, next: page.next.unwrap_or(0) }))
    }

    async fn get_totals(&self, request: Request<pb::GetTotalsRequest>) -> Result<Response<pb::Totals>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        let totals = self.query(&caller, &r.book, query::totals).await?;
        let currencies = totals
            .into_iter()
            .map(|(currency, t)| {
                let totals = pb::CurrencyTotals {
                    accounts_opened: t.accounts_opened,
                    accounts_closed: t.accounts_closed,
                    balance: t.balance.to_string(),
                    held: t.held.to_string(),
                    deposited: t.deposited.to_string(),
                    withdrawn: t.withdrawn.to_string(),
                };
                (currency, totals)
            })
            .collect();
        Ok(Response::new(pb::Totals { currencies }))
    }

    async fn audit(&self, request: Request<pb::AuditRequest>) -> Result<Response<pb::AuditReport>, Status> {
        let caller = Caller::of(&request)?;
        let r = request.into_inner();
        // Refused callers do not queue behind real audits.
        caller.require(scope_tenant(&r.book), Role::Read)?;
        let _one_at_a_time = self.audits.acquire().await.map_err(|_| Status::unavailable("the node is shutting down"))?;
        let report = self.query(&caller, &r.book, query::audit).await?;
        Ok(Response::new(pb::AuditReport {
            ok: report.ok,
            complete: report.complete,
            accounts: report.accounts as u64,
            holds: report.holds as u64,
            violations: report.violations,
        }))
    }
}
