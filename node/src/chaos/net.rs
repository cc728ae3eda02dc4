//! The chaos run's network: a network namespace of its own, and partitions cut on its loopback.
//!
//! `anthill chaos` runs itself again in a new network namespace ([`rerun_in_own_namespace`]):
//! the nodes, on 127.0.0.{11+i}, and the clients, on 127.0.0.1, all live in it, and it vanishes
//! with the last of them, so nothing the run did to the network outlives it and no traffic can
//! reach any other address. Each node sends to its peers from its own address
//! (`coordination::transport::outgoing_address`), so a packet's source and destination say which
//! two nodes it goes between.
//!
//! [`Cuts`] drops packets by (source, destination) with `tc` on that loopback: an HTB root qdisc
//! whose default class passes everything, and a class whose queue holds nothing (`pfifo limit
//! 0`), so whatever a `u32` filter sends there is dropped. (This kernel has no `prio` qdisc and no
//! `drop` action, and no iptables is installed; HTB, pfifo and u32 are there.) A cut is one-way;
//! a partition cuts both ways. The clients' address is never cut: as in Jepsen, clients reach
//! every node, and a node cut off from its peers still answers them.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus};

use anyhow::{Context, bail};

/// Set in the environment of the run started in its own namespace.
pub const OWN_NAMESPACE_ENV: &str = "ANTHILL_CHAOS_OWN_NETNS";

/// Whether this process is the run started by [`rerun_in_own_namespace`].
pub fn in_own_namespace() -> bool {
    std::env::var_os(OWN_NAMESPACE_ENV).is_some()
}

/// Runs this program again with the same arguments in a new network namespace (module doc) and
/// returns how it exited. Needs root (CAP_SYS_ADMIN), as the tests on this project's machines have.
pub fn rerun_in_own_namespace() -> anyhow::Result<ExitStatus> {
    let exe = std::env::current_exe().context("cannot find this program to run it again")?;
    let mut command = Command::new(exe);
    command.args(std::env::args_os().skip(1));
    in_own_namespace_command(&mut command);
    command.status().map_err(|e| {
        if e.raw_os_error() == Some(libc::EPERM) {
            anyhow::anyhow!("anthill chaos needs root to make its own network namespace (for the partitions): {e}")
        } else {
            anyhow::anyhow!("cannot run anthill chaos in its own network namespace: {e}")
        }
    })
}

/// Makes `command` start in a new network namespace, with [`OWN_NAMESPACE_ENV`] set (so
/// [`in_own_namespace`] is true there) and SIGTERM sent to it if this process dies first. Starting
/// it needs root (CAP_SYS_ADMIN); without it, spawning fails with `EPERM`.
pub fn in_own_namespace_command(command: &mut Command) {
    command.env(OWN_NAMESPACE_ENV, "1");
    // SAFETY: between fork and exec only the async-signal-safe unshare(2) and prctl(2) run.
    unsafe {
        command.pre_exec(|| {
            if libc::unshare(libc::CLONE_NEWNET) != 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// In the run's own namespace: brings the loopback up (a new namespace starts with it down).
pub fn loopback_up() -> anyhow::Result<()> {
    ensure_own_namespace()?;
    run("ip", &["link", "set", "lo", "up"])
}

fn ensure_own_namespace() -> anyhow::Result<()> {
    if !in_own_namespace() {
        bail!("the chaos run touches the network only in its own namespace ({OWN_NAMESPACE_ENV} is not set)");
    }
    Ok(())
}

/// The one-way cuts in force (module doc).
#[derive(Debug, Default)]
pub struct Cuts {
    cut: BTreeSet<(Ipv4Addr, Ipv4Addr)>,
}

const DROP_CLASS: &str = "1:20";

impl Cuts {
    /// Installs the qdisc the cuts need on the namespace's loopback (none cut yet). Done before
    /// the load starts, so the steady state and the chaos run pay the same for it.
    pub fn install() -> anyhow::Result<Cuts> {
        ensure_own_namespace()?;
        run("tc", &["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10"])?;
        run("tc", &["class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", "100gbit", "quantum", "200000"])?;
        run("tc", &["class", "add", "dev", "lo", "parent", "1:", "classid", DROP_CLASS, "htb", "rate", "1mbit", "quantum", "1500"])?;
        run("tc", &["qdisc", "add", "dev", "lo", "parent", DROP_CLASS, "handle", "20:", "pfifo", "limit", "0"])?;
        Ok(Cuts::default())
    }

    /// Drops every packet from `from` to `to` until [`Cuts::heal`].
    pub fn cut(&mut self, from: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<()> {
        if from == to || !self.cut.insert((from, to)) {
            return Ok(());
        }
        let (src, dst) = (format!("{from}/32"), format!("{to}/32"));
        let filter = ["filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32"];
        let matches = ["match", "ip", "src", &src, "match", "ip", "dst", &dst, "classid", DROP_CLASS];
        run("tc", &[&filter[..], &matches[..]].concat())
    }

    /// Cuts every pair between `side` and `other`, both ways.
    pub fn partition(&mut self, side: &[Ipv4Addr], other: &[Ipv4Addr]) -> anyhow::Result<()> {
        for a in side {
            for b in other {
                self.cut(*a, *b)?;
                self.cut(*b, *a)?;
            }
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&mut self) -> anyhow::Result<()> {
        if self.cut.is_empty() {
            return Ok(());
        }
        // Forgotten only once removed: a failed removal is tried again by the next heal.
        run("tc", &["filter", "del", "dev", "lo", "parent", "1:", "prio", "1"])?;
        self.cut.clear();
        Ok(())
    }
}

/// Runs `program args`, failing with what it printed.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("cannot run {program} (the chaos run needs `ip` and `tc`: Debian's iproute2, which tests/e2e/tools/install.sh installs)")
    })?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
