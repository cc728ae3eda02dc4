//! Who may reach the node and what they may do: TLS on the gRPC port and mutual TLS between
//! members ([`tls`]), the identity of callers and the gates every call passes ([`identity`]),
//! the development CA of `anthill certs` ([`certs`]), and the audit stream of admin actions and
//! refusals ([`audit`]). docs/security.md holds the threat model and how each piece is set up.

pub mod audit;
pub mod auth;
pub mod certs;
pub mod connections;
pub mod identity;
pub mod keys;
pub mod table;
pub mod tls;
