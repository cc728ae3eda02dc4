//! `anthill auth`: bearer tokens and the grants of certificate principals, through the node's
//! `Auth` service (docs/security.md). Every change needs a cluster admin; `whoami` shows what
//! the node makes of this command's own credentials. `--json` for every report.

use anthill_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::json;

use super::ServerArg;
use crate::client;
use crate::security::auth::Grant;

#[derive(Args)]
pub(crate) struct AuthArgs {
    #[command(subcommand)]
    what: What,
    #[command(flatten)]
    server: ServerArg,
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum What {
    /// Make a token; its secret is printed once and kept nowhere.
    CreateToken {
        /// Who the token stands for.
        name: String,
        /// `role:tenant` (`read`, `write` or `admin`; tenant `*` for all) or `cluster-admin`;
        /// repeat it.
        #[arg(long = "grant", value_parser = Grant::parse, required = true)]
        grants: Vec<Grant>,
    },
    /// The tokens (never their secrets).
    ListTokens,
    /// Revoke a token by its id: every node refuses it from then on.
    RevokeToken { id: String },
    /// Set the grants of a certificate principal (a client certificate's common name); none
    /// removes them.
    SetGrants {
        principal: String,
        #[arg(long = "grant", value_parser = Grant::parse)]
        grants: Vec<Grant>,
    },
    /// The certificate principals and their grants.
    ListGrants,
    /// Who the node takes this command's credentials for.
    Whoami,
}

fn to_wire(grants: &[Grant]) -> Vec<pb::Grant> {
    grants.iter().map(|g| pb::Grant { tenant: g.tenant.clone(), role: g.role.as_str().into() }).collect()
}

fn shown(grants: &[pb::Grant]) -> Vec<String> {
    grants.iter().map(|g| if g.tenant.is_empty() { g.role.clone() } else { format!("{}:{}", g.role, g.tenant) }).collect()
}

pub(crate) async fn run(args: AuthArgs) -> anyhow::Result<()> {
    let mut auth = client::connect(&args.server.server).await?.auth;
    let report = match args.what {
        What::CreateToken { name, grants } => {
            let made = auth
                .create_token(pb::CreateTokenRequest { name: name.clone(), grants: to_wire(&grants) })
                .await
                .map_err(client::status_error)?
                .into_inner();
            if !args.json {
                println!("token {} for {name:?}; its secret is shown only now:\n{}", made.id, made.token);
                return Ok(());
            }
            json!({"id": made.id, "name": name, "token": made.token})
        }
        What::ListTokens => {
            let tokens = auth.list_tokens(pb::ListTokensRequest {}).await.map_err(client::status_error)?.into_inner().tokens;
            if !args.json {
                for t in &tokens {
                    println!("{}  {:<24} {}", t.id, t.name, shown(&t.grants).join(", "));
                }
                return Ok(());
            }
            json!(
                tokens
                    .iter()
                    .map(|t| json!({"id": t.id, "name": t.name, "grants": shown(&t.grants), "created_unix_ms": t.created_unix_ms}))
                    .collect::<Vec<_>>()
            )
        }
        What::RevokeToken { id } => {
            let revoked =
                auth.revoke_token(pb::RevokeTokenRequest { id: id.clone() }).await.map_err(client::status_error)?.into_inner().revoked;
            if !revoked {
                anyhow::bail!("no token has the id {id:?}");
            }
            if !args.json {
                println!("token {id} revoked");
                return Ok(());
            }
            json!({"id": id, "revoked": true})
        }
        What::SetGrants { principal, grants } => {
            auth.set_grants(pb::SetGrantsRequest { principal: principal.clone(), grants: to_wire(&grants) })
                .await
                .map_err(client::status_error)?;
            let shown: Vec<String> = grants.iter().map(Grant::to_string).collect();
            if !args.json {
                println!("{principal:?} now holds: {}", if shown.is_empty() { "nothing".to_string() } else { shown.join(", ") });
                return Ok(());
            }
            json!({"principal": principal, "grants": shown})
        }
        What::ListGrants => {
            let principals = auth.list_grants(pb::ListGrantsRequest {}).await.map_err(client::status_error)?.into_inner().principals;
            if !args.json {
                for p in &principals {
                    println!("{:<24} {}", p.principal, shown(&p.grants).join(", "));
                }
                return Ok(());
            }
            json!(principals.iter().map(|p| json!({"principal": p.principal, "grants": shown(&p.grants)})).collect::<Vec<_>>())
        }
        What::Whoami => {
            let me = auth.who_am_i(pb::WhoAmIRequest {}).await.map_err(client::status_error)?.into_inner();
            if !args.json {
                println!("{} {:?}: {}", me.kind, me.name, shown(&me.grants).join(", "));
                return Ok(());
            }
            json!({"name": me.name, "kind": me.kind, "grants": shown(&me.grants)})
        }
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[derive(Args)]
pub(crate) struct TenantArgs {
    #[command(subcommand)]
    what: TenantWhat,
    #[command(flatten)]
    server: ServerArg,
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum TenantWhat {
    /// Destroy the tenant's data key on every node: its events stay in the log and can never be
    /// read again. There is no undo.
    Forget {
        tenant: String,
        /// Confirms that the tenant's data is to be lost for good.
        #[arg(long)]
        yes: bool,
    },
    /// Re-wrap every data key with the current key-encryption key (after `encryption.key_file`
    /// changed on every node, the old key in `previous_key_files`).
    RewrapKeys,
}

pub(crate) async fn tenant(args: TenantArgs) -> anyhow::Result<()> {
    let mut tenants = client::connect(&args.server.server).await?.tenants;
    let report = match args.what {
        TenantWhat::Forget { tenant, yes } => {
            if !yes {
                anyhow::bail!("forgetting {tenant:?} destroys its data for good: run again with --yes");
            }
            let done = tenants.forget(pb::ForgetTenantRequest { tenant: tenant.clone() }).await.map_err(client::status_error)?.into_inner();
            if !args.json {
                println!("tenant {tenant:?} forgotten: its events can never be read again");
                return Ok(());
            }
            json!({"tenant": tenant, "forgotten": true, "had_key": done.had_key})
        }
        TenantWhat::RewrapKeys => {
            let done = tenants.rewrap_keys(pb::RewrapKeysRequest {}).await.map_err(client::status_error)?.into_inner();
            if !args.json {
                println!("re-wrapped {} data key(s) with the current key-encryption key", done.rewrapped);
                return Ok(());
            }
            json!({"rewrapped": done.rewrapped})
        }
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
