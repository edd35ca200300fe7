//! The evolution worker (§3.1): claim and train initial individuals until the population is
//! complete, then repeat: pick two alive individuals at random, kill the worse, copy the
//! better, mutate the copy, train it (inheriting weights), evaluate it, and put it in.
//!
//! Workers never talk to each other; the store is the only shared state. When another worker
//! gets to an individual first (it killed our loser, or our parent died before we read it),
//! this worker gives up that reproduction and tries again, as the paper's workers do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::seq::IndexedRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;

use population::dna::Dna;
use population::individual::{now_ms, Individual, IndividualId, Lineage, FORMAT_VERSION};
use population::mutation::{mutate, AppliedMutation};
use population::seed::{self, Stream};
use population::stop::StopFlag;
use population::store::{
    check_worker_name, AliveEntry, ExperimentRecord, InvalidWorkerName, Population, ProgressEntry,
    StoreError,
};

use crate::child::{ChildError, ChildJob, ChildTrainer};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Child(#[from] ChildError),
    #[error(transparent)]
    Name(#[from] InvalidWorkerName),
    #[error("training task failed: {0}")]
    Join(String),
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
    check_worker_name(&settings.name)?;
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
        let Some((mut parent, mut loser)) =
            tournament(&alive, self.record.spec.controls.selection, &mut self.rng)
        else {
            // Fewer than two alive: the initial individuals are still being trained by other
            // workers.
            tokio::time::sleep(self.settings.idle_wait).await;
            return Ok(());
        };
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

/// §3.1's tournament: two distinct alive individuals drawn uniformly at random; the fitter is
/// the parent and the other the loser, `(parent, loser)`. A tie, and every pair under the
/// random-search control (`selection: none`), is decided by a fair coin. `None` with fewer than
/// two alive.
pub fn tournament(
    alive: &[AliveEntry],
    selection: crds::Selection,
    rng: &mut impl Rng,
) -> Option<(AliveEntry, AliveEntry)> {
    let pair: Vec<&AliveEntry> = alive.choose_multiple(rng, 2).collect();
    let [a, b] = pair[..] else {
        return None;
    };
    let by_fitness = selection == crds::Selection::Tournament && a.fitness != b.fitness;
    let a_wins = if by_fitness {
        a.fitness > b.fitness
    } else {
        rng.random_bool(0.5)
    };
    let (parent, loser) = if a_wins { (a, b) } else { (b, a) };
    Some((parent.clone(), loser.clone()))
}

/// Runs one worker loop per entry of `loops` as tasks of this process, sharing the trainer
/// and the stop flag, until the flag is set. The first loop that fails sets the flag, so the
/// others stop too; its error is returned once every loop has ended.
pub async fn run_loops(
    loops: Vec<WorkerSettings>,
    population: &Population,
    record: &ExperimentRecord,
    trainer: Arc<dyn ChildTrainer>,
    stop: &Arc<StopFlag>,
) -> Result<Vec<WorkerReport>, WorkerError> {
    let mut tasks = JoinSet::new();
    for settings in loops {
        let (population, record, trainer, stop) = (
            population.clone(),
            record.clone(),
            trainer.clone(),
            stop.clone(),
        );
        tasks.spawn(async move { run(settings, &population, &record, trainer, stop).await });
    }
    let mut reports = Vec::new();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        let error = match joined {
            Ok(Ok(report)) => {
                reports.push(report);
                continue;
            }
            Ok(Err(e)) => e,
            Err(e) => WorkerError::Join(e.to_string()),
        };
        tracing::error!(experiment = %record.name, error = %error, "worker loop failed");
        stop.stop("a worker loop failed");
        failure.get_or_insert(error);
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(reports),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fitness: f64) -> AliveEntry {
        AliveEntry {
            id: IndividualId::new(),
            fitness,
        }
    }

    #[test]
    fn the_fitter_of_two_reproduces_and_the_other_dies() {
        let alive = [entry(0.2), entry(0.7)];
        let mut rng = seed::rng(3, Stream::Selection);
        for _ in 0..20 {
            let (parent, loser) =
                tournament(&alive, crds::Selection::Tournament, &mut rng).unwrap();
            assert_eq!((parent.fitness, loser.fitness), (0.7, 0.2));
        }
    }

    #[test]
    fn without_selection_and_on_ties_a_coin_decides() {
        let mut rng = seed::rng(3, Stream::Selection);
        for (alive, selection) in [
            ([entry(0.2), entry(0.7)], crds::Selection::None),
            ([entry(0.5), entry(0.5)], crds::Selection::Tournament),
        ] {
            let parents: Vec<IndividualId> = (0..200)
                .map(|_| tournament(&alive, selection, &mut rng).unwrap().0.id)
                .collect();
            let first = parents.iter().filter(|id| **id == alive[0].id).count();
            assert!((60..=140).contains(&first), "{selection:?}: {first} of 200");
        }
    }

    #[test]
    fn a_pair_is_two_different_individuals() {
        let alive: Vec<AliveEntry> = (0..5).map(|i| entry(f64::from(i) / 10.0)).collect();
        let mut rng = seed::rng(9, Stream::Selection);
        for _ in 0..100 {
            let (parent, loser) =
                tournament(&alive, crds::Selection::Tournament, &mut rng).unwrap();
            assert_ne!(parent.id, loser.id);
            assert!(parent.fitness > loser.fitness);
        }
        assert!(tournament(&alive[..1], crds::Selection::Tournament, &mut rng).is_none());
        assert!(tournament(&[], crds::Selection::Tournament, &mut rng).is_none());
    }
}
