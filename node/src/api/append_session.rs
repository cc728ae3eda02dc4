//! `EventLog.AppendSession`: appends pipelined over one long-lived call.
//!
//! A unary Append costs an HTTP/2 stream of its own (headers both ways, a task, routing); for a
//! client that appends one event at a time that costs more CPU than committing the event. A
//! session carries each append as one message on a call that stays open, so the per-append cost
//! is decoding one message and encoding one answer.
//!
//! One task serves a session. It reads a request, validates it and queues it for the writer
//! ([`Log::submit`], in arrival order, so the session's appends commit in the order sent), and
//! keeps the pending answer; answers go back, tagged with the request's id, as appends become
//! durable. Bounds: at most `limits.max_session_in_flight` appends are pending (the task stops
//! reading and HTTP/2 flow control holds the client back), and at most [`ANSWER_BUFFER`] answers
//! wait for tonic to send them (the task then waits, and with it the reading).
//!
//! An append that fails is answered with an [`pb::AppendFailure`] carrying the status the unary
//! call would have returned; the session goes on. At shutdown the task stops reading, answers
//! every append it took, and ends the call with `UNAVAILABLE`.

use std::pin::Pin;
use std::sync::Arc;

use anthill_proto::v1 as pb;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::{append_request, append_status, appended};
use crate::log::{AppendError, Appended, Log};
use crate::security::auth::{Auth, Caller, Role, tenant_of};
use crate::security::keys::Keys;

/// Answers waiting for tonic to send them, per session.
const ANSWER_BUFFER: usize = 1024;

pub type AnswerStream = Pin<Box<dyn Stream<Item = Result<pb::AppendSessionResponse, Status>> + Send>>;

/// Starts the task serving one session; the answers stream back through the returned stream.
pub(super) fn start(
    log: Arc<Log>,
    caller: (Caller, Option<Auth>),
    keys: Option<Keys>,
    requests: Streaming<pb::AppendSessionRequest>,
    shutdown: watch::Receiver<bool>,
) -> AnswerStream {
    let (answers, rx) = mpsc::channel(ANSWER_BUFFER);
    let span = tracing::info_span!("append_session");
    tokio::spawn(serve(log, caller, keys, requests, answers, shutdown).instrument(span));
    Box::pin(ReceiverStream::new(rx))
}

type Answers = mpsc::Sender<Result<pb::AppendSessionResponse, Status>>;

async fn serve(
    log: Arc<Log>,
    (caller, auth): (Caller, Option<Auth>),
    keys: Option<Keys>,
    mut requests: Streaming<pb::AppendSessionRequest>,
    answers: Answers,
    mut shutdown: watch::Receiver<bool>,
) {
    let max_in_flight = log.limits().max_session_in_flight;
    let mut pending = FuturesUnordered::new();
    let mut reading = true;
    // Why the call ends with an error once everything taken is answered: the node is stopping,
    // or the request stream failed (a message over the size limit, a broken message).
    let mut failure: Option<Status> = None;
    let mut taken: u64 = 0;
    let client_gone = loop {
        if reading && *shutdown.borrow() {
            reading = false;
            failure = Some(Status::unavailable("the node is shutting down"));
        }
        tokio::select! {
            Some((id, outcome)) = pending.next(), if !pending.is_empty() => {
                if answers.send(Ok(answer(id, outcome))).await.is_err() {
                    break true;
                }
            }
            request = requests.message(), if reading && pending.len() < max_in_flight => match request {
                Ok(Some(request)) => {
                    taken += 1;
                    let id = request.id;
                    let quorum = request.append.as_ref().is_some_and(|a| a.durability == pb::Durability::Quorum as i32);
                    // Each append is checked against the caller's grants as they are now (a
                    // token revoked or a grant withdrawn meanwhile stops it) on its stream's tenant.
                    let stream = request.append.as_ref().map_or("", |a| a.stream.as_str());
                    let allowed = match caller.now(auth.as_ref()) {
                        Some(now) => now.require(tenant_of(stream), Role::Write),
                        None => Err(Status::unauthenticated("the session's token was revoked")),
                    };
                    if let Err(denied) = allowed {
                        if answers.send(Ok(refused(id, &denied))).await.is_err() {
                            break true;
                        }
                        continue;
                    }
                    match submit(&log, keys.as_ref(), request).await.map_err(|refusal| match refusal {
                        Refusal::Append(error) => answer(id, Err(error)),
                        Refusal::Status(status) => refused(id, &status),
                    }) {
                        Ok(pending_append) => {
                            let log = log.clone();
                            pending.push(async move {
                                let mut outcome = pending_append.outcome().await;
                                if let (true, Ok(done)) = (quorum, &outcome)
                                    && let Err(e) = log.wait_quorum(done, crate::log::QUORUM_WAIT).await
                                {
                                    outcome = Err(e);
                                }
                                (id, outcome)
                            })
                        }
                        Err(refusal) => {
                            if answers.send(Ok(refusal)).await.is_err() {
                                break true;
                            }
                        }
                    }
                }
                Ok(None) => reading = false,
                Err(status) => {
                    tracing::debug!(%status, "append session: the request stream failed; answering what was taken, then ending the call");
                    reading = false;
                    failure = Some(Status::new(status.code(), format!("append session request stream: {}", status.message())));
                }
            },
            // A dropped sender means the node is gone as well.
            changed = shutdown.changed(), if reading => if changed.is_err() {
                reading = false;
                failure = Some(Status::unavailable("the node is shutting down"));
            },
            else => break false,
        }
    };
    tracing::debug!(appends = taken, client_gone, "append session ended");
    if client_gone {
        // Appends already queued still commit; wait for them only to count their outcomes.
        tokio::spawn(async move { while pending.next().await.is_some() {} });
    } else if let Some(status) = failure {
        let _ = answers.send(Err(status)).await;
    }
}

/// Queues one request's append; a malformed request is refused (and counted) here, the rest
/// by [`Log::submit`].
/// Why an append of a session was not queued.
enum Refusal {
    Append(AppendError),
    /// Refused on its way in (sealing: a forgotten tenant, the key table unavailable), with
    /// its own status.
    Status(Status),
}

async fn submit(log: &Log, keys: Option<&Keys>, request: pb::AppendSessionRequest) -> Result<crate::log::PendingAppend, Refusal> {
    let mut append = match request.append.ok_or_else(|| Status::invalid_argument("append: missing")).and_then(append_request) {
        Ok(append) => append,
        Err(status) => {
            log.metrics().count_append("invalid");
            return Err(Refusal::Append(AppendError::Invalid(status.message().to_string())));
        }
    };
    if let Some(keys) = keys {
        crate::log::validate_append(log.limits(), &append).map_err(|e| Refusal::Append(AppendError::Invalid(e)))?;
        keys.seal_events(&append.stream, &mut append.events).await.map_err(Refusal::Status)?;
    }
    log.submit(append).await.map_err(Refusal::Append)
}

/// The answer to an append refused before it was queued.
fn refused(id: u64, status: &Status) -> pb::AppendSessionResponse {
    let failure = pb::AppendFailure { code: status.code() as i32, message: status.message().to_string(), actual_version: 0 };
    pb::AppendSessionResponse { id, result: Some(pb::append_session_response::Result::Failure(failure)) }
}

fn answer(id: u64, outcome: Result<Appended, AppendError>) -> pb::AppendSessionResponse {
    use pb::append_session_response::Result as Answer;
    let result = match outcome {
        Ok(done) => Answer::Appended(appended(done)),
        Err(error) => {
            let actual_version = match &error {
                AppendError::WrongExpectedVersion { actual, .. } => *actual,
                _ => 0,
            };
            let status = append_status(error);
            Answer::Failure(pb::AppendFailure { code: status.code() as i32, message: status.message().to_string(), actual_version })
        }
    };
    pb::AppendSessionResponse { id, result: Some(result) }
}
