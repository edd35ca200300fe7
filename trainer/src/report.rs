//! What an experiment has produced, from any store at any time: a summary, the best
//! individual by validation accuracy (exported, and measured once on the test set, §3.7), and
//! a plot like the paper's figure 1.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use futures::StreamExt;
use plotters::prelude::*;

use crate::data::test_set::TestSet;
use crate::data::{DataError, Normalization, Split};
use crate::model::{Model, ModelError};
use crate::train::{self, TrainError};
use crate::weights::{Weights, WeightsError};
use population::dna::ModelSpec;
use population::individual::{now_ms, Individual};
use population::seed::{self, Stream};
use population::store::{ExperimentRecord, Population, StoreError, TestResult};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} holds no experiment (no experiment.json)")]
    NoExperiment(String),
    #[error("{0} holds no trained individual yet")]
    Empty(String),
    #[error("the store holds no record of individual {0}; `trainer report` lists the best")]
    Unknown(String),
    #[error("the weights of individual {0} are gone (it died and was collected)")]
    NoWeights(String),
    #[error("tensor {0} is missing or has another shape than the DNA's network")]
    Incomplete(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Onnx(#[from] crate::onnx::OnnxError),
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// Every recorded individual of an experiment, and which are alive.
pub struct Gathered {
    pub record: ExperimentRecord,
    pub individuals: Vec<Individual>,
    pub alive: HashSet<String>,
    /// Records that could not be read (reported, not fatal).
    pub unreadable: usize,
    /// The workers' own running totals (the progress keys).
    pub summary: population::store::Summary,
}

impl Gathered {
    /// The best individual by validation accuracy, alive or dead, ranked as the status ranks
    /// it ([`population::individual::rank`]).
    pub fn best(&self) -> Option<&Individual> {
        self.ranked().into_iter().next()
    }

    /// Every individual, best first, in the one order every reader uses.
    pub fn ranked(&self) -> Vec<&Individual> {
        let mut ranked: Vec<&Individual> = self.individuals.iter().collect();
        ranked.sort_by(|a, b| {
            population::individual::rank((b.fitness(), &b.id), (a.fitness(), &a.id))
        });
        ranked
    }
}

/// The best individual whose weights load into its network: what is reported, measured and
/// exported. Individuals ranked above it whose weights are gone or unreadable are named in
/// `skipped`, never exported.
pub struct Readable<'a> {
    pub individual: &'a Individual,
    pub weights: bytes::Bytes,
    pub skipped: Vec<(String, String)>,
}

pub async fn best_readable<'a>(
    population: &Population,
    g: &'a Gathered,
) -> Result<Readable<'a>, ReportError> {
    let classes = g.record.spec.data.dataset.classes();
    let mut skipped = Vec::new();
    for candidate in g.ranked() {
        if candidate.outcome.failure.is_some() {
            continue;
        }
        let why = match population.weights(&candidate.id).await {
            Ok(Some(bytes)) => match loads(&candidate.dna, classes, &bytes) {
                Ok(()) => {
                    return Ok(Readable {
                        individual: candidate,
                        weights: bytes,
                        skipped,
                    })
                }
                Err(e) => format!("its weights are unreadable: {e}"),
            },
            Ok(None) => "its weights are gone (it died and was collected)".to_string(),
            Err(e) => format!("its weights cannot be read: {e}"),
        };
        tracing::warn!(id = %candidate.id, why = %why, "skipping a better individual");
        skipped.push((candidate.id.to_string(), why));
    }
    Err(ReportError::Empty(population.url().to_string()))
}

/// Individual `id` with weights that load into its network, for an export of any individual.
pub async fn readable<'a>(
    population: &Population,
    g: &'a Gathered,
    id: &str,
) -> Result<Readable<'a>, ReportError> {
    let individual = g
        .individuals
        .iter()
        .find(|i| i.id.as_str() == id)
        .ok_or_else(|| ReportError::Unknown(id.to_string()))?;
    let bytes = population
        .weights(&individual.id)
        .await?
        .ok_or_else(|| ReportError::NoWeights(id.to_string()))?;
    loads(
        &individual.dna,
        g.record.spec.data.dataset.classes(),
        &bytes,
    )?;
    Ok(Readable {
        individual,
        weights: bytes,
        skipped: Vec::new(),
    })
}

/// Whether `bytes` hold every tensor of `dna`'s network, each of its shape.
fn loads(dna: &population::dna::Dna, classes: usize, bytes: &[u8]) -> Result<(), ReportError> {
    saved_model(dna, classes, bytes).map(drop)
}

/// `dna`'s network on the CPU with the saved weights `bytes`, every tensor of them: an
/// individual as it was trained, never one with a tensor drawn afresh.
pub fn saved_model(
    dna: &population::dna::Dna,
    classes: usize,
    bytes: &[u8],
) -> Result<Model, ReportError> {
    let weights = Weights::from_safetensors(bytes, &Device::Cpu)?;
    let (model, inheritance) = Model::build(
        dna,
        ModelSpec::cifar(classes),
        Some(&weights),
        &mut seed::rng(0, Stream::Initialisation),
        &Device::Cpu,
    )?;
    if let Some(missing) = inheritance.fresh.first() {
        return Err(ReportError::Incomplete(missing.clone()));
    }
    Ok(model)
}

/// Reads every individual's record (16 at a time).
pub async fn gather(population: &Population) -> Result<Gathered, ReportError> {
    let record = population
        .experiment()
        .await?
        .ok_or_else(|| ReportError::NoExperiment(population.url().to_string()))?;
    let (ids, alive, dead, summary) = tokio::try_join!(
        population.recorded(),
        population.alive(),
        population.dead(),
        population.summary()
    )?;
    // A record of a child that is neither alive nor dead is one in training, or one its worker
    // never got in (the sweeper removes those): not part of the experiment.
    let lived: HashSet<String> = alive
        .iter()
        .map(|a| a.id.to_string())
        .chain(dead.iter().map(|d| d.to_string()))
        .collect();
    let ids: Vec<_> = ids
        .into_iter()
        .filter(|id| lived.contains(id.as_str()))
        .collect();
    let mut individuals = Vec::with_capacity(ids.len());
    let mut unreadable = 0;
    let mut reads = futures::stream::iter(ids.into_iter().map(|id| {
        let population = population.clone();
        async move { (id.clone(), population.individual(&id).await) }
    }))
    .buffer_unordered(16);
    while let Some((id, result)) = reads.next().await {
        match result {
            Ok(Some(individual)) => individuals.push(individual),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(id = %id, error = %e, "skipping an unreadable individual");
                unreadable += 1;
            }
        }
    }
    individuals.sort_by_key(|i| i.born_at_ms);
    Ok(Gathered {
        record,
        individuals,
        alive: alive.iter().map(|a| a.id.to_string()).collect(),
        unreadable,
        summary,
    })
}

pub fn summary_text(g: &Gathered, best: Option<&Readable>, test: Option<&TestResult>) -> String {
    let mut out = String::new();
    let spec = &g.record.spec;
    let flops: f64 = g.individuals.iter().map(|i| i.outcome.flops).sum();
    let worker_seconds: f64 = g
        .individuals
        .iter()
        .map(|i| {
            i.outcome.training_seconds + i.outcome.evaluation_seconds + i.outcome.overhead_seconds
        })
        .sum();
    let span_ms = g
        .individuals
        .last()
        .map(|i| i.born_at_ms.saturating_sub(g.record.created_at_ms))
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "experiment   {} ({}, population {}, T = {}, mutation rate {})",
        g.record.name,
        spec.data.dataset.as_str(),
        spec.population,
        spec.training.steps,
        spec.mutation_rate
    );
    let _ = writeln!(
        out,
        "individuals  {} trained, {} alive{}",
        g.individuals.len(),
        g.alive.len(),
        if g.unreadable > 0 {
            format!(", {} unreadable", g.unreadable)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "time         {:.1} min from start to the last birth, {:.1} worker-hours",
        span_ms as f64 / 60_000.0,
        worker_seconds / 3600.0
    );
    let _ = writeln!(out, "compute      {flops:.3e} FLOPs");
    let (train, eval, overhead) = g.individuals.iter().fold((0.0, 0.0, 0.0), |(t, e, o), i| {
        (
            t + i.outcome.training_seconds,
            e + i.outcome.evaluation_seconds,
            o + i.outcome.overhead_seconds,
        )
    });
    // The workers' totals include everything a reproduction took; what is not training or
    // evaluation is overhead (store requests, model building, serialisation, waiting).
    let worker_total = g.summary.worker_seconds.max(train + eval + overhead);
    if worker_total > 0.0 {
        let _ = writeln!(
            out,
            "overhead     {:.1}% of worker time ({:.1} s of {worker_total:.1} s; training {train:.1} s, evaluation {eval:.1} s)",
            100.0 * (worker_total - train - eval) / worker_total,
            worker_total - train - eval,
        );
    }
    if let Some(readable) = best {
        for (id, why) in &readable.skipped {
            let _ = writeln!(out, "skipped      {id}, better by validation: {why}");
        }
        let best = readable.individual;
        let _ = writeln!(
            out,
            "best         {} validation {:.4}{}",
            best.id,
            best.fitness(),
            match test {
                Some(t) if t.id == best.id => format!(", test {:.4}", t.test_accuracy),
                _ => String::new(),
            }
        );
        let _ = writeln!(
            out,
            "             {} convolutions, {} parameters, learning rate {:.4}, {} ancestors",
            best.outcome.convolutions,
            best.outcome.parameters,
            best.dna.learning_rate,
            ancestors(g, best)
        );
        let _ = writeln!(out, "             {}", best.dna.summary());
    }
    out
}

fn ancestors(g: &Gathered, individual: &Individual) -> usize {
    let mut count = 0;
    let mut current = individual.lineage.parent.clone();
    while let Some(id) = current {
        count += 1;
        current = g
            .individuals
            .iter()
            .find(|i| i.id == id)
            .and_then(|i| i.lineage.parent.clone());
    }
    count
}

/// Writes the best readable individual's DNA, weights and record into `dir`.
pub async fn export_best(
    best: &Readable<'_>,
    test: Option<&TestResult>,
    dir: &Path,
) -> Result<PathBuf, ReportError> {
    let weights = &best.weights;
    let best = best.individual;
    let write = |name: &str, bytes: &[u8]| -> Result<(), ReportError> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| ReportError::Write {
            path,
            message: e.to_string(),
        })
    };
    std::fs::create_dir_all(dir).map_err(|e| ReportError::Write {
        path: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    write("dna.json", best.dna.to_json().as_bytes())?;
    write("weights.safetensors", weights)?;
    let mut result = serde_json::to_value(best).expect("serialisable");
    if let Some(t) = test.filter(|t| t.id == best.id) {
        result["test"] = serde_json::to_value(t).expect("serialisable");
    }
    write(
        "individual.json",
        serde_json::to_string_pretty(&result)
            .expect("serialisable")
            .as_bytes(),
    )?;
    Ok(dir.to_path_buf())
}

/// Measures the best readable individual by validation accuracy on the test set, once, and
/// records the result in the store; a result already recorded for the same individual is
/// reused.
pub async fn evaluate_best(
    population: &Population,
    best: &Readable<'_>,
    bench: &Arc<TestBench>,
) -> Result<TestResult, ReportError> {
    let weights = best.weights.clone();
    let best = best.individual;
    if let Some(result) = population.test_result(&best.id).await? {
        return Ok(result);
    }
    let (dna, id, bench) = (best.dna.clone(), best.id.clone(), bench.clone());
    let result = tokio::task::spawn_blocking(move || bench.measure(&id, &dna, &weights))
        .await
        .map_err(|e| ReportError::Write {
            path: PathBuf::from("<test evaluation>"),
            message: e.to_string(),
        })??;
    population.record_test_result(&result).await?;
    Ok(result)
}

/// The test set and the normalisation of an experiment's training split, loaded once to
/// measure many individuals (§3.7: the test set is touched only after evolution).
pub struct TestBench {
    test: TestSet,
    normalization: Normalization,
    classes: usize,
    device: Device,
}

impl TestBench {
    /// Blocking: reads the training files (for the normalisation, exactly as the individuals
    /// were trained with it) and the test file.
    pub fn load(
        spec: &crds::EvolutionExperimentSpec,
        data_dir: &Path,
        device: &Device,
    ) -> Result<Self, ReportError> {
        let kind = spec.data.dataset;
        let split = Split::load(
            data_dir,
            kind,
            spec.data.split_seed,
            spec.data.validation_images.map(|v| v as usize),
        )?;
        let normalization = split.normalization;
        drop(split.train);
        Ok(Self {
            test: TestSet::load(data_dir, kind)?,
            normalization,
            classes: kind.classes(),
            device: device.clone(),
        })
    }

    /// [`TestBench::load`] off the runtime's threads.
    pub async fn load_async(
        spec: &crds::EvolutionExperimentSpec,
        data_dir: &Path,
        device: &Device,
    ) -> Result<Arc<Self>, ReportError> {
        let (spec, dir, device) = (spec.clone(), data_dir.to_path_buf(), device.clone());
        tokio::task::spawn_blocking(move || Self::load(&spec, &dir, &device).map(Arc::new))
            .await
            .map_err(|e| ReportError::Write {
                path: PathBuf::from("<test set>"),
                message: e.to_string(),
            })?
    }

    /// The normalisation every individual of the experiment was trained with.
    pub fn normalization(&self) -> &Normalization {
        &self.normalization
    }

    /// Blocking: the test accuracy of `dna` with `weights`.
    pub fn measure(
        &self,
        id: &population::individual::IndividualId,
        dna: &population::dna::Dna,
        weights: &[u8],
    ) -> Result<TestResult, ReportError> {
        let weights = Weights::from_safetensors(weights, &self.device)?;
        let (model, _) = Model::build(
            dna,
            ModelSpec::cifar(self.classes),
            Some(&weights),
            &mut seed::rng(0, Stream::Initialisation),
            &self.device,
        )?;
        let evaluation = train::evaluate(
            &model,
            self.test.images_for_reporting(),
            &self.normalization,
            500,
            &self.device,
        )?;
        Ok(TestResult {
            id: id.clone(),
            test_accuracy: evaluation.accuracy,
            correct: evaluation.correct,
            total: evaluation.total,
            at_ms: now_ms(),
        })
    }
}

/// The paper's figure 1: every individual a dot at (time of birth, validation accuracy), alive
/// ones in blue, dead ones in grey, and the best accuracy so far as a line.
pub fn plot(g: &Gathered, path: &Path) -> Result<(), ReportError> {
    let err = |e: String| ReportError::Write {
        path: path.to_path_buf(),
        message: e,
    };
    let span_ms = g
        .individuals
        .last()
        .map(|i| i.born_at_ms.saturating_sub(g.record.created_at_ms))
        .unwrap_or(0)
        .max(1);
    let (unit, scale) = if span_ms < 2 * 3_600_000 {
        ("minutes", 60_000.0)
    } else {
        ("hours", 3_600_000.0)
    };
    let x = |i: &Individual| i.born_at_ms.saturating_sub(g.record.created_at_ms) as f64 / scale;
    let x_max = span_ms as f64 / scale * 1.02;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: {} individuals", g.record.name, g.individuals.len()),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max, 0f64..1f64)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(format!("wall time ({unit})"))
        .y_desc("validation accuracy")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let grey = RGBColor(170, 170, 170);
    let blue = RGBColor(31, 90, 200);
    chart
        .draw_series(
            g.individuals
                .iter()
                .filter(|i| !g.alive.contains(i.id.as_str()))
                .map(|i| Circle::new((x(i), i.fitness()), 2, grey.filled())),
        )
        .map_err(|e| err(e.to_string()))?
        .label("dead")
        .legend(move |(a, b)| Circle::new((a, b), 3, grey.filled()));
    chart
        .draw_series(
            g.individuals
                .iter()
                .filter(|i| g.alive.contains(i.id.as_str()))
                .map(|i| Circle::new((x(i), i.fitness()), 3, blue.filled())),
        )
        .map_err(|e| err(e.to_string()))?
        .label("alive")
        .legend(move |(a, b)| Circle::new((a, b), 3, blue.filled()));
    let mut best = 0f64;
    let mut line = Vec::new();
    for i in &g.individuals {
        if i.fitness() > best {
            line.push((x(i), best));
            best = i.fitness();
            line.push((x(i), best));
        }
    }
    line.push((x_max, best));
    chart
        .draw_series(LineSeries::new(line, RED.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?
        .label("best so far")
        .legend(|(a, b)| PathElement::new(vec![(a, b), (a + 15, b)], RED));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
