//! The harness's results: per-run measures, summarised into rows, printed
//! as a Markdown table, written as JSON (schema `veil-bench/1`, described in
//! docs/benchmarks.md) and drawn as SVG charts.

use super::harness::Job;
use super::sample::Counters;
use super::stats::{ratio, Summary};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const SCHEMA: &str = "veil-bench/1";

/// One case of one run on one peer.
#[derive(Clone, Debug, PartialEq)]
pub struct Measure {
    pub case: String,
    /// ms for boot, MiB for RSS, MB/s for throughput, ms or ns/page for ESM.
    pub value: f64,
    pub requests: u64,
    pub exits: Option<u64>,
    pub vmm_ns: u64,
    pub vcpu_ns: u64,
}

impl Measure {
    /// `value` with the counters between `begin` and `end`.
    pub fn new(case: &str, value: f64, requests: u64, end: &Counters, begin: &Counters) -> Measure {
        Measure {
            case: case.to_string(),
            value,
            requests,
            exits: match (end.exits, begin.exits) {
                (Some(e), Some(b)) => Some(e.saturating_sub(b)),
                (Some(e), None) if begin == &Counters::default() => Some(e),
                _ => None,
            },
            vmm_ns: end.vmm_ns.saturating_sub(begin.vmm_ns),
            vcpu_ns: end.vcpu_ns.saturating_sub(begin.vcpu_ns),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SizesJson {
    pub mib: u64,
    pub qd: u32,
    pub frames: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub kernel: String,
    pub cpus: usize,
    /// Exits came from KVM's debugfs (else from veil's own counters).
    pub kvm_debugfs: bool,
    pub qemu: Option<String>,
}

impl Host {
    pub fn here(kvm_debugfs: bool, qemu: Option<String>) -> Host {
        Host {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            kvm_debugfs,
            qemu,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// The peer cannot run this case (`reason` says why).
    NotApplicable,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerResult {
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    pub value: Option<Summary>,
    /// Requests per run (the guest's count; 1 for boot).
    pub requests: Option<u64>,
    pub exits_per_request: Option<Summary>,
    pub vmm_cpu_us_per_request: Option<Summary>,
    pub vcpu_cpu_us_per_request: Option<Summary>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub group: String,
    pub job: String,
    pub case: String,
    pub transport: String,
    pub setup: String,
    pub unit: String,
    pub higher_is_better: bool,
    /// By peer name ("veil", "qemu").
    pub results: BTreeMap<String, PeerResult>,
    /// veil's median over the peer's, when both ran.
    pub ratio_veil_to_peer: Option<f64>,
    /// veil's median over veil's on the same case in bypass (DMA setups).
    pub ratio_to_bypass: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub command: String,
    pub runs: u32,
    pub peers: Vec<String>,
    pub sizes: SizesJson,
    pub host: Host,
    pub rows: Vec<Row>,
}

fn unit_of(case: &str) -> (&'static str, bool) {
    match case {
        "first-serial-line" | "esm-ms" | "touch-ram" | "whole-process" => ("ms", false),
        "rss-at-first-line" => ("MiB", false),
        c if c.ends_with("-ns-per-page") => ("ns/page", false),
        _ => ("MB/s", true),
    }
}

fn peer_result(runs: &[Vec<Measure>], case: &str) -> Result<PeerResult, String> {
    let ms: Vec<&Measure> = runs.iter().filter_map(|r| r.iter().find(|m| m.case == case)).collect();
    if ms.len() != runs.len() {
        return Err(format!(
            "case {case} is missing from {} of {} runs",
            runs.len() - ms.len(),
            runs.len()
        ));
    }
    let per = |f: &dyn Fn(&Measure) -> Option<f64>| -> Option<Summary> {
        let v: Option<Vec<f64>> = ms.iter().map(|m| f(m)).collect();
        Summary::of(&v?)
    };
    let req = |m: &Measure| m.requests.max(1) as f64;
    Ok(PeerResult {
        status: Status::Ok,
        reason: None,
        value: per(&|m| Some(m.value)),
        requests: ms.first().map(|m| m.requests),
        exits_per_request: per(&|m| m.exits.map(|e| e as f64 / req(m))),
        vmm_cpu_us_per_request: per(&|m| Some(m.vmm_ns as f64 / 1e3 / req(m))),
        vcpu_cpu_us_per_request: per(&|m| Some(m.vcpu_ns as f64 / 1e3 / req(m))),
    })
}

type Unsupported<'a> = dyn Fn(usize, &str) -> Option<String> + 'a;

/// Rows from every run's measures: one per job and guest case, in run order.
pub fn rows(
    jobs: &[Job],
    peers: &[&'static str],
    got: &HashMap<(usize, &'static str), Vec<Vec<Measure>>>,
    unsupported: &Unsupported,
) -> Result<Vec<Row>, String> {
    let mut rows: Vec<Row> = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let veil_runs = got
            .get(&(j, "veil"))
            .ok_or_else(|| format!("bench {}: no runs on veil", job.name))?;
        let cases: Vec<String> = veil_runs[0].iter().map(|m| m.case.clone()).collect();
        for case in cases {
            let mut results = BTreeMap::new();
            for &peer in peers {
                let r = match unsupported(j, peer) {
                    Some(why) => PeerResult {
                        status: Status::NotApplicable,
                        reason: Some(why),
                        value: None,
                        requests: None,
                        exits_per_request: None,
                        vmm_cpu_us_per_request: None,
                        vcpu_cpu_us_per_request: None,
                    },
                    None => {
                        let runs = got
                            .get(&(j, peer))
                            .ok_or_else(|| format!("bench {} on {peer}: no runs", job.name))?;
                        peer_result(runs, &case).map_err(|e| format!("bench {} on {peer}: {e}", job.name))?
                    }
                };
                results.insert(peer.to_string(), r);
            }
            let median = |p: &str| results.get(p).and_then(|r| r.value.as_ref()).map(|s| s.median);
            let ratio_veil_to_peer = peers
                .iter()
                .find(|&&p| p != "veil")
                .and_then(|&p| Some((median("veil")?, median(p)?)))
                .and_then(|(a, b)| ratio(a, b));
            let (unit, higher) = unit_of(&case);
            rows.push(Row {
                group: job.group.to_string(),
                job: job.name.clone(),
                case,
                transport: job.transport.to_string(),
                setup: job.setup.to_string(),
                unit: unit.to_string(),
                higher_is_better: higher,
                results,
                ratio_veil_to_peer,
                ratio_to_bypass: None,
            });
        }
    }
    // DMA and secure setups against bypass on the same case and transport.
    let bypass: Vec<(String, String, f64)> = rows
        .iter()
        .filter(|r| r.setup == "bypass")
        .filter_map(|r| {
            Some((
                r.case.clone(),
                r.transport.clone(),
                r.results.get("veil")?.value.as_ref()?.median,
            ))
        })
        .collect();
    for r in rows
        .iter_mut()
        .filter(|r| r.group == "dma" || (r.group == "secure" && r.unit == "MB/s"))
    {
        let Some(v) = r.results.get("veil").and_then(|x| x.value.as_ref()).map(|s| s.median) else {
            continue;
        };
        if let Some((_, _, b)) = bypass.iter().find(|(c, t, _)| *c == r.case && *t == r.transport) {
            r.ratio_to_bypass = ratio(v, *b);
        }
    }
    Ok(rows)
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Picks one figure of a peer's result.
type Pick = dyn Fn(&PeerResult) -> Option<&Summary>;

fn cell(r: Option<&PeerResult>, f: &Pick, spread: bool) -> String {
    match r {
        None => "–".into(),
        Some(r) if r.status == Status::NotApplicable => "n/a".into(),
        Some(r) => match f(r) {
            None => "n/a".into(),
            Some(s) if spread => format!("{} ({}–{})", fmt_num(s.median), fmt_num(s.min), fmt_num(s.max)),
            Some(s) => fmt_num(s.median),
        },
    }
}

/// The Markdown table (and the notes for cases a peer could not run).
pub fn markdown(report: &Report) -> String {
    let mut out = format!(
        "veil bench: {} runs per case, median (min–max); {} MiB per block case, qd {}, {} frames per net case\n\n",
        report.runs, report.sizes.mib, report.sizes.qd, report.sizes.frames
    );
    let peers = &report.peers;
    let others: Vec<&String> = peers.iter().filter(|p| *p != "veil").collect();
    let mut head = String::from("| case | transport | setup | unit |");
    let mut rule = String::from("| --- | --- | --- | --- |");
    for p in peers {
        head += &format!(" {p} |");
        rule += " ---: |";
    }
    for p in &others {
        head += &format!(" veil/{p} |");
        rule += " ---: |";
    }
    head += " vs bypass |";
    rule += " ---: |";
    for what in ["exits/req", "VMM CPU µs/req", "vCPU CPU µs/req"] {
        for p in peers {
            head += &format!(" {what} {p} |");
            rule += " ---: |";
        }
    }
    out += &format!("{head}\n{rule}\n");
    let mut notes: Vec<String> = Vec::new();
    for row in &report.rows {
        let mut line = format!("| {} | {} | {} | {} |", row.case, row.transport, row.setup, row.unit);
        for p in peers {
            line += &format!(" {} |", cell(row.results.get(p), &|r| r.value.as_ref(), true));
            if let Some(PeerResult { reason: Some(why), .. }) = row.results.get(p) {
                let note = format!("{p} n/a for {}: {why}", row.job);
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
        }
        for _ in &others {
            line += &format!(
                " {} |",
                row.ratio_veil_to_peer.map(|r| format!("{r:.2}")).unwrap_or("–".into())
            );
        }
        line += &format!(
            " {} |",
            row.ratio_to_bypass.map(|r| format!("{r:.2}")).unwrap_or("–".into())
        );
        let per: [&Pick; 3] = [
            &|r| r.exits_per_request.as_ref(),
            &|r| r.vmm_cpu_us_per_request.as_ref(),
            &|r| r.vcpu_cpu_us_per_request.as_ref(),
        ];
        for f in per {
            for p in peers {
                line += &format!(" {} |", cell(row.results.get(p), f, false));
            }
        }
        out += &line;
        out.push('\n');
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out += &format!("- {n}\n");
        }
    }
    out
}

/// Medians (veil) of block cases per DMA setup, in setup order.
fn dma_series(report: &Report, pick: &dyn Fn(&Row) -> Option<f64>) -> (Vec<String>, Vec<(String, Vec<f64>)>) {
    let dma_rows: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.unit == "MB/s" && r.transport == "pci" && r.case.starts_with("blk-"))
        .filter(|r| r.group == "dma" || r.group == "secure" || r.setup == "bypass")
        .collect();
    let mut setups: Vec<String> = Vec::new();
    let mut cases: Vec<String> = Vec::new();
    for r in &dma_rows {
        if !setups.contains(&r.setup) {
            setups.push(r.setup.clone());
        }
        if !cases.contains(&r.case) {
            cases.push(r.case.clone());
        }
    }
    let series = cases
        .into_iter()
        .map(|c| {
            let v = setups
                .iter()
                .map(|s| {
                    dma_rows
                        .iter()
                        .find(|r| r.case == c && &r.setup == s)
                        .and_then(|r| pick(r))
                        .unwrap_or(0.0)
                })
                .collect();
            (c, v)
        })
        .collect();
    (setups, series)
}

fn bar_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    setups: &[String],
    series: &[(String, Vec<f64>)],
    one_line: bool,
) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(if one_line { 1.1 } else { 1.0 })
        * 1.15;
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let n = setups.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(|e| err(&e))?;
    let names = setups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(|e| err(&e))?;
    let width = 0.8 / series.len().max(1) as f64;
    for (k, (case, values)) in series.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(values.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 + 0.1 + k as f64 * width;
                Rectangle::new([(x0, 0.0), (x0 + width * 0.9, *v)], color.filled())
            }))
            .map_err(|e| err(&e))?
            .label(case.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    if one_line {
        chart
            .draw_series(LineSeries::new([(0.0, 1.0), (n as f64, 1.0)], BLACK.stroke_width(1)))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The SVG charts: block throughput per DMA setup, and its ratio to bypass;
/// with a peer, the veil/peer ratio per case. Returns the files written.
pub fn plot(report: &Report, dir: &Path) -> Result<Vec<std::path::PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    let (setups, tput) = dma_series(report, &|r| r.results.get("veil")?.value.as_ref().map(|s| s.median));
    if setups.len() > 1 {
        let p = dir.join("dma-throughput.svg");
        bar_chart(
            &p,
            "veil: virtio-blk (PCI) throughput per DMA setup, median",
            "MB/s",
            &setups,
            &tput,
            false,
        )?;
        written.push(p);
        let (setups, ratios) = dma_series(report, &|r| {
            if r.setup == "bypass" {
                Some(1.0)
            } else {
                r.ratio_to_bypass
            }
        });
        let p = dir.join("dma-ratio.svg");
        bar_chart(
            &p,
            "veil: throughput relative to bypass (1.0 = bypass)",
            "ratio to bypass",
            &setups,
            &ratios,
            true,
        )?;
        written.push(p);
    }
    if let Some(peer) = report.peers.iter().find(|p| *p != "veil") {
        let rows: Vec<&Row> = report
            .rows
            .iter()
            .filter(|r| r.ratio_veil_to_peer.is_some() && r.group != "dma")
            .collect();
        if !rows.is_empty() {
            let labels: Vec<String> = rows.iter().map(|r| format!("{} {}", r.case, r.transport)).collect();
            let values: Vec<f64> = rows.iter().map(|r| r.ratio_veil_to_peer.unwrap_or(0.0)).collect();
            let p = dir.join("peer-ratio.svg");
            bar_chart(
                &p,
                &format!("veil / {peer}, median (higher is better for MB/s, lower for ms and MiB)"),
                "ratio",
                &labels,
                &[(format!("veil/{peer}"), values)],
                true,
            )?;
            written.push(p);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::harness::jobs;

    fn m(case: &str, value: f64, requests: u64, exits: Option<u64>) -> Measure {
        Measure {
            case: case.into(),
            value,
            requests,
            exits,
            vmm_ns: 2_000 * requests,
            vcpu_ns: 10_000 * requests,
        }
    }

    fn report(rows: Vec<Row>) -> Report {
        Report {
            schema: SCHEMA.into(),
            command: "veil bench all".into(),
            runs: 3,
            peers: vec!["veil".into(), "qemu".into()],
            sizes: SizesJson {
                mib: 8,
                qd: 1,
                frames: 100,
            },
            host: Host::here(false, None),
            rows,
        }
    }

    #[test]
    fn rows_medians_ratios_and_json_round_trip() {
        let jobs = jobs(&["dma".into(), "secure".into()], &[]);
        assert_eq!(jobs[0].name, "blk-pci");
        let mut got = HashMap::new();
        let case = "blk-seqread-64k";
        got.insert(
            (0, "veil"),
            vec![
                vec![m(case, 100.0, 10, Some(20))],
                vec![m(case, 300.0, 10, Some(40))],
                vec![m(case, 200.0, 10, Some(30))],
            ],
        );
        got.insert((0, "qemu"), vec![vec![m(case, 400.0, 10, None)]; 3]);
        got.insert((1, "veil"), vec![vec![m(case, 190.0, 10, Some(30))]; 3]);
        got.insert((1, "qemu"), vec![vec![m(case, 380.0, 10, None)]; 3]);
        let secure = jobs.iter().position(|j| j.group == "secure").unwrap();
        let used: Vec<&Job> = vec![&jobs[0], &jobs[1], &jobs[secure]];
        let used: Vec<Job> = used.into_iter().cloned().collect();
        got.insert((2, "veil"), vec![vec![m(case, 50.0, 10, Some(30))]; 3]);
        let unsupported = |j: usize, p: &str| (j == 2 && p == "qemu").then(|| "veil only".to_string());
        let rows = rows(&used, &["veil", "qemu"], &got, &unsupported).unwrap();
        assert_eq!(rows.len(), 3);
        let base = &rows[0];
        let v = base.results["veil"].value.as_ref().unwrap();
        assert_eq!((v.median, v.min, v.max, v.n), (200.0, 100.0, 300.0, 3));
        assert_eq!(base.ratio_veil_to_peer, Some(0.5));
        assert_eq!(base.results["veil"].exits_per_request.as_ref().unwrap().median, 3.0);
        assert_eq!(
            base.results["veil"].vmm_cpu_us_per_request.as_ref().unwrap().median,
            2.0
        );
        assert!(base.results["qemu"].exits_per_request.is_none());
        assert_eq!(rows[1].ratio_to_bypass, Some(0.95));
        assert_eq!(rows[2].ratio_to_bypass, Some(0.25));
        assert_eq!(rows[2].results["qemu"].status, Status::NotApplicable);
        assert_eq!(rows[2].ratio_veil_to_peer, None);

        let r = report(rows);
        let text = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["schema"], "veil-bench/1");
        assert_eq!(json["rows"][2]["results"]["qemu"]["status"], "not_applicable");
        assert_eq!(json["rows"][0]["results"]["veil"]["value"]["samples"][1], 300.0);

        let md = markdown(&r);
        assert!(
            md.contains("| blk-seqread-64k | pci | bypass | MB/s | 200 (100–300) | 400 (400–400) | 0.50 | – |"),
            "{md}"
        );
        assert!(md.contains("| n/a |"));
        assert!(md.contains("- qemu n/a for secure-bounce-pci: veil only"));

        let dir = std::env::temp_dir().join(format!("veil-plot-{}", std::process::id()));
        let files = plot(&r, &dir).unwrap();
        assert_eq!(files.len(), 3);
        let svg = std::fs::read_to_string(dir.join("dma-ratio.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("secure-bounce"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_case_missing_from_a_run_is_an_error_not_a_number() {
        let jobs = jobs(&["blk".into()], &[]);
        let mut got = HashMap::new();
        got.insert((0, "veil"), vec![vec![m("blk-seqread-64k", 1.0, 1, None)], vec![]]);
        got.insert((1, "veil"), vec![vec![m("blk-seqread-64k", 1.0, 1, None)]; 2]);
        let err = rows(&jobs, &["veil"], &got, &|_, _| None).unwrap_err();
        assert_eq!(
            err,
            "bench blk-mmio on veil: case blk-seqread-64k is missing from 1 of 2 runs"
        );
    }
}
