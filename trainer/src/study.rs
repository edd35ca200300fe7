//! Studies: the paper's claims are about repeats and controls (§4, §5), so a study is a set of
//! arms (one manifest with overrides each) repeated over seeds, and what it measures is
//! aggregated across the runs: Figure 2 (the test accuracy of the best individual by
//! validation so far, over wall time and over compute, as mean and ±2σ per arm), Figure 3 (the
//! final accuracy of each run against an arm parameter), Figure 4 (a run's validation
//! accuracies over time, its interventions marked) and a table.
//!
//! The test set is touched only after evolution, and only for the individuals that were the
//! best by validation so far when they were born: their weights are kept after they die for
//! this (`kept`), and each result is recorded in the run's store, so measuring again reads it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::report::{self, ReportError, TestBench};
use population::individual::rank;
use population::store::{Change, Population};

#[derive(Debug, thiserror::Error)]
pub enum StudyError {
    #[error("study {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("study {path}, arm {arm}: {source}")]
    Arm {
        path: PathBuf,
        arm: String,
        source: crds::manifest::ManifestError,
    },
    #[error(transparent)]
    Report(#[from] Box<ReportError>),
    #[error(transparent)]
    Store(#[from] population::store::StoreError),
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// What a user writes: a base manifest, the arms that change it, and the seeds each arm
/// repeats over.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StudyFile {
    pub name: String,
    /// The manifest every arm starts from, relative to the study file.
    pub base: PathBuf,
    /// Evolution seeds; every arm runs once per seed. The validation split stays the base's
    /// (`spec.data.splitSeed`), so all runs are validated on the same images.
    #[serde(default = "one_seed")]
    pub seeds: Vec<u64>,
    /// Changes to the base's spec for every arm, as a JSON merge patch (RFC 7386).
    #[serde(default)]
    pub set: serde_json::Value,
    pub arms: Vec<ArmFile>,
    /// A spec field (dotted, e.g. `population` or `training.steps`) that Figure 3 plots the
    /// final accuracies against; without it, against the arms in order.
    #[serde(default)]
    pub parameter: Option<String>,
}

fn one_seed() -> Vec<u64> {
    vec![1]
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ArmFile {
    pub name: String,
    /// Changes to the study's spec for this arm, as a JSON merge patch.
    #[serde(default)]
    pub set: serde_json::Value,
    /// Existing stores (file:// or s3://) to aggregate as this arm's runs instead of running
    /// it.
    #[serde(default)]
    pub stores: Vec<String>,
}

/// One run of a study: an arm with a seed, and the store it lives in.
#[derive(Clone, Debug)]
pub struct PlannedRun {
    pub arm: String,
    pub seed: u64,
    /// The manifest to run (`None` for a store that is only aggregated).
    pub manifest: Option<serde_json::Value>,
    pub store: String,
    pub folder: PathBuf,
    pub parameter: Option<f64>,
}

/// RFC 7386: objects merge key by key, `null` removes, anything else replaces. A patch that
/// is `null` as a whole is an absent one (an arm without `set`) and changes nothing.
pub fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    if patch.is_null() {
        return;
    }
    merge_value(target, patch);
}

fn merge_value(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(Default::default());
    }
    let object = target.as_object_mut().expect("an object");
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_value(
                object.entry(key.clone()).or_insert(serde_json::Value::Null),
                value,
            );
        }
    }
}

fn names_are_keys(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl StudyFile {
    pub fn load(path: &Path) -> Result<Self, StudyError> {
        let invalid = |reason: String| StudyError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        let study: StudyFile = serde_norway::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if study.arms.is_empty() || study.seeds.is_empty() {
            return Err(invalid(
                "a study needs at least one arm and one seed".into(),
            ));
        }
        for name in std::iter::once(&study.name).chain(study.arms.iter().map(|a| &a.name)) {
            if !names_are_keys(name) {
                return Err(invalid(format!(
                    "{name:?}: names are letters, digits, '-' and '_'"
                )));
            }
        }
        Ok(study)
    }

    /// Every run of the study, each arm's manifest validated; runs live under `out/runs/`.
    pub fn plan(&self, path: &Path, out: &Path) -> Result<Vec<PlannedRun>, StudyError> {
        let base_path = path.parent().unwrap_or(Path::new(".")).join(&self.base);
        let text = std::fs::read_to_string(&base_path).map_err(|e| StudyError::Invalid {
            path: path.to_path_buf(),
            reason: format!("base manifest {}: {e}", base_path.display()),
        })?;
        let base: serde_json::Value =
            serde_norway::from_str(&text).map_err(|e| StudyError::Invalid {
                path: path.to_path_buf(),
                reason: format!("base manifest {}: {e}", base_path.display()),
            })?;
        let mut runs = Vec::new();
        for arm in &self.arms {
            if !arm.stores.is_empty() {
                for (i, store) in arm.stores.iter().enumerate() {
                    runs.push(PlannedRun {
                        arm: arm.name.clone(),
                        seed: i as u64,
                        manifest: None,
                        store: store.clone(),
                        folder: out.join("runs").join(&arm.name).join(format!("store-{i}")),
                        parameter: None,
                    });
                }
                continue;
            }
            for &seed in &self.seeds {
                let folder = out
                    .join("runs")
                    .join(&arm.name)
                    .join(format!("seed-{seed}"));
                let store = format!("file://{}", folder.join("store").display());
                let mut manifest = base.clone();
                let mut spec = manifest["spec"].take();
                merge_patch(&mut spec, &self.set);
                merge_patch(&mut spec, &arm.set);
                spec["seed"] = seed.into();
                spec["store"] = serde_json::json!({ "url": store });
                manifest["spec"] = spec;
                manifest["metadata"]["name"] = format!("{}-{}-{seed}", self.name, arm.name).into();
                let text = serde_json::to_string(&manifest).expect("serialisable");
                let parsed = crds::manifest::parse(&format!("{}", base_path.display()), &text)
                    .map_err(|source| StudyError::Arm {
                        path: path.to_path_buf(),
                        arm: arm.name.clone(),
                        source,
                    })?;
                let parameter = self.parameter.as_deref().and_then(|p| {
                    let value = serde_json::to_value(&*parsed.spec).ok()?;
                    p.split('.')
                        .try_fold(&value, |v, key| v.get(key))
                        .and_then(|v| v.as_f64())
                });
                runs.push(PlannedRun {
                    arm: arm.name.clone(),
                    seed,
                    manifest: Some(manifest),
                    store,
                    folder,
                    parameter,
                });
            }
        }
        Ok(runs)
    }
}

/// A best-by-validation-so-far individual of a run: when it was born, the compute spent up to
/// then, and its accuracies.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BestSoFar {
    pub id: String,
    pub seconds: f64,
    pub flops: f64,
    pub validation: f64,
    /// `None` when its weights are gone (a store written before they were kept).
    pub test: Option<f64>,
}

/// What one run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub arm: String,
    pub seed: u64,
    pub store: String,
    pub parameter: Option<f64>,
    pub individuals: usize,
    pub flops: f64,
    pub seconds: f64,
    pub best_so_far: Vec<BestSoFar>,
    /// Every individual as (seconds since the start, validation accuracy), for Figure 4.
    pub population: Vec<(f64, f64)>,
    /// Interventions as (seconds since the start, what).
    pub interventions: Vec<(f64, String)>,
}

impl RunResult {
    /// The final best by validation that has a test accuracy: the run's result (§3.7).
    pub fn last(&self) -> Option<&BestSoFar> {
        self.best_so_far.iter().rev().find(|b| b.test.is_some())
    }
}

/// Measures one run: every best-so-far individual on the test set (recording each result in
/// the run's store), and what the figures need.
pub async fn measure(
    population: &Population,
    run: &PlannedRun,
    data_dir: &Path,
    device: &candle_core::Device,
) -> Result<RunResult, StudyError> {
    let g = report::gather(population).await.map_err(Box::new)?;
    let start = g.record.created_at_ms;
    let seconds = |ms: u64| ms.saturating_sub(start) as f64 / 1000.0;
    let mut born: Vec<&population::individual::Individual> = g
        .individuals
        .iter()
        .filter(|i| i.outcome.failure.is_none())
        .collect();
    born.sort_by_key(|i| (i.born_at_ms, i.id.to_string()));
    let mut flops = 0.0;
    let mut best: Option<&population::individual::Individual> = None;
    let mut events = Vec::new();
    for i in &born {
        flops += i.outcome.flops;
        let better = best.is_none_or(|b| rank((i.fitness(), &i.id), (b.fitness(), &b.id)).is_gt());
        if better {
            best = Some(i);
            events.push((*i, flops));
        }
    }
    let bench: Option<Arc<TestBench>> = if events.is_empty() {
        None
    } else {
        Some(
            TestBench::load_async(&g.record.spec, data_dir, device)
                .await
                .map_err(Box::new)?,
        )
    };
    let mut best_so_far = Vec::new();
    for (individual, flops) in events {
        let test = match population.test_result(&individual.id).await? {
            Some(result) => Some(result.test_accuracy),
            None => match population.weights(&individual.id).await? {
                None => None,
                Some(weights) => {
                    let bench = bench.clone().expect("loaded when there are events");
                    let (id, dna) = (individual.id.clone(), individual.dna.clone());
                    let result =
                        tokio::task::spawn_blocking(move || bench.measure(&id, &dna, &weights))
                            .await
                            .map_err(|e| StudyError::Write {
                                path: data_dir.to_path_buf(),
                                message: e.to_string(),
                            })?;
                    match result {
                        Ok(result) => {
                            population.record_test_result(&result).await?;
                            Some(result.test_accuracy)
                        }
                        Err(e) => {
                            tracing::warn!(store = %run.store, id = %individual.id, error = %e,
                                "cannot measure a best-so-far individual; it is left out");
                            None
                        }
                    }
                }
            },
        };
        best_so_far.push(BestSoFar {
            id: individual.id.to_string(),
            seconds: seconds(individual.born_at_ms),
            flops,
            validation: individual.fitness(),
            test,
        });
    }
    let interventions = population
        .interventions()
        .await?
        .in_order()
        .into_iter()
        .map(|i| {
            let what = match i.change {
                Change::MutationRate { rate } => format!("rate {rate}"),
                Change::ResetWeights => "reset".to_string(),
            };
            (seconds(i.at_ms), what)
        })
        .collect();
    Ok(RunResult {
        arm: run.arm.clone(),
        seed: run.seed,
        store: run.store.clone(),
        parameter: run.parameter,
        individuals: born.len(),
        flops,
        seconds: born.last().map(|i| seconds(i.born_at_ms)).unwrap_or(0.0),
        best_so_far,
        population: born
            .iter()
            .map(|i| (seconds(i.born_at_ms), i.fitness()))
            .collect(),
        interventions,
    })
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    // The sample standard deviation: the runs are a sample of the arm's outcomes.
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Pearson's correlation of paired values; `None` below three pairs or without spread.
pub fn correlation(pairs: &[(f64, f64)]) -> Option<f64> {
    if pairs.len() < 3 {
        return None;
    }
    let (xs, ys): (Vec<f64>, Vec<f64>) = pairs.iter().copied().unzip();
    let (mx, sx) = mean_std(&xs);
    let (my, sy) = mean_std(&ys);
    if sx == 0.0 || sy == 0.0 {
        return None;
    }
    let n = pairs.len() as f64;
    let cov = pairs.iter().map(|(x, y)| (x - mx) * (y - my)).sum::<f64>() / (n - 1.0);
    Some(cov / (sx * sy))
}

/// One arm's row of the table.
#[derive(Clone, Debug, Serialize)]
pub struct ArmRow {
    pub arm: String,
    pub runs: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
    pub flops: f64,
    pub individuals: f64,
}

/// The table's rows, arms in the order given, and the validation–test correlation of the
/// runs' final bests across all runs.
pub fn table(results: &[RunResult], arms: &[String]) -> (Vec<ArmRow>, Option<f64>) {
    let mut rows = Vec::new();
    for arm in arms {
        let runs: Vec<&RunResult> = results.iter().filter(|r| &r.arm == arm).collect();
        let finals: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.last().and_then(|b| b.test))
            .collect();
        let (mean, std) = mean_std(&finals);
        let count = runs.len().max(1) as f64;
        rows.push(ArmRow {
            arm: arm.clone(),
            runs: finals.len(),
            mean,
            std,
            min: finals.iter().copied().fold(f64::NAN, f64::min),
            max: finals.iter().copied().fold(f64::NAN, f64::max),
            flops: runs.iter().map(|r| r.flops).sum::<f64>() / count,
            individuals: runs.iter().map(|r| r.individuals as f64).sum::<f64>() / count,
        });
    }
    let pairs: Vec<(f64, f64)> = results
        .iter()
        .filter_map(|r| r.last().and_then(|b| b.test.map(|t| (b.validation, t))))
        .collect();
    (rows, correlation(&pairs))
}

fn percent(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{:.1}", 100.0 * x)
    }
}

pub fn table_markdown(name: &str, rows: &[ArmRow], corr: Option<f64>) -> String {
    let mut md = format!(
        "# Study {name}\n\nFinal test accuracy (%) of each run's best individual by validation.\n\n\
         | arm | runs | mean | σ | min | max | FLOPs per run | individuals per run |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.3e} | {:.0} |",
            r.arm,
            r.runs,
            percent(r.mean),
            percent(r.std),
            percent(r.min),
            percent(r.max),
            r.flops,
            r.individuals
        );
    }
    let _ = writeln!(
        md,
        "\nValidation–test correlation of the final bests across runs: {} (the paper: 0.894).",
        corr.map(|c| format!("{c:.3}"))
            .unwrap_or_else(|| "not defined (fewer than three runs, or no spread)".into())
    );
    md
}

pub fn table_csv(rows: &[ArmRow], corr: Option<f64>) -> String {
    let mut csv = String::from(
        "arm,runs,mean_test,std_test,min_test,max_test,flops_per_run,individuals_per_run,validation_test_correlation\n",
    );
    for r in rows {
        let _ = writeln!(
            csv,
            "{},{},{:.6},{:.6},{:.6},{:.6},{:.6e},{:.1},{}",
            r.arm,
            r.runs,
            r.mean,
            r.std,
            r.min,
            r.max,
            r.flops,
            r.individuals,
            corr.map(|c| format!("{c:.6}")).unwrap_or_default()
        );
    }
    csv
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 90, 200),
    RGBColor(220, 60, 40),
    RGBColor(40, 150, 60),
    RGBColor(150, 70, 190),
    RGBColor(230, 140, 20),
    RGBColor(90, 90, 90),
];

fn draw_err(path: &Path) -> impl Fn(String) -> StudyError + '_ {
    move |message| StudyError::Write {
        path: path.to_path_buf(),
        message,
    }
}

/// The accuracy axis: the tenths around `values`, so that gaps of a point or two between arms
/// show, instead of the whole of 0..1.
fn accuracy_range(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let lo = ((lo - 0.02) * 10.0).floor() / 10.0;
    let hi = ((hi + 0.02) * 10.0).ceil() / 10.0;
    lo.max(0.0)..hi.min(1.0).max(lo.max(0.0) + 0.1)
}

/// A run's best-so-far test accuracy at `x` (seconds or FLOPs), if it had a best by then.
fn step_at(run: &RunResult, x: f64, by_flops: bool) -> Option<f64> {
    run.best_so_far
        .iter()
        .rfind(|b| b.test.is_some() && (if by_flops { b.flops } else { b.seconds }) <= x)
        .and_then(|b| b.test)
}

/// Figure 2: per arm, the mean over runs of the best-so-far's test accuracy against wall time
/// (or compute), with a ±2σ band.
pub fn figure2(
    results: &[RunResult],
    arms: &[String],
    by_flops: bool,
    path: &Path,
) -> Result<(), StudyError> {
    let err = draw_err(path);
    let x_of = |r: &RunResult| if by_flops { r.flops } else { r.seconds };
    let x_max = results.iter().map(x_of).fold(0.0, f64::max).max(1e-9);
    let (scale, unit) = if by_flops {
        (1.0, "FLOPs spent".to_string())
    } else if x_max > 7200.0 {
        (3600.0, "wall time (hours)".to_string())
    } else {
        (60.0, "wall time (minutes)".to_string())
    };
    let y = accuracy_range(
        results
            .iter()
            .flat_map(|r| r.best_so_far.iter().filter_map(|b| b.test)),
    );
    let fine = x_max / scale < 10.0;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "best individual by validation so far: test accuracy (mean, ±2σ)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max / scale, y.clone())
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(unit)
        .y_desc("test accuracy")
        .x_label_formatter(&|x| {
            if by_flops {
                format!("{x:.1e}")
            } else if fine {
                format!("{x:.1}")
            } else {
                format!("{x:.0}")
            }
        })
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (k, arm) in arms.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let runs: Vec<&RunResult> = results.iter().filter(|r| &r.arm == arm).collect();
        let mut mean = Vec::new();
        let mut upper = Vec::new();
        let mut lower = Vec::new();
        for step in 0..=200 {
            let x = x_max * f64::from(step) / 200.0;
            // Only where every run of the arm has a best so far and has not ended yet.
            let values: Vec<f64> = runs
                .iter()
                .filter(|r| x <= x_of(r) * 1.0001)
                .filter_map(|r| step_at(r, x, by_flops))
                .collect();
            let alive = runs.iter().filter(|r| x <= x_of(r) * 1.0001).count();
            if values.is_empty() || values.len() < alive {
                continue;
            }
            let (m, s) = mean_std(&values);
            mean.push((x / scale, m));
            upper.push((x / scale, (m + 2.0 * s).min(y.end)));
            lower.push((x / scale, (m - 2.0 * s).max(y.start)));
        }
        if mean.is_empty() {
            continue;
        }
        let band: Vec<(f64, f64)> = upper.iter().chain(lower.iter().rev()).copied().collect();
        chart
            .draw_series(std::iter::once(Polygon::new(
                band,
                color.mix(0.18).filled(),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(mean, color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(format!("{arm} ({} runs)", runs.len()))
            .legend(move |(a, b)| PathElement::new(vec![(a, b), (a + 15, b)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Figure 3: each run's final test accuracy against the arm parameter (or the arm's place).
pub fn figure3(
    results: &[RunResult],
    arms: &[String],
    parameter: Option<&str>,
    path: &Path,
) -> Result<(), StudyError> {
    let err = draw_err(path);
    let x_of = |r: &RunResult| match (parameter, r.parameter) {
        (Some(_), Some(p)) => p,
        _ => arms.iter().position(|a| a == &r.arm).unwrap_or(0) as f64 + 1.0,
    };
    let xs: Vec<f64> = results.iter().map(x_of).collect();
    let (lo, hi) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &x| {
            (l.min(x), h.max(x))
        });
    let pad = ((hi - lo) * 0.1).max(0.5);
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("final test accuracy of each run", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (lo - pad)..(hi + pad),
            accuracy_range(results.iter().filter_map(|r| r.last().and_then(|b| b.test))),
        )
        .map_err(|e| err(e.to_string()))?;
    let names: BTreeMap<i64, String> = arms
        .iter()
        .enumerate()
        .map(|(i, a)| (i as i64 + 1, a.clone()))
        .collect();
    chart
        .configure_mesh()
        .x_desc(parameter.unwrap_or("arm"))
        .y_desc("test accuracy")
        .x_label_formatter(&|x| match parameter {
            Some(_) => format!("{x}"),
            None if (x - x.round()).abs() < 1e-9 => {
                names.get(&(x.round() as i64)).cloned().unwrap_or_default()
            }
            None => String::new(),
        })
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (k, arm) in arms.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let points: Vec<(f64, f64)> = results
            .iter()
            .filter(|r| &r.arm == arm)
            .filter_map(|r| r.last().and_then(|b| b.test).map(|t| (x_of(r), t)))
            .collect();
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| err(e.to_string()))?
            .label(arm.clone())
            .legend(move |(a, b)| Circle::new((a, b), 4, color.filled()));
        let (m, _) = mean_std(&points.iter().map(|p| p.1).collect::<Vec<_>>());
        if let Some(&(x, _)) = points.first() {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x - pad / 3.0, m), (x + pad / 3.0, m)],
                    color.stroke_width(2),
                )))
                .map_err(|e| err(e.to_string()))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Figure 4: one run's population, each individual's validation accuracy at its birth, with
/// its interventions as vertical lines.
pub fn figure4(run: &RunResult, path: &Path) -> Result<(), StudyError> {
    let err = draw_err(path);
    let x_max = (run.seconds / 60.0).max(1e-3) * 1.02;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}, seed {}: validation accuracy of every individual",
                run.arm, run.seed
            ),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..1f64)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("wall time (minutes)")
        .y_desc("validation accuracy")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let blue = PALETTE[0];
    chart
        .draw_series(
            run.population
                .iter()
                .map(|&(t, v)| Circle::new((t / 60.0, v), 2, blue.filled())),
        )
        .map_err(|e| err(e.to_string()))?;
    for (t, what) in &run.interventions {
        let x = t / 60.0;
        let red = PALETTE[1];
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, 0.0), (x, 1.0)],
                red.stroke_width(1),
            )))
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(std::iter::once(Text::new(
                what.clone(),
                (x, 0.97),
                ("sans-serif", 14).into_font().color(&red),
            )))
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// Writes the table (Markdown and CSV), the figures and every run's measurements into `out`;
/// returns the Markdown table.
pub fn write_outputs(
    study: &StudyFile,
    results: &[RunResult],
    out: &Path,
) -> Result<String, StudyError> {
    let arms: Vec<String> = study.arms.iter().map(|a| a.name.clone()).collect();
    let (rows, corr) = table(results, &arms);
    let md = table_markdown(&study.name, &rows, corr);
    let write = |name: &str, text: &str| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| StudyError::Write {
            path,
            message: e.to_string(),
        })
    };
    write("table.md", &md)?;
    write("table.csv", &table_csv(&rows, corr))?;
    write(
        "results.json",
        &serde_json::to_string_pretty(results).expect("serialisable"),
    )?;
    figure2(results, &arms, false, &out.join("figure2-time.svg"))?;
    figure2(results, &arms, true, &out.join("figure2-flops.svg"))?;
    figure3(
        results,
        &arms,
        study.parameter.as_deref(),
        &out.join("figure3.svg"),
    )?;
    for arm in &arms {
        if let Some(run) = results.iter().find(|r| &r.arm == arm) {
            figure4(run, &out.join(format!("figure4-{arm}.svg")))?;
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_merges_objects_and_replaces_the_rest() {
        let mut target = serde_json::json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge_patch(
            &mut target,
            &serde_json::json!({"a": {"b": 5, "c": null}, "d": [2], "e": true}),
        );
        assert_eq!(
            target,
            serde_json::json!({"a": {"b": 5}, "d": [2], "e": true})
        );
    }

    #[test]
    fn every_example_study_plans_valid_runs() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/study");
        let mut studies = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let study = StudyFile::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let runs = study
                .plan(&path, Path::new("/tmp/out"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(runs.len(), study.arms.len() * study.seeds.len());
            // The base's settings survive the arms' changes.
            for run in &runs {
                let spec = &run.manifest.as_ref().unwrap()["spec"];
                assert_eq!(spec["training"]["batchSize"], 50, "{}", path.display());
                assert!(spec["stop"]["wallTime"].is_string());
            }
            studies += 1;
        }
        assert!(studies >= 3, "studies found: {studies}");
    }

    #[test]
    fn correlation_and_spread_are_the_textbook_ones() {
        let c = correlation(&[(1.0, 2.0), (2.0, 4.0), (3.0, 6.5)]).unwrap();
        assert!(c > 0.99 && c <= 1.0, "{c}");
        assert!(correlation(&[(1.0, 2.0), (2.0, 4.0)]).is_none());
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
    }
}
