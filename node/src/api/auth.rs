//! The `Auth` service: tokens and the grants of certificate principals (docs/security.md), and
//! the `Tenants` service (forgetting a tenant, re-wrapping data keys). Every call but `WhoAmI`
//! needs `cluster-admin`; each change is an audit record ([`crate::security::audit`]) with who
//! made it. Without TLS there is nobody to authenticate, and the calls that change the table are
//! refused.

use anthill_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::security::auth::{Auth, Caller, Grant, Role};
use crate::security::keys::Keys;

pub struct AuthApi {
    /// `None` when the node runs without TLS.
    auth: Option<Auth>,
}

impl AuthApi {
    pub fn new(auth: Option<Auth>) -> Self {
        AuthApi { auth }
    }

    /// The table, once the caller is known to be a cluster admin.
    fn admin<T>(&self, request: &Request<T>) -> Result<(&Auth, Caller), Status> {
        let caller = Caller::of(request)?;
        caller.require("", Role::ClusterAdmin)?;
        let auth = self.auth.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this node runs without TLS: nobody is authenticated, so there is nothing to grant (docs/security.md)",
            )
        })?;
        Ok((auth, caller))
    }
}

pub(crate) fn grants_from_wire(grants: Vec<pb::Grant>) -> Result<Vec<Grant>, Status> {
    grants
        .into_iter()
        .map(|g| Role::parse(&g.role).and_then(|role| Grant::new(role, &g.tenant)).map_err(Status::invalid_argument))
        .collect()
}

fn grants_to_wire(grants: &[Grant]) -> Vec<pb::Grant> {
    grants.iter().map(|g| pb::Grant { tenant: g.tenant.clone(), role: g.role.as_str().to_string() }).collect()
}

#[tonic::async_trait]
impl pb::auth_server::Auth for AuthApi {
    async fn create_token(&self, request: Request<pb::CreateTokenRequest>) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let (auth, caller) = self.admin(&request)?;
        let r = request.into_inner();
        let grants = grants_from_wire(r.grants)?;
        let shown: Vec<String> = grants.iter().map(Grant::to_string).collect();
        let (id, token) = auth.create_token(&r.name, grants).await?;
        caller.audit("token created", "done", format!("token {id} ({:?}) with {}", r.name, shown.join(", ")));
        Ok(Response::new(pb::CreateTokenResponse { id, token }))
    }

    async fn list_tokens(&self, request: Request<pb::ListTokensRequest>) -> Result<Response<pb::ListTokensResponse>, Status> {
        let (auth, _) = self.admin(&request)?;
        let tokens = auth
            .table()
            .tokens
            .iter()
            .map(|(id, t)| pb::TokenInfo {
                id: id.clone(),
                name: t.name.clone(),
                grants: grants_to_wire(&t.grants),
                created_unix_ms: t.created_unix_ms,
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn revoke_token(&self, request: Request<pb::RevokeTokenRequest>) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let (auth, caller) = self.admin(&request)?;
        let id = request.into_inner().id;
        let revoked = auth.revoke_token(&id).await?;
        caller.audit("token revoked", "done", format!("token {id:?}{}", if revoked { "" } else { " (was not there)" }));
        Ok(Response::new(pb::RevokeTokenResponse { revoked }))
    }

    async fn set_grants(&self, request: Request<pb::SetGrantsRequest>) -> Result<Response<pb::SetGrantsResponse>, Status> {
        let (auth, caller) = self.admin(&request)?;
        let r = request.into_inner();
        let grants = grants_from_wire(r.grants)?;
        let shown: Vec<String> = grants.iter().map(Grant::to_string).collect();
        auth.set_grants(&r.principal, grants).await?;
        caller.audit("grants set", "done", format!("principal {:?} holds: {}", r.principal, shown.join(", ")));
        Ok(Response::new(pb::SetGrantsResponse {}))
    }

    async fn list_grants(&self, request: Request<pb::ListGrantsRequest>) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let (auth, _) = self.admin(&request)?;
        let principals = auth
            .table()
            .principals
            .iter()
            .map(|(name, grants)| pb::PrincipalGrants { principal: name.clone(), grants: grants_to_wire(grants) })
            .collect();
        Ok(Response::new(pb::ListGrantsResponse { principals }))
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let caller = Caller::of(&request)?;
        Ok(Response::new(pb::WhoAmIResponse {
            name: caller.name,
            kind: caller.kind.as_str().into(),
            grants: grants_to_wire(&caller.grants),
        }))
    }
}

/// The `Tenants` service: forgetting a tenant and re-wrapping data keys.
pub struct TenantsApi {
    /// `None` when the node does not encrypt.
    keys: Option<Keys>,
}

impl TenantsApi {
    pub fn new(keys: Option<Keys>) -> Self {
        TenantsApi { keys }
    }

    fn keys(&self) -> Result<&Keys, Status> {
        self.keys.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this node does not encrypt tenants' events (no encryption section): there is no key to destroy or re-wrap",
            )
        })
    }
}

#[tonic::async_trait]
impl pb::tenants_server::Tenants for TenantsApi {
    async fn forget(&self, request: Request<pb::ForgetTenantRequest>) -> Result<Response<pb::ForgetTenantResponse>, Status> {
        let caller = Caller::of(&request)?;
        let tenant = request.into_inner().tenant;
        crate::security::auth::check_tenant(&tenant).map_err(Status::invalid_argument)?;
        caller.require(&tenant, Role::Admin)?;
        let had_key = self.keys()?.forget(&tenant).await?;
        caller.audit("tenant forgotten", "done", format!("tenant {tenant}{}", if had_key { "" } else { " (it had no data key yet)" }));
        Ok(Response::new(pb::ForgetTenantResponse { had_key }))
    }

    async fn rewrap_keys(&self, request: Request<pb::RewrapKeysRequest>) -> Result<Response<pb::RewrapKeysResponse>, Status> {
        let caller = Caller::of(&request)?;
        caller.require("", Role::ClusterAdmin)?;
        let rewrapped = self.keys()?.rewrap().await?;
        caller.audit("data keys re-wrapped", "done", format!("{rewrapped} data keys re-wrapped with the current key-encryption key"));
        Ok(Response::new(pb::RewrapKeysResponse { rewrapped: rewrapped as u32 }))
    }
}
