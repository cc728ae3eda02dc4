//! `anthill specs [PATH]`: runs spec files and reports failures with a readable diff, or with
//! `--perf` measures specs per second. Reports go to stdout (`--json` for machines), progress to
//! stderr. Without PATH it runs the specs built into the binary (`node/specs/`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use super::runner::{self, Runnable};
use super::{BUILTIN, SpecResult, read_files};

#[derive(Args)]
pub struct SpecsArgs {
    /// A spec file or a directory of them (searched recursively for *.yaml). Default: the
    /// specs built into this binary.
    path: Option<PathBuf>,
    /// Measure specs per second instead: run the suite over and over.
    #[arg(long)]
    perf: bool,
    /// How long --perf runs.
    #[arg(long, default_value_t = 10, requires = "perf")]
    seconds: u64,
    /// Threads --perf runs on (one LMDB sandbox each). Default: one per core.
    #[arg(long, requires = "perf")]
    threads: Option<usize>,
    #[arg(long)]
    json: bool,
}

pub fn run(args: SpecsArgs) -> anyhow::Result<()> {
    let files = match &args.path {
        Some(path) => read_files(path)?,
        None => BUILTIN.iter().map(|(path, text)| (format!("builtin:{path}"), text.to_string())).collect(),
    };
    let specs = runner::load(&files)?;
    if specs.is_empty() {
        bail!("the spec files hold no specs");
    }
    if args.perf {
        return perf(&args, &specs);
    }
    let results = runner::run_all(&specs).context("cannot open the specs' LMDB sandbox")?;
    let failed = results.iter().filter(|r| !r.passed).count();
    if args.json {
        let report = serde_json::json!({"specs": results.len(), "passed": results.len() - failed, "failed": failed, "results": results});
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for result in results.iter().filter(|r| !r.passed) {
            print!("{}", describe_failure(result));
        }
        println!("{} specs: {} passed, {failed} failed", results.len(), results.len() - failed);
    }
    if failed > 0 {
        bail!("{failed} of {} specs failed", results.len());
    }
    Ok(())
}

/// A failure for people: the spec, each difference, then expected and actual side by side.
pub fn describe_failure(result: &SpecResult) -> String {
    let mut out = format!("FAIL {}: {}\n", result.file, result.name);
    for line in &result.differences {
        out.push_str(&format!("  - {line}\n"));
    }
    let block = |title: &str, value: &Option<serde_json::Value>| {
        let yaml = value.as_ref().map(|v| serde_yaml::to_string(v).unwrap_or_else(|e| format!("<{e}>\n"))).unwrap_or_default();
        let body: String = yaml.lines().map(|line| format!("      {line}\n")).collect();
        format!("    {title}:\n{body}")
    };
    out.push_str(&block("expected", &result.expected));
    out.push_str(&block("actual", &result.actual));
    out
}

fn perf(args: &SpecsArgs, specs: &[Box<dyn Runnable>]) -> anyhow::Result<()> {
    if args.seconds == 0 || args.seconds > 3_600 {
        bail!("--seconds: must be 1 to 3600, got {}", args.seconds);
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || threads > 256 {
        bail!("--threads: must be 1 to 256, got {threads}");
    }
    eprintln!("running {} specs over and over on {threads} threads for {} s", specs.len(), args.seconds);
    let progress = |runs: u64, elapsed: Duration| {
        eprintln!("  {:>5.1} s: {runs} specs run, {:.0} specs/s so far", elapsed.as_secs_f64(), runs as f64 / elapsed.as_secs_f64());
    };
    let report = runner::measure(specs, threads, Duration::from_secs(args.seconds), &progress)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{:.0} specs/s: {} specs run in {:.1} s on {} threads (a suite of {} specs, {} failed runs)",
            report.specs_per_second, report.specs_run, report.seconds, report.threads, report.specs_in_suite, report.failures
        );
    }
    if report.failures > 0 {
        bail!("{} spec runs failed during the measurement; run `anthill specs` to see which", report.failures);
    }
    Ok(())
}
