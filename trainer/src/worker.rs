//! The evolution worker (§3.1): claim and train initial individuals until the population is
//! complete, then repeat: pick two alive individuals at random, kill the worse, copy the
//! better, mutate the copy, train it (inheriting weights), evaluate it, and put it in.
//!
//! Workers never talk to each other; the store is the only shared state. When another worker
//! gets to an individual first (it killed our loser, or our parent died before we read it),
//! this worker gives up that reproduction and tries again, as the paper's workers do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use candle_core::Device;
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::cost::Flops;
use crate::data::Split;
use crate::dna::Dna;
use crate::individual::{now_ms, Individual, IndividualId, Lineage, Outcome, FORMAT_VERSION};
use crate::model::{Model, ModelError, ModelSpec};
use crate::mutation::{mutate, AppliedMutation};
use crate::seed::{self, Stream};
use crate::store::{AliveEntry, ExperimentRecord, Population, ProgressEntry, StoreError};
use crate::threads;
use crate::train::{self, TrainConfig, TrainError};
use crate::weights::{Weights, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("worker {0}")]
    Invalid(String),
    #[error("training task failed: {0}")]
    Join(String),
    #[error("starting the training threads: {0}")]
    Threads(#[from] rayon::ThreadPoolBuildError),
}

/// Set once, by whoever first sees that the experiment should end; polled between and during
/// trainings.
#[derive(Debug, Default)]
pub struct StopFlag {
    stopped: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl StopFlag {
    pub fn stop(&self, reason: &str) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert_with(|| reason.to_string());
        }
        self.stopped.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    pub fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }
}

/// A child to train: its DNA, what it may inherit, and its seed.
pub struct ChildJob {
    pub dna: Dna,
    pub parent_weights: Option<Bytes>,
    pub seed: u64,
}

/// A trained and evaluated child, everything but the overhead accounting.
pub struct TrainedChild {
    pub outcome: Outcome,
    pub weights: Bytes,
    pub inherited_tensors: usize,
    pub fresh_tensors: usize,
    /// Stopped before the end of training; such a child is not put in the population.
    pub interrupted: bool,
}

/// What turns a DNA into a trained, evaluated individual. The real one trains with Candle; the
/// coordination benchmark substitutes one that returns at once.
pub trait ChildTrainer: Send + Sync {
    fn train_child(&self, job: ChildJob, stop: &StopFlag) -> Result<TrainedChild, WorkerError>;
}

/// Trains on CIFAR with Candle, as §3.4 says.
pub struct CandleTrainer {
    pub data: Arc<Split>,
    pub config: TrainConfig,
    pub device: Device,
    /// TF32 matrix products on CUDA (`spec.training.tf32`).
    pub tf32: bool,
    /// Threads per training on the CPU ([`crate::threads`]): the cores shared out between
    /// the worker loops that use this trainer at once ([`crate::threads::cpu_share`]).
    pub cpu_threads: usize,
}

/// How a device is named in records and logs.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

impl ChildTrainer for CandleTrainer {
    fn train_child(&self, job: ChildJob, stop: &StopFlag) -> Result<TrainedChild, WorkerError> {
        threads::run_on_cpu_pool(&self.device, self.cpu_threads, || {
            self.train_here(job, stop)
        })?
    }
}

impl CandleTrainer {
    fn train_here(&self, job: ChildJob, stop: &StopFlag) -> Result<TrainedChild, WorkerError> {
        let tf32 = self.tf32 && self.device.is_cuda();
        if tf32 {
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }
        let parent = job
            .parent_weights
            .map(|bytes| Weights::from_safetensors(&bytes, &self.device))
            .transpose()?;
        let spec = ModelSpec::cifar(self.data.kind.classes());
        let (model, inheritance) = Model::build(
            &job.dna,
            spec,
            parent.as_ref(),
            &mut seed::rng(job.seed, Stream::Initialisation),
            &self.device,
        )?;
        let config = TrainConfig {
            seed: job.seed,
            ..self.config
        };
        let report = train::train(
            &model,
            job.dna.learning_rate,
            &self.data.train,
            &self.data.normalization,
            &config,
            &self.device,
            &|| stop.is_stopped(),
        )?;
        let evaluation = if report.interrupted {
            None
        } else {
            Some(train::evaluate(
                &model,
                &self.data.validation,
                &self.data.normalization,
                500,
                &self.device,
            )?)
        };
        let weights = Bytes::from(model.weights().to_safetensors()?);
        let validation_total = self.data.validation.len();
        let flops = Flops::of(&job.dna, spec).individual(
            report.steps * config.batch_size as u64,
            validation_total as u64,
        );
        Ok(TrainedChild {
            outcome: Outcome {
                validation_accuracy: evaluation.map_or(0.0, |e| e.accuracy),
                validation_correct: evaluation.map_or(0, |e| e.correct),
                validation_total,
                steps: report.steps,
                diverged: report.diverged,
                first_loss: Some(report.first_loss).filter(|l| l.is_finite()),
                last_loss: Some(report.last_loss).filter(|l| l.is_finite()),
                flops,
                parameters: model.parameter_count(),
                convolutions: job.dna.convolution_count(),
                training_seconds: report.seconds,
                evaluation_seconds: evaluation.map_or(0.0, |e| e.seconds),
                overhead_seconds: 0.0,
                tf32,
                device: device_name(&self.device),
            },
            weights,
            inherited_tensors: inheritance.inherited.len(),
            fresh_tensors: inheritance.fresh.len(),
            interrupted: report.interrupted,
        })
    }
}

/// One worker's identity and settings.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Unique among the experiment's workers, past and present (it names a progress key).
    pub name: String,
    /// Seeds this worker's choices; children get seeds drawn from it.
    pub seed: u64,
    /// How often the running totals are written to the store (two requests each time): often
    /// enough for the status, rarely enough not to double a reproduction's request count.
    pub progress_interval: Duration,
    /// How long to wait when there are fewer than two alive individuals to compete.
    pub idle_wait: Duration,
}

impl WorkerSettings {
    pub fn new(name: String, seed: u64) -> Self {
        Self {
            name,
            seed,
            progress_interval: Duration::from_secs(30),
            idle_wait: Duration::from_millis(500),
        }
    }
}

/// What a worker did before it stopped.
#[derive(Clone, Debug, Default)]
pub struct WorkerReport {
    pub trained: u64,
    /// Individuals this worker killed (it won their tombstones).
    pub kills: u64,
    /// Reproductions given up because another worker got there first.
    pub conflicts: u64,
    pub abandoned: u64,
}

struct Worker<'a> {
    settings: WorkerSettings,
    population: &'a Population,
    record: &'a ExperimentRecord,
    trainer: Arc<dyn ChildTrainer>,
    stop: Arc<StopFlag>,
    rng: ChaCha8Rng,
    progress: ProgressEntry,
    progress_key: Option<String>,
    last_progress: Instant,
    slots_full: bool,
    report: WorkerReport,
}

/// Runs the worker loop until the stop flag is set.
pub async fn run(
    settings: WorkerSettings,
    population: &Population,
    record: &ExperimentRecord,
    trainer: Arc<dyn ChildTrainer>,
    stop: Arc<StopFlag>,
) -> Result<WorkerReport, WorkerError> {
    crate::store::check_worker_name(&settings.name).map_err(WorkerError::Invalid)?;
    let mut worker = Worker {
        rng: seed::rng(settings.seed, Stream::Selection),
        progress: ProgressEntry {
            worker: settings.name.clone(),
            ..ProgressEntry::default()
        },
        settings,
        population,
        record,
        trainer,
        stop,
        progress_key: None,
        last_progress: Instant::now(),
        slots_full: false,
        report: WorkerReport::default(),
    };
    let result = worker.run().await;
    // Whatever ended the loop, leave the totals behind.
    let flushed = worker.write_progress().await;
    result.and(flushed.map(|_| ()))?;
    Ok(worker.report)
}

impl Worker<'_> {
    async fn run(&mut self) -> Result<(), WorkerError> {
        let experiment = self.record.name.as_str();
        tracing::info!(experiment, worker = %self.settings.name, "worker started");
        while !self.stop.is_stopped() {
            if !self.slots_full && self.fill_a_slot().await? {
                continue;
            }
            if self.slots_full {
                self.reproduce().await?;
            }
        }
        tracing::info!(
            experiment,
            worker = %self.settings.name,
            trained = self.report.trained,
            conflicts = self.report.conflicts,
            reason = self.stop.reason().unwrap_or_default(),
            "worker stopped"
        );
        Ok(())
    }

    /// Claims and trains one initial individual (§3.3) if a slot is free; `false` once every
    /// slot is claimed.
    async fn fill_a_slot(&mut self) -> Result<bool, WorkerError> {
        let size = self.record.spec.population;
        let claimed = self.population.claimed_slots().await?;
        let free: Vec<u32> = (0..size).filter(|k| !claimed.contains(k)).collect();
        let Some(&slot) = free.choose(&mut self.rng) else {
            self.slots_full = true;
            return Ok(false);
        };
        if self
            .population
            .claim_slot(slot, &self.settings.name)
            .await?
        {
            let dna = Population::initial_dna(&self.record.spec);
            let seed = self.rng.random();
            let lineage = Lineage {
                parent: None,
                slot: Some(slot),
                mutations: Vec::new(),
                seed,
                worker: self.settings.name.clone(),
                inherited_tensors: 0,
                fresh_tensors: 0,
            };
            self.raise(dna, None, lineage, Instant::now()).await?;
        }
        Ok(true)
    }

    /// One reproduction event of §3.1.
    async fn reproduce(&mut self) -> Result<(), WorkerError> {
        let started = Instant::now();
        let alive = self.population.alive().await?;
        if alive.len() < 2 {
            // The initial individuals are still being trained by other workers.
            tokio::time::sleep(self.settings.idle_wait).await;
            return Ok(());
        }
        let pair: Vec<&AliveEntry> = alive.choose_multiple(&mut self.rng, 2).collect();
        let (a, b) = (pair[0].clone(), pair[1].clone());
        let tournament = self.record.spec.controls.selection == crds::Selection::Tournament;
        let a_wins = if tournament && a.fitness != b.fitness {
            a.fitness > b.fitness
        } else {
            self.rng.random_bool(0.5)
        };
        let (mut parent, mut loser) = if a_wins { (a, b) } else { (b, a) };
        let best_alive = alive.iter().map(|e| e.fitness).fold(0.0, f64::max);

        // Read the parent before killing: if it died meanwhile, nobody has been killed in vain.
        let inherit = self.record.spec.controls.weight_inheritance;
        let (record, weights) = match self.read(&parent, inherit).await {
            Read::Ok(record, weights) => (record, weights),
            Read::Gone => {
                self.report.conflicts += 1;
                return Ok(());
            }
            Read::Corrupt => {
                // An unreadable individual cannot be a parent; it is this tournament's loser,
                // and the other one becomes the parent.
                std::mem::swap(&mut parent, &mut loser);
                match self.read(&parent, inherit).await {
                    Read::Ok(record, weights) => (record, weights),
                    _ => {
                        self.report.conflicts += 1;
                        return Ok(());
                    }
                }
            }
        };
        // The best-ever individual keeps its weights even in death, so that it can still be
        // evaluated and exported (it can only die under the random-search control).
        let keep_weights = loser.fitness >= best_alive;
        if !self.population.kill(&loser, keep_weights).await? {
            tracing::debug!(worker = %self.settings.name, id = %loser.id, "lost the kill to another worker");
            self.report.conflicts += 1;
            return Ok(());
        }
        self.report.kills += 1;
        let child_seed: u64 = self.rng.random();
        let child = mutate(
            &record.dna,
            self.record.spec.mutation_rate as usize,
            &mut seed::rng(child_seed, Stream::Mutation),
        );
        let parent_weights = weights.filter(|_| child.inherits_weights());
        let lineage = Lineage {
            parent: Some(parent.id.clone()),
            slot: None,
            mutations: child.mutations,
            seed: child_seed,
            worker: self.settings.name.clone(),
            inherited_tensors: 0,
            fresh_tensors: 0,
        };
        self.raise(child.dna, parent_weights, lineage, started)
            .await
    }

    /// Reads an individual's record and, if wanted, its weights (both at once).
    async fn read(&self, entry: &AliveEntry, with_weights: bool) -> Read {
        let (record, weights) = tokio::join!(self.population.individual(&entry.id), async {
            if with_weights {
                Some(self.population.weights(&entry.id).await)
            } else {
                None
            }
        });
        let record = match record {
            Ok(Some(r)) => r,
            Ok(None) => return Read::Gone,
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::warn!(id = %entry.id, error = %e, "skipping a corrupt individual");
                return Read::Corrupt;
            }
            Err(e) => {
                tracing::warn!(id = %entry.id, error = %e, "cannot read individual");
                return Read::Gone;
            }
        };
        let Some(weights) = weights else {
            return Read::Ok(Box::new(record), None);
        };
        match weights {
            // Weights are deleted at the kill: their absence means the parent just died.
            Ok(None) => Read::Gone,
            Ok(Some(bytes)) => {
                // A header check only (no copy): the trainer decodes the tensors later.
                if safetensors::SafeTensors::deserialize(&bytes).is_err() {
                    tracing::warn!(id = %entry.id, "skipping an individual with corrupt weights");
                    return Read::Corrupt;
                }
                Read::Ok(Box::new(record), Some(bytes))
            }
            Err(e) => {
                tracing::warn!(id = %entry.id, error = %e, "cannot read weights");
                Read::Gone
            }
        }
    }

    /// Trains `dna` and puts the result in the population.
    async fn raise(
        &mut self,
        dna: Dna,
        parent_weights: Option<Bytes>,
        mut lineage: Lineage,
        started: Instant,
    ) -> Result<(), WorkerError> {
        let started_at_ms = now_ms();
        let id = IndividualId::new();
        let seed = lineage.seed;
        tracing::debug!(experiment = %self.record.name, worker = %self.settings.name, id = %id,
            parent = ?lineage.parent, mutations = ?lineage.mutations.iter().map(|m: &AppliedMutation| m.mutation.name()).collect::<Vec<_>>(),
            "training");
        let trainer = self.trainer.clone();
        let stop = self.stop.clone();
        let job = ChildJob {
            dna: dna.clone(),
            parent_weights,
            seed,
        };
        let trained = tokio::task::spawn_blocking(move || trainer.train_child(job, &stop))
            .await
            .map_err(|e| WorkerError::Join(e.to_string()))??;
        if trained.interrupted {
            tracing::info!(worker = %self.settings.name, id = %id, "stopped during training; the child is abandoned");
            self.report.abandoned += 1;
            return Ok(());
        }
        lineage.inherited_tensors = trained.inherited_tensors;
        lineage.fresh_tensors = trained.fresh_tensors;
        let mut outcome = trained.outcome;
        let mut individual = Individual {
            format_version: FORMAT_VERSION,
            id,
            dna,
            lineage,
            outcome: outcome.clone(),
            started_at_ms,
            born_at_ms: 0,
        };
        self.population
            .put_weights(&individual.id, trained.weights)
            .await?;
        // Overhead is what the reproduction took beyond training and evaluation, up to the
        // last two writes (record and alive key), which the worker's running total includes.
        individual.born_at_ms = now_ms();
        outcome.overhead_seconds = (started.elapsed().as_secs_f64()
            - outcome.training_seconds
            - outcome.evaluation_seconds)
            .max(0.0);
        individual.outcome = outcome;
        self.population.publish(&individual).await?;
        tracing::info!(
            experiment = %self.record.name,
            worker = %self.settings.name,
            id = %individual.id,
            parent = ?individual.lineage.parent.as_ref().map(|p| p.to_string()),
            validation_accuracy = individual.fitness(),
            convolutions = individual.outcome.convolutions,
            seconds = started.elapsed().as_secs_f64(),
            "individual born"
        );
        self.report.trained += 1;
        self.progress.trained += 1;
        self.progress.flops += individual.outcome.flops;
        self.progress.seconds += started.elapsed().as_secs_f64();
        if self
            .progress
            .best
            .as_ref()
            .is_none_or(|b| individual.fitness() > b.fitness)
        {
            self.progress.best = Some(AliveEntry {
                id: individual.id.clone(),
                fitness: individual.fitness(),
            });
        }
        if self.last_progress.elapsed() >= self.settings.progress_interval {
            self.write_progress().await?;
        }
        Ok(())
    }

    async fn write_progress(&mut self) -> Result<(), WorkerError> {
        if self.progress.trained == 0 {
            return Ok(());
        }
        let key = self
            .population
            .record_progress(&self.progress, self.progress_key.as_deref())
            .await?;
        self.progress_key = Some(key);
        self.last_progress = Instant::now();
        Ok(())
    }
}

enum Read {
    Ok(Box<Individual>, Option<Bytes>),
    /// Killed or collected since the listing.
    Gone,
    Corrupt,
}

/// Why the experiment should stop now, if it should: the stop marker, or one of the spec's
/// stop conditions.
pub async fn stop_reason(
    population: &Population,
    record: &ExperimentRecord,
) -> Result<Option<String>, StoreError> {
    if let Some(marker) = population.stop_marker().await? {
        return Ok(Some(marker.reason));
    }
    let stop = &record.spec.stop;
    if let Some(wall) = stop
        .wall_time
        .as_deref()
        .and_then(|w| crds::parse_duration(w).ok())
    {
        let elapsed = now_ms().saturating_sub(record.created_at_ms);
        if elapsed >= wall.as_millis() as u64 {
            return Ok(Some(format!(
                "wall time of {} reached",
                stop.wall_time.as_deref().unwrap_or_default()
            )));
        }
    }
    if stop.individuals_trained.is_none() && stop.target_validation_accuracy.is_none() {
        return Ok(None);
    }
    let summary = population.summary().await?;
    if let Some(n) = stop.individuals_trained {
        if summary.trained >= n {
            return Ok(Some(format!("{} individuals trained", summary.trained)));
        }
    }
    if let (Some(target), Some(best)) = (stop.target_validation_accuracy, &summary.best) {
        if best.fitness >= target {
            return Ok(Some(format!(
                "validation accuracy {:.4} reached the target {target}",
                best.fitness
            )));
        }
    }
    Ok(None)
}

/// Polls the store every `interval` and sets `flag` (and the store's stop marker) when the
/// experiment should end. Returns when the flag is set, by it or by anyone else.
pub async fn watch_for_stop(
    population: Population,
    record: ExperimentRecord,
    flag: Arc<StopFlag>,
    interval: Duration,
) {
    while !flag.is_stopped() {
        match stop_reason(&population, &record).await {
            Ok(Some(reason)) => {
                if let Err(e) = population.request_stop(&reason).await {
                    tracing::warn!(error = %e, "cannot write the stop marker");
                }
                tracing::info!(experiment = %record.name, reason, "stopping");
                flag.stop(&reason);
                return;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot check the stop conditions"),
        }
        let deadline = Instant::now() + interval;
        while Instant::now() < deadline && !flag.is_stopped() {
            tokio::time::sleep(Duration::from_millis(100).min(interval)).await;
        }
    }
}
