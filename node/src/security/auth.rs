//! Who may do what: roles per tenant, the grants of certificate principals and bearer tokens,
//! and where that table is kept.
//!
//! - A stream's tenant is what comes before its first `/` (`acme/orders-1` belongs to `acme`);
//!   a stream without one belongs to `default`. A ledger book's tenant follows the same rule.
//! - Roles: `read`, `write` (and read), `admin` (and write) on a tenant or on `*`, and
//!   `cluster-admin` (everything, plus draining, decommissioning and this table).
//! - A client certificate's principal gets the grants the table holds for its name, and
//!   `cluster-admin` when `auth.cluster_admins` names it (the way in for the first admin). A
//!   token carries its own grants; only its SHA-256 is stored, its secret is shown once.
//! - The table is one JSON value ([`Replicated`]): in a cluster under `{prefix}auth/table` in
//!   the coordination store, on a single node in `data_dir/auth.json`.
//!
//! Without TLS nobody is authenticated and every call is let through ([`Caller::anonymous`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;
use tonic::Status;

use super::audit::Audit;
use super::table::Replicated;
use crate::coordination::member::Coordination;

/// The tenant of streams and books without a `/`.
pub const DEFAULT_TENANT: &str = "default";
/// Most tokens, and most certificate principals, the table holds (it is read whole).
pub const MAX_TOKENS: usize = 500;
pub const MAX_PRINCIPALS: usize = 500;
/// Most grants on one token or principal.
pub const MAX_GRANTS: usize = 16;
const TOKEN_PREFIX: &str = "ah_";
/// Largest serialized auth table.
pub const MAX_TABLE_BYTES: usize = 256 << 10;

/// The tenant `stream` belongs to: what comes before its first `/`; for a domain's stream
/// (`ledger/<book>`), the tenant of its scope ([`scope_tenant`]).
pub fn tenant_of(stream: &str) -> &str {
    let (head, rest) = match stream.split_once('/') {
        Some(split) => split,
        None => return DEFAULT_TENANT,
    };
    if crate::app::DOMAINS.contains(&head) { scope_tenant(rest) } else { head }
}

/// The tenant of a domain's scope (a ledger book): what comes before its first `:`
/// (`acme:shop` belongs to `acme`), else `default`. Scopes cannot hold `/`.
pub fn scope_tenant(scope: &str) -> &str {
    scope.split_once(':').map_or(DEFAULT_TENANT, |(tenant, _)| tenant)
}

/// What a grant allows; each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Read,
    Write,
    Admin,
    ClusterAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
            Role::ClusterAdmin => "cluster-admin",
        }
    }

    pub fn parse(text: &str) -> Result<Role, String> {
        match text {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "admin" => Ok(Role::Admin),
            "cluster-admin" => Ok(Role::ClusterAdmin),
            _ => Err(format!("unknown role {text:?}: read, write, admin or cluster-admin")),
        }
    }
}

/// A role on a tenant (`*`: every tenant); `cluster-admin` has no tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub role: Role,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
}

impl Grant {
    /// `role:tenant` (e.g. `write:acme`, `read:*`) or `cluster-admin`.
    pub fn parse(text: &str) -> Result<Grant, String> {
        match text.split_once(':') {
            None => Grant::new(Role::parse(text)?, ""),
            Some((role, tenant)) => Grant::new(Role::parse(role)?, tenant),
        }
    }

    pub fn new(role: Role, tenant: &str) -> Result<Grant, String> {
        match (role, tenant) {
            (Role::ClusterAdmin, "") => {}
            (Role::ClusterAdmin, _) => return Err("cluster-admin takes no tenant".into()),
            (_, "") => {
                return Err(format!("{} needs a tenant: {}:TENANT, or {}:* for every tenant", role.as_str(), role.as_str(), role.as_str()));
            }
            (_, "*") => {}
            (_, tenant) => check_tenant(tenant)?,
        }
        Ok(Grant { role, tenant: tenant.to_string() })
    }

    fn covers(&self, tenant: &str, need: Role) -> bool {
        self.role == Role::ClusterAdmin
            || (self.role >= need && need != Role::ClusterAdmin && (self.tenant == "*" || self.tenant == tenant))
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tenant.is_empty() { f.write_str(self.role.as_str()) } else { write!(f, "{}:{}", self.role.as_str(), self.tenant) }
    }
}

/// A tenant name: 1 to 64 of lower-case letters, digits, `-` and `_`, starting with a letter or
/// digit.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && tenant.as_bytes()[0].is_ascii_alphanumeric();
    if ok { Ok(()) } else { Err(format!("{tenant:?} is not a tenant name (1-64 of a-z 0-9 - _, starting with a letter or digit)")) }
}

/// One token, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    /// Hex SHA-256 of the token's secret part.
    pub sha256: String,
    pub grants: Vec<Grant>,
    pub created_unix_ms: u64,
}

/// The whole table.
/// (No `deny_unknown_fields`, on purpose: a node of an older version must go on following a
/// table a newer one wrote.)
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthTable {
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
    #[serde(default)]
    pub principals: BTreeMap<String, Vec<Grant>>,
}

/// How a caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerKind {
    Anonymous,
    Certificate,
    Token,
}

impl CallerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallerKind::Anonymous => "anonymous",
            CallerKind::Certificate => "certificate",
            CallerKind::Token => "token",
        }
    }
}

/// The authenticated caller of one call and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub kind: CallerKind,
    pub grants: Vec<Grant>,
    /// The token's id, for a token.
    pub token_id: Option<String>,
    /// Where the node's audit records go ([`Caller::audit`]); the gate sets it.
    pub audit: Option<Audit>,
}

impl Caller {
    /// A node without TLS: nobody is authenticated, so nothing is checked.
    pub fn anonymous() -> Caller {
        Caller {
            name: String::new(),
            kind: CallerKind::Anonymous,
            grants: vec![Grant { role: Role::ClusterAdmin, tenant: String::new() }],
            token_id: None,
            audit: None,
        }
    }

    /// The caller, its audit records going to `audit`.
    pub fn audited_by(mut self, audit: Option<Audit>) -> Caller {
        self.audit = audit;
        self
    }

    /// Records what the caller did or was refused: on the `anthill::audit` log target, and in
    /// the node's audit stream ([`crate::security::audit`]).
    pub fn audit(&self, action: &str, outcome: &str, detail: String) {
        let by = self.who();
        tracing::info!(target: "anthill::audit", by = %by, action, outcome, detail = %detail, "audit");
        if let Some(audit) = &self.audit {
            audit.record(&by, action, outcome, &detail);
        }
    }

    /// Who the caller is in audit records: kind, name and token id.
    pub fn who(&self) -> String {
        match &self.token_id {
            Some(id) => format!("token {id} ({:?})", self.name),
            None => format!("{} {:?}", self.kind.as_str(), self.name),
        }
    }

    /// The caller as the table stands now: a long call (a session, a subscription) checks each
    /// step with it, so a revoked token or a withdrawn grant stops it. `None`: revoked.
    pub fn now(&self, auth: Option<&Auth>) -> Option<Caller> {
        let Some(auth) = auth else { return Some(self.clone()) };
        match (self.kind, &self.token_id) {
            (CallerKind::Anonymous, _) => Some(self.clone()),
            (CallerKind::Certificate, _) => Some(auth.certificate_caller(&self.name).audited_by(self.audit.clone())),
            (CallerKind::Token, Some(id)) => auth.table().tokens.get(id).map(|t| Caller { grants: t.grants.clone(), ..self.clone() }),
            (CallerKind::Token, None) => None,
        }
    }

    pub fn may(&self, tenant: &str, need: Role) -> bool {
        self.grants.iter().any(|g| g.covers(tenant, need))
    }

    /// `PERMISSION_DENIED` naming the caller and what it lacks, unless it may; a refusal is an
    /// audit record.
    pub fn require(&self, tenant: &str, need: Role) -> Result<(), Status> {
        self.require_to("refused: missing grant", "", tenant, need)
    }

    /// [`Caller::require`], the refusal's audit record naming `action` (an operation audited
    /// whether allowed or not) and what it was `about`.
    pub fn require_to(&self, action: &str, about: &str, tenant: &str, need: Role) -> Result<(), Status> {
        if self.may(tenant, need) {
            return Ok(());
        }
        let wanted = if need == Role::ClusterAdmin { "cluster-admin".to_string() } else { format!("{}:{tenant}", need.as_str()) };
        let held: Vec<String> = self.grants.iter().map(Grant::to_string).collect();
        self.audit(action, "refused", format!("needs {wanted}{about}"));
        Err(Status::permission_denied(format!(
            "{} {:?} may not do this: it needs {wanted}, and holds {}",
            self.kind.as_str(),
            self.name,
            if held.is_empty() { "no grant".to_string() } else { held.join(", ") }
        )))
    }

    /// The caller the gate put in `request`'s extensions (every gated call has one).
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
        request.extensions().get::<Caller>().cloned().ok_or_else(|| Status::internal("no caller on a gated call"))
    }
}

/// A token's id and secret from its text, `ah_<id>_<secret>`.
fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && !secret.is_empty()).then_some((id, secret))
}

fn sha256_hex(secret: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf).expect("the system's random source works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.table();
        f.debug_struct("Auth").field("tokens", &table.tokens.len()).field("principals", &table.principals.len()).finish()
    }
}

/// The node's view of the table, kept current ([`Replicated`]), and the way to change it.
#[derive(Clone)]
pub struct Auth {
    table: Replicated<AuthTable>,
    cluster_admins: Arc<Vec<String>>,
}

impl Auth {
    /// A single node's table, in `path`.
    pub fn in_file(path: PathBuf, cluster_admins: Vec<String>) -> anyhow::Result<Auth> {
        Ok(Auth { table: Replicated::in_file(path, "auth table")?, cluster_admins: Arc::new(cluster_admins) })
    }

    /// A cluster's table, under `key` in its coordination store, followed until `stopped`.
    pub fn in_store(coordination: Coordination, key: String, cluster_admins: Vec<String>, stopped: watch::Receiver<bool>) -> Auth {
        Auth { table: Replicated::in_store(coordination, key, "auth table", stopped), cluster_admins: Arc::new(cluster_admins) }
    }

    pub fn table(&self) -> Arc<AuthTable> {
        self.table.get()
    }

    /// The caller a client certificate named `name` is.
    pub fn certificate_caller(&self, name: &str) -> Caller {
        let mut grants = self.table().principals.get(name).cloned().unwrap_or_default();
        if self.cluster_admins.iter().any(|a| a == name) {
            grants.push(Grant { role: Role::ClusterAdmin, tenant: String::new() });
        }
        Caller { name: name.to_string(), kind: CallerKind::Certificate, grants, token_id: None, audit: None }
    }

    /// The caller bearer `token` stands for, when it is a valid, unrevoked token.
    pub fn token_caller(&self, token: &str) -> Option<Caller> {
        let (id, secret) = split_token(token)?;
        let table = self.table();
        let record = table.tokens.get(id)?;
        // Comparing digests: a timing difference tells nothing about the secret.
        (record.sha256 == sha256_hex(secret)).then(|| Caller {
            name: record.name.clone(),
            kind: CallerKind::Token,
            grants: record.grants.clone(),
            token_id: Some(id.to_string()),
            audit: None,
        })
    }

    /// Makes a token; returns its id and its text (the only copy of the secret).
    pub async fn create_token(&self, name: &str, grants: Vec<Grant>) -> Result<(String, String), Status> {
        let name_ok = |c: char| c.is_ascii_alphanumeric() || "-_.@".contains(c);
        if name.is_empty() || name.len() > 128 || !name.chars().all(name_ok) {
            return Err(Status::invalid_argument("a token's name is 1 to 128 of letters, digits, '-', '_', '.' and '@'"));
        }
        check_grants(&grants)?;
        let (id, secret) = (random_hex(8), random_hex(32));
        let record = TokenRecord {
            name: name.to_string(),
            sha256: sha256_hex(&secret),
            grants,
            created_unix_ms: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        };
        let stored_id = id.clone();
        self.update(move |table| {
            if table.tokens.len() >= MAX_TOKENS {
                return Err(Status::resource_exhausted(format!("at most {MAX_TOKENS} tokens: revoke some first")));
            }
            table.tokens.insert(stored_id.clone(), record.clone());
            Ok(())
        })
        .await?;
        Ok((id.clone(), format!("{TOKEN_PREFIX}{id}_{secret}")))
    }

    pub async fn revoke_token(&self, id: &str) -> Result<bool, Status> {
        let id = id.to_string();
        self.update(move |table| Ok(table.tokens.remove(&id).is_some())).await
    }

    /// Sets (or, with no grants, removes) a certificate principal's grants.
    pub async fn set_grants(&self, principal: &str, grants: Vec<Grant>) -> Result<(), Status> {
        if principal.trim().is_empty() || principal.len() > 256 {
            return Err(Status::invalid_argument("a principal is a certificate's common name, 1 to 256 bytes"));
        }
        check_grants(&grants)?;
        let principal = principal.to_string();
        self.update(move |table| {
            if grants.is_empty() {
                table.principals.remove(&principal);
            } else {
                if !table.principals.contains_key(&principal) && table.principals.len() >= MAX_PRINCIPALS {
                    return Err(Status::resource_exhausted(format!("at most {MAX_PRINCIPALS} principals")));
                }
                table.principals.insert(principal.clone(), grants.clone());
            }
            Ok(())
        })
        .await
    }

    async fn update<R>(&self, change: impl Fn(&mut AuthTable) -> Result<R, Status>) -> Result<R, Status> {
        self.table
            .update(|table| {
                let result = change(table)?;
                // One value in the store: Consul takes at most 512 KiB, and every node reads it.
                let size = serde_json::to_vec(table).map_or(0, |b| b.len());
                if size > MAX_TABLE_BYTES {
                    return Err(Status::resource_exhausted(format!("the auth table would take {size} bytes, over {MAX_TABLE_BYTES}")));
                }
                Ok(result)
            })
            .await
    }
}

fn check_grants(grants: &[Grant]) -> Result<(), Status> {
    if grants.len() > MAX_GRANTS {
        return Err(Status::invalid_argument(format!("at most {MAX_GRANTS} grants")));
    }
    for g in grants {
        Grant::new(g.role, &g.tenant).map_err(Status::invalid_argument)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streams_tenant_is_what_comes_before_its_first_slash() {
        assert_eq!(tenant_of("acme/orders-1"), "acme");
        assert_eq!(tenant_of("acme/eu/orders-1"), "acme");
        assert_eq!(tenant_of("orders-1"), DEFAULT_TENANT);
        // A ledger book's stream belongs to the book's tenant, never to a tenant named `ledger`.
        assert_eq!(tenant_of("ledger/acme:shop"), "acme");
        assert_eq!(tenant_of("ledger/shop"), DEFAULT_TENANT);
        assert_eq!(scope_tenant("acme:shop:eu"), "acme");
    }

    #[test]
    fn given_grants_then_each_role_includes_the_lower_ones_on_its_tenant_only() {
        let caller = |grants: &[&str]| Caller {
            name: "c".into(),
            kind: CallerKind::Token,
            grants: grants.iter().map(|g| Grant::parse(g).unwrap()).collect(),
            token_id: Some("0123456789abcdef".into()),
            audit: None,
        };
        let writer = caller(&["write:acme"]);
        assert!(writer.may("acme", Role::Read) && writer.may("acme", Role::Write));
        assert!(!writer.may("acme", Role::Admin) && !writer.may("globex", Role::Read) && !writer.may("acme", Role::ClusterAdmin));
        let reader = caller(&["read:*"]);
        assert!(reader.may("acme", Role::Read) && reader.may("globex", Role::Read) && !reader.may("acme", Role::Write));
        let admin = caller(&["cluster-admin"]);
        assert!(admin.may("acme", Role::Admin) && admin.may("anything", Role::ClusterAdmin));
        let denied = writer.require("globex", Role::Write).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("needs write:globex, and holds write:acme"), "{denied:?}");
    }

    #[test]
    fn bad_grants_are_refused_with_the_reason() {
        assert!(Grant::parse("write").unwrap_err().contains("needs a tenant"));
        assert!(Grant::parse("cluster-admin:acme").unwrap_err().contains("takes no tenant"));
        assert!(Grant::parse("owner:acme").unwrap_err().contains("unknown role"));
        assert!(Grant::parse("read:Acme").unwrap_err().contains("not a tenant name"));
    }

    #[tokio::test]
    async fn given_a_file_table_when_a_token_is_made_and_revoked_then_only_its_exact_secret_works_until_then() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.json");
        let auth = Auth::in_file(path.clone(), vec![]).unwrap();
        let (id, token) = auth.create_token("ci", vec![Grant::parse("write:acme").unwrap()]).await.unwrap();
        let caller = auth.token_caller(&token).expect("the token works");
        assert_eq!((caller.name.as_str(), caller.kind), ("ci", CallerKind::Token));
        assert!(auth.token_caller(&format!("{token}x")).is_none());
        assert!(auth.token_caller("ah_0000000000000000_secret").is_none());
        // Only the hash is stored; the table survives a restart.
        let stored = std::fs::read_to_string(&path).unwrap();
        assert!(!stored.contains(token.rsplit('_').next().unwrap()));
        let reopened = Auth::in_file(path, vec![]).unwrap();
        assert!(reopened.token_caller(&token).is_some());
        assert!(reopened.revoke_token(&id).await.unwrap());
        assert!(reopened.token_caller(&token).is_none());
    }

    #[tokio::test]
    async fn given_a_certificate_principal_then_its_grants_come_from_the_table_and_cluster_admins_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Auth::in_file(dir.path().join("auth.json"), vec!["admin".into()]).unwrap();
        assert!(auth.certificate_caller("admin").may("x", Role::ClusterAdmin));
        assert!(auth.certificate_caller("alice").grants.is_empty());
        auth.set_grants("alice", vec![Grant::parse("read:acme").unwrap()]).await.unwrap();
        assert!(auth.certificate_caller("alice").may("acme", Role::Read));
        auth.set_grants("alice", vec![]).await.unwrap();
        assert!(auth.certificate_caller("alice").grants.is_empty());
    }
}
