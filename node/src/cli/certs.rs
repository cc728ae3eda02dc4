//! `anthill certs`: a development CA and the node and client certificates it signs, for local
//! clusters, the demo and the labs ([`crate::security::certs`] says what each holds). Existing
//! files are never replaced, except by `renew` (new keys for certificates near their end);
//! `--json` prints what was written.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::security::certs::{self, Kind, Written};

#[derive(Args)]
pub(crate) struct CertsArgs {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Make a CA: `DIR/ca.crt` and `DIR/ca.key`.
    Ca {
        #[command(flatten)]
        common: Common,
        /// The CA's common name.
        #[arg(long, default_value = "Anthill development CA")]
        name: String,
    },
    /// A node's certificate, signed by `DIR/ca.*`: `DIR/NAME.crt` and `DIR/NAME.key`.
    Node {
        /// The node's `node_id` (peers check that its certificate names it).
        name: String,
        /// Another name or address clients reach it by (repeat it).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// A client's certificate, signed by `DIR/ca.*`: `DIR/NAME.crt` and `DIR/NAME.key`.
    Client {
        /// Who the client is (the certificate's common name).
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Renew the node and client certificates in DIR that expire within --within-days (or
    /// have): new keys, same names, signed by `DIR/ca.*`, in place of the old files. Nodes
    /// reload changed files without a restart.
    Renew {
        /// Renew what expires within this many days.
        #[arg(long, default_value_t = 30)]
        within_days: u32,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args)]
struct Common {
    /// Directory of the CA and the certificates (made if missing).
    #[arg(long, default_value = "anthill-certs")]
    dir: PathBuf,
    /// Days the certificate is valid (default: 3650 for a CA, 365 otherwise).
    #[arg(long)]
    days: Option<u32>,
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: CertsArgs) -> anyhow::Result<()> {
    let (kind, name, common) = match args.what {
        What::Renew { within_days, common } => return renew(within_days, common),
        What::Ca { common, name } => (Kind::Ca, name, common),
        What::Node { name, hosts, common } => (Kind::Node { hosts }, name, common),
        What::Client { name, common } => (Kind::Client, name, common),
    };
    let (label, days, stem) = match &kind {
        Kind::Ca => ("ca", common.days.unwrap_or(3650), "ca".to_string()),
        Kind::Node { .. } => ("node", common.days.unwrap_or(365), name.clone()),
        Kind::Client => ("client", common.days.unwrap_or(365), name.clone()),
    };
    if stem.contains('/') || stem.starts_with('.') || stem == "ca" && !matches!(kind, Kind::Ca) {
        anyhow::bail!("{name:?} cannot be a file name here (no '/', no leading '.', not \"ca\")");
    }
    let ca = match kind {
        Kind::Ca => None,
        _ => Some(
            certs::read_ca(&common.dir)
                .map_err(|e| anyhow::anyhow!("{e} (make the CA first: anthill certs ca --dir {})", common.dir.display()))?,
        ),
    };
    let issued = certs::issue(&kind, &name, days, ca.as_ref())?;
    let (cert_file, key_file) = certs::write(&common.dir, &stem, &issued)?;
    let written = Written { kind: label, name, cert_file, key_file, not_after: certs::not_after(&issued.cert_pem) };
    if common.json {
        println!("{}", serde_json::to_string_pretty(&written)?);
    } else {
        println!(
            "{} certificate {:?}: {} and {} (valid until {})",
            written.kind,
            written.name,
            written.cert_file.display(),
            written.key_file.display(),
            written.not_after
        );
    }
    Ok(())
}

fn renew(within_days: u32, common: Common) -> anyhow::Result<()> {
    let report = certs::renew(&common.dir, within_days, common.days.unwrap_or(365))?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for r in &report {
        let done = if r.renewed { "renewed" } else { "kept" };
        println!("{done} {} certificate {:?}: {} (valid until {})", r.kind, r.name, r.cert_file.display(), r.not_after);
    }
    if report.is_empty() {
        println!("no node or client certificate in {}", common.dir.display());
    }
    Ok(())
}
