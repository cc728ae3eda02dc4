//! A CPU quota for one process through the kernel's cgroup `cpu` controller: `anthill bench
//! --cluster N --cpu-per-node C` gives every node process the same C cores in the one-node and
//! the N-node runs, which is what a node per machine gives when machines are alike, on a machine
//! whose cores the nodes would otherwise share.
//!
//! cgroup v2 (`cpu.max`) when the unified hierarchy offers the `cpu` controller, else v1
//! (`cpu.cfs_quota_us`). Moving a process moves all its threads, and threads it starts later
//! join too. The group is removed when the quota is dropped (once its process is gone).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

const PERIOD_US: u64 = 100_000;

/// A process held to a CPU quota; dropping it removes the group (after the process ended).
pub struct CpuQuota {
    dir: PathBuf,
}

impl CpuQuota {
    /// Holds process `pid` to `cores` CPUs (e.g. 0.5: half of one core's time) in a group named
    /// after `name` and the pid.
    pub fn limit(pid: u32, cores: f64, name: &str) -> anyhow::Result<CpuQuota> {
        if !(cores.is_finite() && cores >= 0.01) {
            bail!("a CPU quota must be at least 0.01 cores, not {cores}");
        }
        let quota_us = (cores * PERIOD_US as f64).round() as u64;
        let group = format!("anthill-{name}-{pid}");
        let v2 = Path::new("/sys/fs/cgroup");
        let v2_cpu = std::fs::read_to_string(v2.join("cgroup.controllers")).is_ok_and(|c| c.split_whitespace().any(|c| c == "cpu"));
        let (dir, settings) = if v2_cpu {
            (v2.join(&group), vec![("cpu.max", format!("{quota_us} {PERIOD_US}"))])
        } else if Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() {
            let dir = Path::new("/sys/fs/cgroup/cpu").join(&group);
            (dir, vec![("cpu.cfs_period_us", PERIOD_US.to_string()), ("cpu.cfs_quota_us", quota_us.to_string())])
        } else {
            bail!(
                "a CPU quota needs the kernel's cgroup cpu controller (cgroup v2 with `cpu`, or v1 at /sys/fs/cgroup/cpu); neither is here"
            );
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the cgroup {} (root is needed)", dir.display()))?;
        let quota = CpuQuota { dir };
        for (file, value) in settings {
            std::fs::write(quota.dir.join(file), &value)
                .with_context(|| format!("cannot write {value} to {}", quota.dir.join(file).display()))?;
        }
        std::fs::write(quota.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("cannot move process {pid} into {}", quota.dir.display()))?;
        Ok(quota)
    }
}

impl Drop for CpuQuota {
    /// Moves any process still in the group back to the parent group (a benchmark that failed
    /// half-way drops its quotas before its nodes), then removes the group.
    fn drop(&mut self) {
        if let (Some(parent), Ok(procs)) = (self.dir.parent(), std::fs::read_to_string(self.dir.join("cgroup.procs"))) {
            for pid in procs.lines().filter(|l| !l.trim().is_empty()) {
                let _ = std::fs::write(parent.join("cgroup.procs"), pid.trim());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_below_a_hundredth_of_a_core_is_refused_with_its_value() {
        let e = CpuQuota::limit(std::process::id(), 0.0, "test").err().unwrap();
        assert!(e.to_string().contains("at least 0.01 cores, not 0"), "{e}");
    }

    #[test]
    fn a_process_held_to_a_fifth_of_a_core_gets_about_that_much_cpu() {
        // A child that spins; held to 0.2 cores for 1 s of wall time.
        let mut child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        let quota = CpuQuota::limit(child.id(), 0.2, "test").unwrap();
        // utime + stime of the process, in clock ticks (100 a second on Linux).
        let cpu = |pid: u32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
            (fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()) as f64 / 100.0
        };
        let (started, before) = (std::time::Instant::now(), cpu(child.id()));
        std::thread::sleep(std::time::Duration::from_secs(1));
        let used = cpu(child.id()) - before;
        let wall = started.elapsed().as_secs_f64();
        let dir = quota.dir.clone();
        // Dropped while its process still runs: the process leaves the group, the group goes.
        drop(quota);
        assert!(!dir.exists(), "{} is left behind", dir.display());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(used < 0.35 * wall && used > 0.05, "used {used:.3} s of CPU in {wall:.3} s of wall time, held to 0.2 cores");
    }
}
