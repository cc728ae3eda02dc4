//! What a chaos run's history looks like over time: per second, the operations acknowledged and
//! the p99 latency of those acknowledged, and the picture of both with the faults marked on it
//! (an SVG file written next to the report).

use std::fmt::Write as _;

use super::history::{Outcome, Record};
use super::nemesis::{Fault, FaultKind};

/// One second of the run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Second {
    /// Seconds since the run began (operations completed in `[second, second + 1)`).
    pub second: u64,
    pub acknowledged: u64,
    pub failed: u64,
    pub unknown: u64,
    /// The p99 latency of the operations acknowledged in this second (none: no acknowledgement).
    pub p99_ms: Option<u64>,
}

/// The history per second of completion, from the first second to the last.
pub fn per_second(history: &[Record]) -> Vec<Second> {
    let Some(last) = history.iter().map(|r| r.completed_ms / 1000).max() else { return Vec::new() };
    let mut seconds: Vec<(Second, Vec<u64>)> =
        (0..=last).map(|second| (Second { second, acknowledged: 0, failed: 0, unknown: 0, p99_ms: None }, Vec::new())).collect();
    for r in history {
        let (second, latencies) = &mut seconds[(r.completed_ms / 1000) as usize];
        match r.outcome {
            Outcome::Ok => {
                second.acknowledged += 1;
                latencies.push(r.completed_ms - r.invoked_ms);
            }
            Outcome::Fail => second.failed += 1,
            Outcome::Unknown => second.unknown += 1,
        }
    }
    seconds
        .into_iter()
        .map(|(mut second, mut latencies)| {
            second.p99_ms = percentile(&mut latencies, 0.99);
            second
        })
        .collect()
}

/// The `q` quantile (nearest rank) of `values`; `None` when empty.
pub fn percentile(values: &mut [u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    Some(values[rank - 1])
}

/// Acknowledged operations per second completed in `[from_ms, to_ms)`.
pub fn throughput(history: &[Record], from_ms: u64, to_ms: u64) -> f64 {
    if to_ms <= from_ms {
        return 0.0;
    }
    let acknowledged = history.iter().filter(|r| r.outcome == Outcome::Ok && (from_ms..to_ms).contains(&r.completed_ms)).count();
    acknowledged as f64 * 1000.0 / (to_ms - from_ms) as f64
}

fn colour(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::KillLeader => "#d62728",
        FaultKind::KillNode => "#ff7f0e",
        FaultKind::Pause => "#9467bd",
        FaultKind::Isolate => "#1f77b4",
        FaultKind::OneWay => "#17becf",
        FaultKind::Split => "#2ca02c",
        FaultKind::RollingRestart => "#8c564b",
        FaultKind::KillConsul => "#e377c2",
    }
}

const WIDTH: f64 = 1000.0;
const PLOT_LEFT: f64 = 70.0;
const PLOT_RIGHT: f64 = 980.0;
const PANEL_HEIGHT: f64 = 160.0;
const THROUGHPUT_TOP: f64 = 40.0;
const LATENCY_TOP: f64 = 250.0;

/// The picture: throughput (top) and p99 latency (bottom) per second, each fault a shaded band
/// from its start to its heal in its kind's colour, and a legend.
pub fn svg(title: &str, seconds: &[Second], faults: &[Fault]) -> String {
    let span_s = seconds.len().max(1) as f64;
    let x = |second_f: f64| PLOT_LEFT + (PLOT_RIGHT - PLOT_LEFT) * second_f / span_s;
    let max_ops = seconds.iter().map(|s| s.acknowledged).max().unwrap_or(0).max(1) as f64;
    let max_p99 = seconds.iter().filter_map(|s| s.p99_ms).max().unwrap_or(0).max(1) as f64;
    let mut out = String::new();
    let height = LATENCY_TOP + PANEL_HEIGHT + 70.0;
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(out, r#"<text x="{PLOT_LEFT}" y="20" font-size="14">{}</text>"#, escape(title));
    for fault in faults {
        let (from, to) = (x(fault.at_ms as f64 / 1000.0), x(fault.healed_ms as f64 / 1000.0));
        for top in [THROUGHPUT_TOP, LATENCY_TOP] {
            let _ = writeln!(
                out,
                r#"<rect x="{from:.1}" y="{top}" width="{:.1}" height="{PANEL_HEIGHT}" fill="{}" fill-opacity="0.25"><title>{}: {}</title></rect>"#,
                (to - from).max(1.5),
                colour(fault.kind),
                fault.kind.name(),
                escape(&fault.target)
            );
        }
    }
    panel(&mut out, THROUGHPUT_TOP, "acknowledged / s", max_ops, seconds.iter().map(|s| Some(s.acknowledged)), &x);
    panel(&mut out, LATENCY_TOP, "p99 latency (ms)", max_p99, seconds.iter().map(|s| s.p99_ms), &x);
    let axis_y = LATENCY_TOP + PANEL_HEIGHT + 16.0;
    let _ = writeln!(out, r#"<text x="{PLOT_LEFT}" y="{axis_y}">0 s</text>"#);
    let _ = writeln!(out, r#"<text x="{PLOT_RIGHT}" y="{axis_y}" text-anchor="end">{} s</text>"#, seconds.len());
    let mut legend_x = PLOT_LEFT;
    let legend_y = axis_y + 26.0;
    for kind in FaultKind::ALL.into_iter().filter(|k| faults.iter().any(|f| f.kind == *k)) {
        let _ = writeln!(
            out,
            r#"<rect x="{legend_x}" y="{}" width="12" height="12" fill="{}" fill-opacity="0.5"/><text x="{}" y="{legend_y}">{}</text>"#,
            legend_y - 10.0,
            colour(kind),
            legend_x + 16.0,
            kind.name()
        );
        legend_x += 130.0;
    }
    out.push_str("</svg>\n");
    out
}

/// One panel: its frame, its label and scale, and the line through `values` (a gap where a
/// value is missing).
fn panel(out: &mut String, top: f64, label: &str, max: f64, values: impl Iterator<Item = Option<u64>>, x: &dyn Fn(f64) -> f64) {
    let bottom = top + PANEL_HEIGHT;
    let _ = writeln!(
        out,
        r##"<rect x="{PLOT_LEFT}" y="{top}" width="{}" height="{PANEL_HEIGHT}" fill="none" stroke="#888"/>"##,
        PLOT_RIGHT - PLOT_LEFT
    );
    let _ = writeln!(out, r#"<text x="{PLOT_LEFT}" y="{}">{label}</text>"#, top - 6.0);
    let _ = writeln!(out, r#"<text x="{}" y="{}" text-anchor="end">{max}</text>"#, PLOT_LEFT - 6.0, top + 10.0);
    let _ = writeln!(out, r#"<text x="{}" y="{bottom}" text-anchor="end">0</text>"#, PLOT_LEFT - 6.0);
    let mut segment: Vec<String> = Vec::new();
    let mut flush = |segment: &mut Vec<String>| {
        if !segment.is_empty() {
            let _ = writeln!(out, r##"<polyline fill="none" stroke="#222" stroke-width="1.2" points="{}"/>"##, segment.join(" "));
            segment.clear();
        }
    };
    for (second, value) in values.enumerate() {
        match value {
            Some(v) => segment.push(format!("{:.1},{:.1}", x(second as f64 + 0.5), bottom - PANEL_HEIGHT * (v as f64 / max))),
            None => flush(&mut segment),
        }
    }
    flush(&mut segment);
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::history::OpKind;

    fn record(invoked_ms: u64, completed_ms: u64, outcome: Outcome) -> Record {
        Record { id: invoked_ms, kind: OpKind::Append, value: String::new(), partition: 0, invoked_ms, completed_ms, outcome }
    }

    #[test]
    fn each_second_counts_what_completed_in_it_and_the_p99_of_its_acknowledgements() {
        let mut history: Vec<Record> = (0..100).map(|i| record(i * 9, i * 9 + 1 + i / 99 * 500, Outcome::Ok)).collect();
        history.push(record(1_500, 2_200, Outcome::Unknown));
        history.push(record(2_500, 2_600, Outcome::Fail));
        let seconds = per_second(&history);
        assert_eq!(seconds.len(), 3);
        // 0..891 ms: 99 acknowledgements of 1 ms, and one of 501 ms that completes at 1,392 ms.
        assert_eq!((seconds[0].acknowledged, seconds[0].p99_ms), (99, Some(1)));
        assert_eq!((seconds[1].acknowledged, seconds[1].p99_ms), (1, Some(501)));
        assert_eq!((seconds[2].acknowledged, seconds[2].unknown, seconds[2].failed, seconds[2].p99_ms), (0, 1, 1, None));
        assert_eq!(throughput(&history, 0, 1_000), 99.0);
    }

    #[test]
    fn the_picture_marks_every_fault_and_draws_both_lines() {
        let history: Vec<Record> = (0..30).map(|i| record(i * 100, i * 100 + 3, Outcome::Ok)).collect();
        let faults = [
            Fault { kind: FaultKind::KillLeader, target: "node-1 <leads 0>".into(), at_ms: 500, healed_ms: 1_500, partitions: vec![0] },
            Fault { kind: FaultKind::Split, target: "node-2".into(), at_ms: 2_000, healed_ms: 2_500, partitions: vec![] },
        ];
        let picture = svg("seed 1", &per_second(&history), &faults);
        assert_eq!(picture.matches("<polyline").count(), 2);
        assert_eq!(picture.matches("<title>kill-leader").count(), 2);
        assert_eq!(picture.matches("<title>split").count(), 2);
        assert!(picture.contains("&lt;leads 0&gt;") && !picture.contains("<leads"));
        assert!(picture.starts_with("<svg") && picture.trim_end().ends_with("</svg>"));
    }
}
