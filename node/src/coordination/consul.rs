//! The coordination store on Consul: [`ConsulStore`] maps each [`CoordinationStore`] call to
//! Consul's HTTP API, so the ownership algorithm (`election.rs`) runs unchanged against a Consul
//! cluster instead of the embedded Raft store.
//!
//! Sans-IO, like the rest of the workspace: [`ConsulApi`] turns a call into a [`Call`] (method,
//! path, query, headers, body, timeout) and a `parse_*` function turns the [`Reply`] (status,
//! `X-Consul-Index`, body) into the call's result. The unit tests below cover both sides without a
//! server; [`ConsulStore`] only sends, times out and records the last index it saw.
//!
//! | call             | Consul                                                             | answer                                   |
//! |------------------|--------------------------------------------------------------------|------------------------------------------|
//! | `create_session` | `PUT /v1/session/create` `{Name, TTL, Behavior, LockDelay, NodeChecks}` | `{"ID": …}`                         |
//! | `renew_session`  | `PUT /v1/session/renew/{id}`                                       | 200: renewed; 404: gone (`false`)        |
//! | `destroy_session`| `PUT /v1/session/destroy/{id}`                                     | `true` (also for a session already gone) |
//! | `get`            | `GET /v1/kv/{key}?consistent`                                      | 404: absent                              |
//! | `list`           | `GET /v1/kv/{prefix}?recurse&consistent[&index=N&wait=Tms]`        | 404: empty; index from `X-Consul-Index`  |
//! | `put`            | `PUT /v1/kv/{key}[?cas=0 or N]`, body = value                      | `true` / `false`                         |
//! | `delete`         | `DELETE /v1/kv/{key}[?cas=N]`                                      | `true` / `false`                         |
//! | `acquire`        | rs-consul: `PUT /v1/kv/{key}?acquire={id}`, then a consistent `get` | the key's `LockIndex` if `Session` is ours |
//! | `release`        | a consistent `get`, then rs-consul: `PUT /v1/kv/{key}?release={id}` | `true` / `false`                        |
//!
//! Every call carries `dc` when a datacenter is configured, and the ACL token in `X-Consul-Token`
//! (a header value marked sensitive; no `Debug` or `Display` here prints it).
//!
//! rs-consul 0.15 makes the lock calls. It cannot make the others correctly, so they go through
//! hyper's client (the one rs-consul is built on):
//! - it has no session calls;
//! - its KV read drops `X-Consul-Index` on a 404, which a blocking list of an empty prefix needs,
//!   leaves out a `wait` under one second (Consul then blocks for its default five minutes), and
//!   decodes values into UTF-8 strings where this interface carries bytes;
//! - its write without a condition appends `&dc=` with no `?` before it, so the datacenter would
//!   become part of the key;
//! - its delete takes the check-and-set index as a `u32`; Consul's indexes are 64-bit.
//!
//! Where Consul differs from the in-process rules (`state.rs`), and what follows:
//! - a session's TTL is at least 10 s, and Consul's leader invalidates a session only once twice
//!   its TTL has passed since the last renewal; a new Consul leader gives every session a fresh
//!   2×TTL. A dead node's partitions therefore move about 2×TTL after its last renewal;
//! - sessions are created with `LockDelay: 0s` (fencing by epoch makes Consul's default 15 s wait
//!   unnecessary; it would add 15 s to every failover), `Behavior: release` (an expired holder's
//!   keys stay, with no session), and no health checks (`NodeChecks: []`): the TTL alone decides,
//!   as in the embedded store, whichever agent or server `address` names;
//! - acquiring with a session Consul no longer knows is an error there (500, "invalid session"):
//!   it maps to [`CoordinationError::NoSession`];
//! - [`Listing::index`] is the prefix's index (the highest modify index under it, deletions
//!   included), not the whole store's, and never 0 (Consul's advice for blocking loops);
//! - an unconditional delete of a missing key answers `true` (the in-process store says `false`);
//!   the ownership algorithm does not delete.
//!
//! Tested here: the mapping, and two calls against a scripted Consul on loopback. A later issue runs
//! this store against a real Consul cluster.

use std::fmt::{self, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rs_consul::{ConsulError, CreateOrUpdateKeyRequest};
use serde::Deserialize;

use super::{Cas, CoordinationError, CoordinationStore, KvEntry, Listing, Result, SessionId};

/// Consul refuses a session TTL under this.
pub const MIN_SESSION_TTL: Duration = Duration::from_secs(10);
/// The environment variable the ACL token is read from when no `token_file` is configured.
pub const TOKEN_ENV: &str = "ANTHILL_CONSUL_TOKEN";
/// How long a call that does not block may take before it fails as `Unavailable`. Consul holds a
/// request up to 7 s while it elects a leader; the caller's next round tries again sooner.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Consul caps a blocking query's wait at this.
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Largest answer read from Consul (a KV value is at most 512 KiB).
const MAX_REPLY_BYTES: usize = 16 << 20;
/// How much of an error answer's body goes into an error message.
const MAX_ERROR_TEXT_BYTES: usize = 256;
const TOKEN_HEADER: HeaderName = HeaderName::from_static("x-consul-token");
const INDEX_HEADER: &str = "x-consul-index";

/// A Consul ACL token. Kept as a header value marked sensitive; its `Debug` shows no part of it.
#[derive(Clone, PartialEq, Eq)]
pub struct AclToken(HeaderValue);

impl AclToken {
    /// `None` when `text` is not something an HTTP header can carry (the error says no more, so
    /// it cannot leak the token either).
    pub fn new(text: &str) -> Option<Self> {
        let mut value = HeaderValue::from_str(text).ok()?;
        value.set_sensitive(true);
        Some(AclToken(value))
    }

    fn expose(&self) -> &str {
        self.0.to_str().expect("built from a &str with visible ASCII only")
    }
}

impl fmt::Debug for AclToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AclToken(<redacted>)")
    }
}

/// Reads the ACL token: from `token_file` when one is configured (surrounding whitespace
/// trimmed), otherwise from `env` (the value of [`TOKEN_ENV`]), otherwise none (Consul without
/// ACLs). Errors name the file, never its content.
pub fn read_token(token_file: Option<&Path>, env: Option<String>) -> std::result::Result<Option<AclToken>, String> {
    let (text, source) = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read cluster.coordination.token_file {}: {e}", path.display()))?;
            (text, format!("cluster.coordination.token_file {}", path.display()))
        }
        None => match env {
            Some(text) if !text.trim().is_empty() => (text, TOKEN_ENV.to_string()),
            _ => return Ok(None),
        },
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("{source} is empty"));
    }
    AclToken::new(text).map(Some).ok_or_else(|| format!("{source} holds characters an HTTP header cannot carry"))
}

/// Checks Consul's address and returns it as `http://host:port`, the base every path is added to.
pub fn parse_address(text: &str) -> std::result::Result<String, String> {
    let uri: Uri = text.parse().map_err(|e| format!("is not a URL ({e}): {text:?}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!("https is not supported yet (no CA can be configured); use a local agent over http: {text:?}"));
        }
        _ => return Err(format!("must be an http:// URL such as http://127.0.0.1:8500, got {text:?}")),
    }
    let Some(authority) = uri.authority() else { return Err(format!("names no host: {text:?}")) };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("must have no path or query (the API's paths are added to it), got {text:?}"));
    }
    Ok(format!("http://{authority}"))
}

/// One HTTP call to Consul, before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: Method,
    /// From `/v1/`, percent-encoded.
    pub path: String,
    /// In order; a `None` value is a flag such as `recurse`.
    pub query: Vec<(&'static str, Option<String>)>,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// How long the shell waits for the whole answer.
    pub timeout: Duration,
}

impl Call {
    /// The path and the encoded query, as they go on the request line.
    pub fn path_and_query(&self) -> String {
        let mut text = self.path.clone();
        for (i, (name, value)) in self.query.iter().enumerate() {
            text.push(if i == 0 { '?' } else { '&' });
            text.push_str(name);
            if let Some(value) = value {
                text.push('=');
                text.push_str(&escape(value, false));
            }
        }
        text
    }

    /// The value of query parameter `name`: `Some(None)` for a flag, `None` when absent.
    #[cfg(test)]
    fn param(&self, name: &str) -> Option<Option<&str>> {
        self.query.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_deref())
    }
}

/// Consul's answer to a [`Call`].
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    /// `X-Consul-Index`, when present and a number.
    pub index: Option<u64>,
    pub body: Bytes,
}

impl Reply {
    pub fn new(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Self {
        let index = headers.get(INDEX_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
        Reply { status, index, body }
    }
}

/// Builds the calls: everything about a request except sending it.
#[derive(Debug, Clone)]
pub struct ConsulApi {
    token: Option<AclToken>,
    datacenter: Option<String>,
}

impl ConsulApi {
    pub fn new(token: Option<AclToken>, datacenter: Option<String>) -> Self {
        ConsulApi { token, datacenter }
    }

    fn call(&self, method: Method, path: String, mut query: Vec<(&'static str, Option<String>)>, body: Vec<u8>) -> Call {
        if let Some(dc) = &self.datacenter {
            query.push(("dc", Some(dc.clone())));
        }
        let mut headers = HeaderMap::new();
        if let Some(token) = &self.token {
            headers.insert(TOKEN_HEADER, token.0.clone());
        }
        Call { method, path, query, headers, body, timeout: REQUEST_TIMEOUT }
    }

    pub fn create_session(&self, node: &str, ttl: Duration) -> Call {
        debug_assert!(ttl >= MIN_SESSION_TTL, "Consul refuses a session TTL under 10 s; the configuration is checked for it");
        let body = serde_json::json!({
            "Name": format!("anthill {node}"),
            "TTL": duration_text(ttl),
            "Behavior": "release",
            "LockDelay": "0s",
            "NodeChecks": [],
        });
        self.call(Method::PUT, "/v1/session/create".into(), Vec::new(), body.to_string().into_bytes())
    }

    pub fn renew_session(&self, session: &SessionId) -> Call {
        self.call(Method::PUT, format!("/v1/session/renew/{}", escape(&session.0, false)), Vec::new(), Vec::new())
    }

    pub fn destroy_session(&self, session: &SessionId) -> Call {
        self.call(Method::PUT, format!("/v1/session/destroy/{}", escape(&session.0, false)), Vec::new(), Vec::new())
    }

    pub fn get(&self, key: &str) -> Call {
        self.call(Method::GET, kv_path(key), vec![("consistent", None)], Vec::new())
    }

    /// A recursive read of `prefix`; with `min_index > 0` and a wait of at least a millisecond, a
    /// blocking one (Consul answers once the prefix's index passes `min_index`, or after `wait`
    /// plus up to a sixteenth of it).
    pub fn list(&self, prefix: &str, min_index: u64, wait: Duration) -> Call {
        let mut query = vec![("recurse", None), ("consistent", None)];
        let wait = wait.min(MAX_WAIT);
        // A zero `wait` would mean Consul's default of five minutes, not "do not wait".
        let blocking = min_index > 0 && wait >= Duration::from_millis(1);
        if blocking {
            query.push(("index", Some(min_index.to_string())));
            query.push(("wait", Some(format!("{}ms", wait.as_millis()))));
        }
        let mut call = self.call(Method::GET, kv_path(prefix), query, Vec::new());
        if blocking {
            call.timeout += wait + wait / 16;
        }
        call
    }

    pub fn put(&self, key: &str, value: &[u8], cas: Cas) -> Call {
        let query = match cas {
            Cas::Any => Vec::new(),
            // Consul's `cas=0`: only if the key does not exist.
            Cas::Absent => vec![("cas", Some("0".into()))],
            Cas::ModifyIndex(index) => vec![("cas", Some(index.to_string()))],
        };
        self.call(Method::PUT, kv_path(key), query, value.to_vec())
    }

    /// `None` when the answer is `false` without asking: an absent key cannot be deleted, and no
    /// key has modify index 0 (Consul's `cas=0` on a delete does nothing).
    pub fn delete(&self, key: &str, cas: Cas) -> Option<Call> {
        let query = match cas {
            Cas::Any => Vec::new(),
            Cas::Absent | Cas::ModifyIndex(0) => return None,
            Cas::ModifyIndex(index) => vec![("cas", Some(index.to_string()))],
        };
        Some(self.call(Method::DELETE, kv_path(key), query, Vec::new()))
    }

    /// Deletes every key under `prefix` (`?recurse`); for removing a cluster's keys for good.
    pub fn delete_tree(&self, prefix: &str) -> Call {
        self.call(Method::DELETE, kv_path(prefix), vec![("recurse", None)], Vec::new())
    }

    /// rs-consul's request to take `escaped_key` (from [`escape_key`]) for `session`.
    pub fn acquire<'a>(&'a self, escaped_key: &'a str, session: &'a SessionId) -> CreateOrUpdateKeyRequest<'a> {
        CreateOrUpdateKeyRequest {
            key: escaped_key,
            acquire: &session.0,
            datacenter: self.datacenter.as_deref().unwrap_or_default(),
            ..Default::default()
        }
    }

    /// rs-consul's request to release `escaped_key` held by `session`.
    pub fn release<'a>(&'a self, escaped_key: &'a str, session: &'a SessionId) -> CreateOrUpdateKeyRequest<'a> {
        CreateOrUpdateKeyRequest {
            key: escaped_key,
            release: &session.0,
            datacenter: self.datacenter.as_deref().unwrap_or_default(),
            ..Default::default()
        }
    }
}

/// A key as it goes in a URL path (`/` stays the separator).
pub fn escape_key(key: &str) -> String {
    escape(key, true)
}

fn kv_path(key: &str) -> String {
    format!("/v1/kv/{}", escape_key(key))
}

/// Percent-encodes all but RFC 3986's unreserved characters (and `/` when `keep_slash`).
fn escape(text: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || (keep_slash && byte == b'/') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A duration as Consul parses it: whole seconds as `10s`, anything else in milliseconds.
pub fn duration_text(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms.is_multiple_of(1000) { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

/// An answer that is not a success: `Unavailable` (the caller retries) for 5xx and 429, `Other`
/// for the rest (a refused token, a malformed request).
fn failure(reply: &Reply) -> CoordinationError {
    let message = format!("Consul answered {}: {}", reply.status, error_text(&reply.body));
    if reply.status.is_server_error() || reply.status == StatusCode::TOO_MANY_REQUESTS {
        CoordinationError::Unavailable(message)
    } else {
        CoordinationError::Other(message)
    }
}

fn error_text(body: &[u8]) -> String {
    let cut = &body[..body.len().min(MAX_ERROR_TEXT_BYTES)];
    String::from_utf8_lossy(cut).trim().to_string()
}

fn malformed(what: &str, error: impl fmt::Display) -> CoordinationError {
    CoordinationError::Other(format!("Consul's answer to {what} is malformed: {error}"))
}

pub fn parse_session_created(reply: &Reply) -> Result<SessionId> {
    #[derive(Deserialize)]
    struct Created {
        #[serde(rename = "ID")]
        id: String,
    }
    if !reply.status.is_success() {
        return Err(failure(reply));
    }
    let created: Created = serde_json::from_slice(&reply.body).map_err(|e| malformed("a session create", e))?;
    if created.id.is_empty() {
        return Err(malformed("a session create", "an empty ID"));
    }
    Ok(SessionId(created.id))
}

/// `false` when the session no longer exists: Consul answers 404 (older versions: an empty list).
pub fn parse_session_renewed(reply: &Reply) -> Result<bool> {
    if reply.status == StatusCode::NOT_FOUND {
        return Ok(false);
    }
    if !reply.status.is_success() {
        return Err(failure(reply));
    }
    let sessions: Vec<serde_json::Value> = serde_json::from_slice(&reply.body).map_err(|e| malformed("a session renewal", e))?;
    Ok(!sessions.is_empty())
}

pub fn parse_session_destroyed(reply: &Reply) -> Result<()> {
    if !reply.status.is_success() {
        return Err(failure(reply));
    }
    Ok(())
}

/// One key as Consul's KV endpoint shows it.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvJson {
    key: String,
    create_index: u64,
    modify_index: u64,
    #[serde(default)]
    lock_index: u64,
    /// Base64; null for an empty value.
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    session: Option<String>,
}

fn parse_entries(what: &str, body: &[u8]) -> Result<Vec<KvEntry>> {
    let entries: Vec<KvJson> = serde_json::from_slice(body).map_err(|e| malformed(what, e))?;
    entries
        .into_iter()
        .map(|e| {
            let value = match e.value {
                Some(text) => base64::engine::general_purpose::STANDARD.decode(text).map_err(|err| malformed(what, err))?,
                None => Vec::new(),
            };
            Ok(KvEntry {
                key: e.key,
                value,
                create_index: e.create_index,
                modify_index: e.modify_index,
                lock_index: e.lock_index,
                session: e.session.filter(|s| !s.is_empty()).map(SessionId),
            })
        })
        .collect()
}

/// The key `key` from a [`ConsulApi::get`]; 404 means it does not exist.
pub fn parse_entry(key: &str, reply: &Reply) -> Result<Option<KvEntry>> {
    if reply.status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !reply.status.is_success() {
        return Err(failure(reply));
    }
    Ok(parse_entries("a key read", &reply.body)?.into_iter().find(|e| e.key == key))
}

/// The keys of a [`ConsulApi::list`]. 404 means none (it still carries the prefix's index).
pub fn parse_listing(reply: &Reply) -> Result<Listing> {
    let entries = match reply.status {
        StatusCode::NOT_FOUND => Vec::new(),
        status if status.is_success() => parse_entries("a prefix read", &reply.body)?,
        _ => return Err(failure(reply)),
    };
    let index = reply.index.ok_or_else(|| malformed("a prefix read", "no X-Consul-Index header"))?;
    // An index of 0 would make the next blocking read return at once, and so on without pause.
    Ok(Listing { entries, index: index.max(1) })
}

/// The `true` or `false` of a KV write.
pub fn parse_written(reply: &Reply) -> Result<bool> {
    if !reply.status.is_success() {
        return Err(failure(reply));
    }
    match std::str::from_utf8(&reply.body).map(str::trim) {
        Ok("true") => Ok(true),
        Ok("false") => Ok(false),
        _ => Err(malformed("a key write", format!("{:?}", error_text(&reply.body)))),
    }
}

/// rs-consul's answer to an acquire or release by `session`.
pub fn parse_lock_outcome(outcome: std::result::Result<(bool, u64), ConsulError>, session: &SessionId) -> Result<bool> {
    match outcome {
        Ok((done, _index)) => Ok(done),
        Err(ConsulError::UnexpectedResponseCode(status, body)) => {
            let body = body.unwrap_or_default();
            let reply = Reply { status, index: None, body: Bytes::from(body) };
            if status.is_server_error() && error_text(&reply.body).contains("invalid session") {
                return Err(CoordinationError::NoSession(session.clone()));
            }
            Err(failure(&reply))
        }
        Err(e @ (ConsulError::ResponseError(_) | ConsulError::InvalidResponse(_) | ConsulError::TimeoutExceeded(_))) => {
            Err(CoordinationError::Unavailable(format!("cannot reach Consul: {e}")))
        }
        Err(e) => Err(CoordinationError::Other(format!("Consul lock call: {e}"))),
    }
}

/// The epoch an acquisition got: the key's lock index, read after the acquire, if `session` still
/// holds it (Consul's acquire answers only yes or no).
pub fn lock_index_held(entry: Option<&KvEntry>, session: &SessionId) -> Option<u64> {
    entry.filter(|e| e.session.as_ref() == Some(session)).map(|e| e.lock_index)
}

/// The coordination store on a Consul cluster (module doc).
pub struct ConsulStore {
    api: ConsulApi,
    /// `http://host:port`.
    base: String,
    http: Client<HttpConnector, Full<Bytes>>,
    locks: rs_consul::Consul,
    /// The index of the last prefix read: `Node.Status` shows it as `coordination_applied`.
    last_index: AtomicU64,
}

impl fmt::Debug for ConsulStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulStore").field("base", &self.base).field("api", &self.api).finish_non_exhaustive()
    }
}

impl ConsulStore {
    /// A store talking to `base` (from [`parse_address`]). Connects lazily: nothing is sent yet.
    pub fn new(base: String, token: Option<AclToken>, datacenter: Option<String>) -> Self {
        let config = rs_consul::Config {
            address: base.clone(),
            token: token.as_ref().map(|t| t.expose().to_string()),
            ..rs_consul::Config::default()
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        ConsulStore {
            api: ConsulApi::new(token, datacenter),
            base,
            http: Client::builder(TokioExecutor::new()).build(connector),
            locks: rs_consul::Consul::new(config),
            last_index: AtomicU64::new(0),
        }
    }

    /// The index of the last prefix read (0 before the first).
    /// [`CoordinationStore::list`] without recording the index (a follower of one key, whose
    /// index is not the cluster prefix's).
    pub async fn list_quietly(&self, prefix: &str, min_index: u64, wait: Duration) -> Result<Listing> {
        parse_listing(&self.send(self.api.list(prefix, min_index, wait)).await?)
    }

    pub fn last_index(&self) -> u64 {
        self.last_index.load(Ordering::Relaxed)
    }

    /// Deletes every key under `prefix`, which must be a folder (end in `/`, not be `/` alone):
    /// a cluster's keys, when the cluster is removed for good.
    pub async fn delete_tree(&self, prefix: &str) -> Result<()> {
        if !prefix.ends_with('/') || prefix.trim_matches('/').is_empty() {
            return Err(CoordinationError::Other(format!("refusing to delete the keys under {prefix:?}: not a folder of its own")));
        }
        match parse_written(&self.send(self.api.delete_tree(prefix)).await?)? {
            true => Ok(()),
            false => Err(CoordinationError::Other(format!("Consul did not delete the keys under {prefix:?}"))),
        }
    }

    async fn send(&self, call: Call) -> Result<Reply> {
        let target = format!("{} {}", call.method, call.path);
        let uri = format!("{}{}", self.base, call.path_and_query());
        let mut request = http::Request::builder().method(call.method).uri(uri);
        if let Some(headers) = request.headers_mut() {
            headers.extend(call.headers);
        }
        let request = request.body(Full::new(Bytes::from(call.body))).map_err(|e| CoordinationError::Other(format!("{target}: {e}")))?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| CoordinationError::Unavailable(format!("{target}: {e}")))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_REPLY_BYTES).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    CoordinationError::Other(format!("{target}: answer larger than {MAX_REPLY_BYTES} bytes"))
                } else {
                    CoordinationError::Unavailable(format!("{target}: {e}"))
                }
            })?;
            Ok(Reply::new(parts.status, &parts.headers, body.to_bytes()))
        };
        tokio::time::timeout(call.timeout, exchange)
            .await
            .map_err(|_| CoordinationError::Unavailable(format!("{target}: no answer from Consul within {:?}", call.timeout)))?
    }

    /// An acquire or release through rs-consul, which sets no timeout of its own.
    async fn lock_call(&self, request: CreateOrUpdateKeyRequest<'_>, value: Vec<u8>, session: &SessionId) -> Result<bool> {
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, self.locks.create_or_update_key(request, value))
            .await
            .unwrap_or(Err(ConsulError::TimeoutExceeded(REQUEST_TIMEOUT)));
        parse_lock_outcome(outcome, session)
    }
}

impl CoordinationStore for ConsulStore {
    async fn create_session(&self, node: &str, ttl: Duration) -> Result<SessionId> {
        parse_session_created(&self.send(self.api.create_session(node, ttl)).await?)
    }

    async fn renew_session(&self, session: &SessionId) -> Result<bool> {
        parse_session_renewed(&self.send(self.api.renew_session(session)).await?)
    }

    async fn destroy_session(&self, session: &SessionId) -> Result<()> {
        parse_session_destroyed(&self.send(self.api.destroy_session(session)).await?)
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        parse_entry(key, &self.send(self.api.get(key)).await?)
    }

    async fn list(&self, prefix: &str, min_index: u64, wait: Duration) -> Result<Listing> {
        let listing = self.list_quietly(prefix, min_index, wait).await?;
        self.last_index.store(listing.index, Ordering::Relaxed);
        Ok(listing)
    }

    async fn put(&self, key: &str, value: &[u8], cas: Cas) -> Result<bool> {
        parse_written(&self.send(self.api.put(key, value, cas)).await?)
    }

    async fn delete(&self, key: &str, cas: Cas) -> Result<bool> {
        match self.api.delete(key, cas) {
            Some(call) => parse_written(&self.send(call).await?),
            None => Ok(false),
        }
    }

    async fn acquire(&self, key: &str, value: &[u8], session: &SessionId) -> Result<Option<u64>> {
        let escaped = escape_key(key);
        if !self.lock_call(self.api.acquire(&escaped, session), value.to_vec(), session).await? {
            return Ok(None);
        }
        // Held by this session until it expires, and only a new holder changes the lock index,
        // so the index read now is the one this acquisition got (or the session lost it already).
        Ok(lock_index_held(self.get(key).await?.as_ref(), session))
    }

    async fn release(&self, key: &str, session: &SessionId) -> Result<bool> {
        // Consul's release also writes the request's body as the value: send the value back, so a
        // released key keeps it as in the in-process store. A write between the read and the
        // release would be overwritten; only the holder writes a held key.
        let Some(entry) = self.get(key).await?.filter(|e| e.session.as_ref() == Some(session)) else {
            return Ok(false);
        };
        let escaped = escape_key(key);
        self.lock_call(self.api.release(&escaped, session), entry.value, session).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "9b1f3c62-secret-token";

    fn api() -> ConsulApi {
        ConsulApi::new(None, None)
    }

    fn session() -> SessionId {
        SessionId("adf4238a-882b-9ddc-4a9d-5b6758e4159e".into())
    }

    fn reply(status: u16, index: Option<u64>, body: &str) -> Reply {
        let mut headers = HeaderMap::new();
        if let Some(index) = index {
            headers.insert(INDEX_HEADER, HeaderValue::from_str(&index.to_string()).unwrap());
        }
        Reply::new(StatusCode::from_u16(status).unwrap(), &headers, Bytes::from(body.to_string()))
    }

    fn json(call: &Call) -> serde_json::Value {
        serde_json::from_slice(&call.body).unwrap()
    }

    /// A KV answer as Consul writes it: `value` base64-encoded, `Session` only when held.
    fn kv_json(key: &str, value: &[u8], indexes: (u64, u64, u64), session: Option<&str>) -> serde_json::Value {
        let (create, modify, lock) = indexes;
        let mut entry = serde_json::json!({
            "Key": key, "CreateIndex": create, "ModifyIndex": modify, "LockIndex": lock, "Flags": 0,
            "Value": base64::engine::general_purpose::STANDARD.encode(value),
        });
        if let Some(session) = session {
            entry["Session"] = session.into();
        }
        entry
    }

    #[test]
    fn create_session_asks_for_a_ttl_only_session_that_releases_its_locks_with_no_lock_delay() {
        let call = api().create_session("node-1", Duration::from_secs(10));
        assert_eq!((call.method.clone(), call.path.as_str()), (Method::PUT, "/v1/session/create"));
        assert!(call.query.is_empty());
        let body = json(&call);
        assert_eq!(body["TTL"], "10s");
        assert_eq!(body["Behavior"], "release");
        assert_eq!(body["LockDelay"], "0s", "Consul's default lock delay (15 s) would stall every failover");
        assert_eq!(body["NodeChecks"], serde_json::json!([]), "no serfHealth: the TTL alone decides");
        assert_eq!(body["Name"], "anthill node-1");
    }

    #[test]
    fn durations_are_whole_seconds_when_they_can_be_and_milliseconds_otherwise() {
        assert_eq!(duration_text(Duration::from_secs(10)), "10s");
        assert_eq!(duration_text(Duration::from_millis(12_500)), "12500ms");
        assert_eq!(duration_text(Duration::ZERO), "0s");
        let call = api().create_session("n", Duration::from_millis(10_250));
        assert_eq!(json(&call)["TTL"], "10250ms");
    }

    #[test]
    fn a_created_session_is_its_id_and_a_malformed_answer_is_an_error() {
        let id = parse_session_created(&reply(200, None, r#"{"ID":"adf4238a-882b-9ddc-4a9d-5b6758e4159e"}"#)).unwrap();
        assert_eq!(id, session());
        assert!(matches!(parse_session_created(&reply(200, None, r#"{"ID":""}"#)), Err(CoordinationError::Other(_))));
        assert!(matches!(parse_session_created(&reply(200, None, "<html>")), Err(CoordinationError::Other(_))));
        assert!(matches!(parse_session_created(&reply(500, None, "No cluster leader")), Err(CoordinationError::Unavailable(_))));
    }

    #[test]
    fn renew_puts_to_the_session_path_and_a_missing_session_is_false_not_an_error() {
        let call = api().renew_session(&session());
        assert_eq!((call.method.clone(), call.path.as_str()), (Method::PUT, "/v1/session/renew/adf4238a-882b-9ddc-4a9d-5b6758e4159e"));
        assert!(parse_session_renewed(&reply(200, None, r#"[{"ID":"adf4238a","TTL":"10s"}]"#)).unwrap());
        assert!(!parse_session_renewed(&reply(404, None, "Session id 'adf4238a' not found")).unwrap());
        assert!(!parse_session_renewed(&reply(200, None, "[]")).unwrap(), "older Consul versions answer an empty list");
        assert!(matches!(parse_session_renewed(&reply(503, None, "")), Err(CoordinationError::Unavailable(_))));
    }

    #[test]
    fn destroy_puts_to_the_session_path_and_only_an_error_status_fails() {
        let call = api().destroy_session(&session());
        assert_eq!((call.method.clone(), call.path.as_str()), (Method::PUT, "/v1/session/destroy/adf4238a-882b-9ddc-4a9d-5b6758e4159e"));
        parse_session_destroyed(&reply(200, None, "true")).unwrap();
        assert!(matches!(parse_session_destroyed(&reply(500, None, "rpc error")), Err(CoordinationError::Unavailable(_))));
    }

    #[test]
    fn get_is_a_consistent_read_of_one_key_and_decodes_value_and_indexes() {
        let call = api().get("anthill/leaders/3");
        assert_eq!((call.method.clone(), call.path.as_str()), (Method::GET, "/v1/kv/anthill/leaders/3"));
        assert_eq!(call.path_and_query(), "/v1/kv/anthill/leaders/3?consistent");
        let body = serde_json::json!([kv_json("anthill/leaders/3", b"node-2", (5, 42, 3), Some(&session().0))]);
        let entry = parse_entry("anthill/leaders/3", &reply(200, Some(42), &body.to_string())).unwrap().unwrap();
        assert_eq!(
            entry,
            KvEntry {
                key: "anthill/leaders/3".into(),
                value: b"node-2".to_vec(),
                create_index: 5,
                modify_index: 42,
                lock_index: 3,
                session: Some(session()),
            }
        );
    }

    #[test]
    fn a_missing_key_is_none_and_an_unheld_key_has_no_session() {
        assert_eq!(parse_entry("anthill/x", &reply(404, Some(7), "")).unwrap(), None);
        let body = serde_json::json!([{"Key": "anthill/x", "CreateIndex": 1, "ModifyIndex": 2, "LockIndex": 1, "Flags": 0, "Value": null}]);
        let entry = parse_entry("anthill/x", &reply(200, Some(2), &body.to_string())).unwrap().unwrap();
        assert_eq!((entry.value, entry.session, entry.lock_index), (Vec::new(), None, 1));
    }

    #[test]
    fn values_are_bytes_not_only_utf8_and_bad_base64_is_an_error() {
        let body = serde_json::json!([kv_json("k", &[0xff, 0x00, 0xfe], (1, 1, 0), None)]);
        assert_eq!(parse_entry("k", &reply(200, Some(1), &body.to_string())).unwrap().unwrap().value, vec![0xff, 0x00, 0xfe]);
        let bad = r#"[{"Key":"k","CreateIndex":1,"ModifyIndex":1,"LockIndex":0,"Value":"not base64!"}]"#;
        assert!(matches!(parse_entry("k", &reply(200, Some(1), bad)), Err(CoordinationError::Other(_))));
    }

    #[test]
    fn list_without_a_min_index_is_a_recursive_consistent_read_that_does_not_block() {
        let call = api().list("anthill/", 0, Duration::from_secs(3));
        assert_eq!(call.path_and_query(), "/v1/kv/anthill/?recurse&consistent");
        assert_eq!(call.timeout, REQUEST_TIMEOUT);
    }

    #[test]
    fn list_with_a_min_index_blocks_with_index_and_wait_and_the_timeout_covers_consuls_jitter() {
        let call = api().list("anthill/", 120, Duration::from_millis(3_333));
        assert_eq!(call.path_and_query(), "/v1/kv/anthill/?recurse&consistent&index=120&wait=3333ms");
        assert!(call.timeout >= Duration::from_millis(3_333 + 3_333 / 16) + REQUEST_TIMEOUT, "{:?}", call.timeout);
    }

    #[test]
    fn list_never_asks_for_a_zero_wait_which_consul_reads_as_five_minutes_and_caps_the_wait_at_ten() {
        assert_eq!(api().list("p/", 9, Duration::from_micros(500)).param("index"), None);
        assert_eq!(api().list("p/", 9, Duration::ZERO).param("wait"), None);
        assert_eq!(api().list("p/", 9, Duration::from_secs(3600)).param("wait"), Some(Some("600000ms")));
    }

    #[test]
    fn a_listing_takes_its_index_from_the_header_and_a_404_is_an_empty_prefix() {
        let body = serde_json::json!([
            kv_json("anthill/members/node-1", b"10.0.0.1:7400", (3, 9, 1), Some("s1")),
            kv_json("anthill/placement/0", b"node-1,node-2,node-3", (4, 4, 0), None),
        ]);
        let listing = parse_listing(&reply(200, Some(77), &body.to_string())).unwrap();
        assert_eq!(listing.index, 77);
        let keys: Vec<&str> = listing.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["anthill/members/node-1", "anthill/placement/0"]);
        assert_eq!(listing.entries[0].session, Some(SessionId("s1".into())));
        assert_eq!(parse_listing(&reply(404, Some(31), "")).unwrap(), Listing { entries: Vec::new(), index: 31 });
    }

    #[test]
    fn a_listing_without_an_index_is_an_error_and_an_index_of_zero_becomes_one() {
        assert!(matches!(parse_listing(&reply(200, None, "[]")), Err(CoordinationError::Other(_))));
        assert_eq!(parse_listing(&reply(404, Some(0), "")).unwrap().index, 1, "0 would turn blocking waits into a busy loop");
        assert!(matches!(parse_listing(&reply(500, Some(3), "leadership lost")), Err(CoordinationError::Unavailable(_))));
    }

    #[test]
    fn put_maps_each_condition_to_its_cas_parameter_and_sends_the_value_as_the_body() {
        let absent = api().put("anthill/placement/1", b"a,b,c", Cas::Absent);
        assert_eq!((absent.method.clone(), absent.path_and_query()), (Method::PUT, "/v1/kv/anthill/placement/1?cas=0".to_string()));
        assert_eq!(absent.body, b"a,b,c");
        assert_eq!(api().put("k", b"", Cas::ModifyIndex(7)).path_and_query(), "/v1/kv/k?cas=7");
        assert_eq!(api().put("k", b"", Cas::ModifyIndex(1 << 40)).path_and_query(), format!("/v1/kv/k?cas={}", 1u64 << 40));
        assert_eq!(api().put("k", b"", Cas::Any).path_and_query(), "/v1/kv/k");
    }

    #[test]
    fn a_write_answers_true_or_false_and_anything_else_is_an_error() {
        assert!(parse_written(&reply(200, None, "true\n")).unwrap());
        assert!(!parse_written(&reply(200, None, "false")).unwrap());
        assert!(matches!(parse_written(&reply(200, None, "maybe")), Err(CoordinationError::Other(_))));
        assert!(matches!(parse_written(&reply(403, None, "Permission denied")), Err(CoordinationError::Other(_))));
    }

    #[test]
    fn delete_sends_a_cas_only_for_a_modify_index_and_asks_nothing_when_it_cannot_delete() {
        let call = api().delete("anthill/x", Cas::ModifyIndex(9)).unwrap();
        assert_eq!((call.method.clone(), call.path_and_query()), (Method::DELETE, "/v1/kv/anthill/x?cas=9".to_string()));
        assert_eq!(api().delete("anthill/x", Cas::Any).unwrap().path_and_query(), "/v1/kv/anthill/x");
        assert_eq!(api().delete("anthill/x", Cas::Absent), None);
        assert_eq!(api().delete("anthill/x", Cas::ModifyIndex(0)), None);
    }

    #[test]
    fn keys_and_session_ids_are_percent_encoded_in_paths_and_query_values() {
        assert_eq!(api().get("anthill/members/node 1?x=y").path, "/v1/kv/anthill/members/node%201%3Fx%3Dy");
        assert_eq!(escape_key("a/b-c_d.e~f"), "a/b-c_d.e~f");
        assert_eq!(api().renew_session(&SessionId("a/b".into())).path, "/v1/session/renew/a%2Fb");
        let dc = ConsulApi::new(None, Some("eu west".into()));
        assert_eq!(dc.get("k").path_and_query(), "/v1/kv/k?consistent&dc=eu%20west");
    }

    #[test]
    fn a_configured_datacenter_goes_on_every_call() {
        let dc = ConsulApi::new(None, Some("dc2".into()));
        let s = session();
        let calls = [
            dc.create_session("n", MIN_SESSION_TTL),
            dc.renew_session(&s),
            dc.destroy_session(&s),
            dc.get("k"),
            dc.list("p/", 3, Duration::from_secs(1)),
            dc.put("k", b"v", Cas::Any),
            dc.delete("k", Cas::Any).unwrap(),
        ];
        for call in &calls {
            assert_eq!(call.param("dc"), Some(Some("dc2")), "{}", call.path_and_query());
        }
        let escaped = escape_key("k");
        assert_eq!(dc.acquire(&escaped, &s).datacenter, "dc2");
        assert_eq!(dc.release(&escaped, &s).datacenter, "dc2");
        assert_eq!(api().get("k").param("dc"), None);
    }

    #[test]
    fn acquire_and_release_name_the_session_escaped_key_and_no_condition() {
        let api = api();
        let s = session();
        let escaped = escape_key("anthill/leaders/7");
        let acquire = api.acquire(&escaped, &s);
        assert_eq!((acquire.key, acquire.acquire, acquire.release), ("anthill/leaders/7", s.0.as_str(), ""));
        assert_eq!((acquire.check_and_set, acquire.datacenter), (None, ""));
        let release = api.release(&escaped, &s);
        assert_eq!((release.key, release.acquire, release.release), ("anthill/leaders/7", "", s.0.as_str()));
        assert_eq!(release.check_and_set, None);
    }

    #[test]
    fn the_lock_index_after_an_acquire_counts_only_while_this_session_holds_the_key() {
        let mine = KvEntry {
            key: "anthill/leaders/1".into(),
            value: b"node-1".to_vec(),
            create_index: 3,
            modify_index: 20,
            lock_index: 4,
            session: Some(session()),
        };
        assert_eq!(lock_index_held(Some(&mine), &session()), Some(4));
        let taken = KvEntry { session: Some(SessionId("other".into())), lock_index: 5, ..mine.clone() };
        assert_eq!(lock_index_held(Some(&taken), &session()), None);
        let released = KvEntry { session: None, ..mine };
        assert_eq!(lock_index_held(Some(&released), &session()), None);
        assert_eq!(lock_index_held(None, &session()), None);
    }

    #[test]
    fn lock_answers_map_to_yes_no_no_session_unavailable_or_other() {
        let s = session();
        assert!(parse_lock_outcome(Ok((true, 12)), &s).unwrap());
        assert!(!parse_lock_outcome(Ok((false, 12)), &s).unwrap());
        let status = |code| StatusCode::from_u16(code).unwrap();
        let invalid = ConsulError::UnexpectedResponseCode(status(500), Some(format!("invalid session \"{}\"", s.0)));
        assert!(matches!(parse_lock_outcome(Err(invalid), &s), Err(CoordinationError::NoSession(id)) if id == s));
        let leaderless = ConsulError::UnexpectedResponseCode(status(500), Some("No cluster leader".into()));
        assert!(matches!(parse_lock_outcome(Err(leaderless), &s), Err(CoordinationError::Unavailable(_))));
        let busy = ConsulError::UnexpectedResponseCode(status(429), None);
        assert!(matches!(parse_lock_outcome(Err(busy), &s), Err(CoordinationError::Unavailable(_))));
        let denied = ConsulError::UnexpectedResponseCode(status(403), Some("Permission denied".into()));
        assert!(matches!(parse_lock_outcome(Err(denied), &s), Err(CoordinationError::Other(_))));
        let timeout = ConsulError::TimeoutExceeded(REQUEST_TIMEOUT);
        assert!(matches!(parse_lock_outcome(Err(timeout), &s), Err(CoordinationError::Unavailable(_))));
    }

    #[test]
    fn server_errors_and_rate_limits_are_unavailable_and_other_refusals_are_not() {
        for code in [500, 502, 503, 504, 429] {
            assert!(matches!(parse_written(&reply(code, None, "")), Err(CoordinationError::Unavailable(_))), "{code}");
        }
        for code in [400, 401, 403, 405] {
            assert!(matches!(parse_written(&reply(code, None, "")), Err(CoordinationError::Other(_))), "{code}");
        }
        let long = "x".repeat(10_000);
        let message = parse_written(&reply(500, None, &long)).unwrap_err().to_string();
        assert!(message.len() < 400, "error text is bounded: {} bytes", message.len());
    }

    #[test]
    fn the_token_goes_in_the_consul_token_header_and_no_debug_output_shows_it() {
        let token = AclToken::new(TOKEN).unwrap();
        let api = ConsulApi::new(Some(token.clone()), None);
        let call = api.put("k", b"v", Cas::Any);
        assert_eq!(call.headers.get("X-Consul-Token").map(|v| v.to_str().unwrap()), Some(TOKEN));
        for call in [call, api.create_session("n", MIN_SESSION_TTL), api.list("p/", 1, Duration::from_secs(1))] {
            assert!(call.headers.contains_key(TOKEN_HEADER), "{}", call.path);
            assert!(!format!("{call:?}").contains(TOKEN), "{call:?}");
        }
        assert!(!format!("{token:?} {api:?}").contains(TOKEN));
        assert!(ConsulApi::new(None, None).get("k").headers.is_empty());
    }

    #[tokio::test]
    async fn the_store_does_not_show_its_token_and_an_unreachable_consul_is_unavailable() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let base = parse_address(&format!("http://127.0.0.1:{port}")).unwrap();
        let store = ConsulStore::new(base, AclToken::new(TOKEN), None);
        assert!(!format!("{store:?}").contains(TOKEN), "{store:?}");
        let outcomes = [
            store.get("anthill/x").await.map(|_| ()),
            store.renew_session(&session()).await.map(|_| ()),
            store.acquire("anthill/x", b"v", &session()).await.map(|_| ()),
        ];
        for outcome in outcomes {
            let error = outcome.unwrap_err();
            assert!(matches!(error, CoordinationError::Unavailable(_)), "{error}");
            assert!(!error.to_string().contains(TOKEN));
        }
        assert_eq!(store.last_index(), 0);
    }

    /// A scripted Consul on loopback: answers each connection's request with the next of
    /// `answers` (status, `X-Consul-Index`, body), and returns what it received, head and body.
    async fn scripted_consul(answers: Vec<(u16, Option<u64>, String)>) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut received = Vec::new();
            for (status, index, body) in answers {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then as many body bytes as Content-Length says.
                loop {
                    let n = socket.read(&mut chunk).await.unwrap();
                    request.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text.lines().find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap())
                        });
                        if request.len() >= end + 4 + length.unwrap_or(0) || n == 0 {
                            break;
                        }
                    }
                }
                received.push(String::from_utf8_lossy(&request).to_string());
                let index = index.map(|i| format!("X-Consul-Index: {i}\r\n")).unwrap_or_default();
                let reason = StatusCode::from_u16(status).unwrap().canonical_reason().unwrap_or("");
                let answer = format!(
                    "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{index}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(answer.as_bytes()).await.unwrap();
                socket.shutdown().await.unwrap();
            }
            received
        });
        (base, server)
    }

    #[tokio::test]
    async fn given_a_scripted_consul_when_acquiring_then_rs_consul_sends_the_acquire_and_the_lock_index_is_read_back() {
        let held = serde_json::json!([kv_json("anthill/leaders/7", b"node-1", (2, 30, 3), Some(&session().0))]);
        let (base, server) = scripted_consul(vec![(200, None, "true".into()), (200, Some(30), held.to_string())]).await;
        let store = ConsulStore::new(base, AclToken::new(TOKEN), Some("dc1".into()));
        assert_eq!(store.acquire("anthill/leaders/7", b"node-1", &session()).await.unwrap(), Some(3));
        let received = server.await.unwrap();
        let head = |i: usize| received[i].lines().next().unwrap().to_string();
        assert_eq!(head(0), format!("PUT /v1/kv/anthill/leaders/7?acquire={}&dc=dc1 HTTP/1.1", session().0));
        assert!(received[0].to_ascii_lowercase().contains(&format!("x-consul-token: {TOKEN}")), "{}", received[0]);
        assert!(received[0].ends_with("\r\n\r\nnode-1"), "the value is the body: {:?}", received[0]);
        assert_eq!(head(1), "GET /v1/kv/anthill/leaders/7?consistent&dc=dc1 HTTP/1.1");
        assert!(received[1].to_ascii_lowercase().contains(&format!("x-consul-token: {TOKEN}")), "{}", received[1]);
    }

    #[tokio::test]
    async fn given_a_scripted_consul_when_a_blocking_list_finds_nothing_then_the_404s_index_is_kept() {
        let (base, server) = scripted_consul(vec![(404, Some(812), String::new())]).await;
        let store = ConsulStore::new(base, None, None);
        let listing = store.list("anthill/", 800, Duration::from_millis(1_500)).await.unwrap();
        assert_eq!((listing.entries.len(), listing.index, store.last_index()), (0, 812, 812));
        let received = server.await.unwrap();
        assert!(received[0].starts_with("GET /v1/kv/anthill/?recurse&consistent&index=800&wait=1500ms HTTP/1.1"), "{}", received[0]);
        assert!(!received[0].to_ascii_lowercase().contains("x-consul-token"), "no token configured, none sent");
    }

    #[test]
    fn the_token_comes_from_the_file_first_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, format!("  {TOKEN}\n")).unwrap();
        let from_file = read_token(Some(&file), Some("from-env".into())).unwrap().unwrap();
        assert_eq!(from_file.expose(), TOKEN);
        assert_eq!(read_token(None, Some("from-env".into())).unwrap().unwrap().expose(), "from-env");
        assert_eq!(read_token(None, Some(" ".into())).unwrap(), None);
        assert_eq!(read_token(None, None).unwrap(), None);
    }

    #[test]
    fn an_unreadable_empty_or_unsendable_token_file_is_an_error_that_does_not_quote_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        assert!(read_token(Some(&missing), None).unwrap_err().contains("cannot read cluster.coordination.token_file"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read_token(Some(&empty), None).unwrap_err().ends_with("is empty"));
        let bad = dir.path().join("bad");
        std::fs::write(&bad, format!("{TOKEN}\nsecond line")).unwrap();
        let error = read_token(Some(&bad), None).unwrap_err();
        assert!(error.contains("cannot carry") && !error.contains(TOKEN), "{error}");
    }

    #[test]
    fn the_address_must_be_a_plain_http_url() {
        assert_eq!(parse_address("http://127.0.0.1:8500").unwrap(), "http://127.0.0.1:8500");
        assert_eq!(parse_address("http://consul.service:8500/").unwrap(), "http://consul.service:8500");
        for bad in ["127.0.0.1:8500", "https://consul:8501", "http://consul:8500/v1", "http://consul:8500/?dc=x", "not a url", ""] {
            assert!(parse_address(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
