//! The evolution worker (§3.1): claim and train initial individuals until the population is
//! complete, then repeat: pick two alive individuals at random, kill the worse, copy the
//! better, mutate the copy, train it (inheriting weights), evaluate it, and put it in.
//!
//! Workers never talk to each other; the store is the only shared state. When another worker
//! gets to an individual first (it killed our loser, or our parent died before we read it),
//! this worker gives up that reproduction and tries again, as the paper's workers do.
//!
//! No fault shrinks the population: every place a child is to fill is a vacancy with a lease
//! ([`population::store::Vacancy`]); a worker that dies leaves its lease to expire and another
//! fills the place, and one stopped mid-training gives the loser its place back. A child that
//! cannot be trained goes in as a failed individual (fitness 0) and the worker goes on; only
//! errors that need a person (credentials, a bad configuration) end a worker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tokio::task::JoinSet;

use population::dna::Dna;
use population::individual::{now_ms, Individual, IndividualId, Lineage, Outcome, FORMAT_VERSION};
use population::mutation::{mutate, AppliedMutation};
use population::seed::{self, Stream};
use population::stop::StopFlag;
use population::store::{
    adoptable, check_worker_name, AliveEntry, ExperimentRecord, Interventions, InvalidWorkerName,
    Lease, Population, ProgressEntry, StoreError, Vacancy, VacancyState,
};

use crate::child::{ChildJob, ChildTrainer, TrainedChild};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Name(#[from] InvalidWorkerName),
    #[error("training task failed: {0}")]
    Join(String),
}

/// One worker's identity and settings.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Unique among the experiment's running workers (it names a progress key and leases). A
    /// worker restarted under its old name continues its totals and at once refills the
    /// vacancy its predecessor left.
    pub name: String,
    /// Seeds this worker's choices; children get seeds drawn from it.
    pub seed: u64,
    /// How often the running totals are written to the store (two requests each time): often
    /// enough for the status, rarely enough not to double a reproduction's request count.
    pub progress_interval: Duration,
    /// How long to wait when there are fewer than two alive individuals to compete.
    pub idle_wait: Duration,
    /// How long a lease on a vacancy lasts unrenewed; it is renewed three times as often. A
    /// crashed worker's vacancy is refilled this long (plus the clock-skew allowance) later.
    pub lease: Duration,
    /// How far past its deadline a lease must be before this worker adopts its vacancy.
    pub clock_skew: Duration,
    /// How often the sweeper runs, and how old what it removes must be.
    pub sweep_interval: Duration,
    pub sweep_grace: Duration,
}

impl WorkerSettings {
    pub fn new(name: String, seed: u64) -> Self {
        Self {
            name,
            seed,
            progress_interval: Duration::from_secs(30),
            idle_wait: Duration::from_millis(500),
            lease: Duration::from_secs(60),
            clock_skew: population::store::CLOCK_SKEW,
            sweep_interval: Duration::from_secs(600),
            sweep_grace: Duration::from_secs(3600),
        }
    }
}

/// What a worker did before it stopped.
#[derive(Clone, Debug, Default)]
pub struct WorkerReport {
    /// Individuals this worker put in the population (failed ones included).
    pub trained: u64,
    /// Individuals this worker killed (it won their tombstones).
    pub kills: u64,
    /// Reproductions given up because another worker got there first.
    pub conflicts: u64,
    /// Children stopped mid-training; their losers were given their places back.
    pub abandoned: u64,
    /// Children that could not be trained and went in with fitness 0.
    pub failed: u64,
    /// Vacancies of other (crashed) workers this worker took over.
    pub adopted: u64,
    /// Children trained for a vacancy another worker filled first, and discarded.
    pub surplus: u64,
}

/// What one step of the loop leaves the worker to do.
enum Step {
    Continue,
    /// A bounded run's every training is claimed and none is in flight.
    Done,
}

/// How to give a vacancy back when its child is abandoned at a stop.
enum Undo {
    /// Alive again, as if it had never lost.
    Revive(AliveEntry),
    ReleaseSlot(u32),
    /// Leave the lease to expire: whoever runs next refills the vacancy.
    Leave,
}

/// A child about to be trained for a vacancy.
struct Birth {
    lease: Lease,
    dna: Dna,
    parent_weights: Option<Bytes>,
    lineage: Lineage,
    started: Instant,
    undo: Undo,
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
    last_sweep: Option<Instant>,
    last_idle_log: Option<Instant>,
    slots_full: bool,
    /// The best fitness this worker has seen alive or trained: a child that beats it is kept.
    best_seen: f64,
    /// The stored record as last read: its mutation rate and schedules may be edited.
    current: ExperimentRecord,
    last_record_read: Option<Instant>,
    interventions: Interventions,
    report: WorkerReport,
}

/// Runs the worker loop until the stop flag is set (or a bounded run is complete).
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
        last_sweep: None,
        last_idle_log: None,
        slots_full: false,
        best_seen: 0.0,
        current: record.clone(),
        last_record_read: None,
        interventions: Interventions::default(),
        report: WorkerReport::default(),
    };
    let result = worker.run().await;
    // Whatever ended the loop, leave the totals behind.
    let flushed = worker.write_progress().await;
    result.and(flushed.map(|_| ()))?;
    Ok(worker.report)
}

impl Worker<'_> {
    fn name(&self) -> &str {
        &self.settings.name
    }

    async fn run(&mut self) -> Result<(), WorkerError> {
        let experiment = self.record.name.as_str();
        tracing::info!(experiment = %experiment, worker = %self.settings.name, "worker started");
        self.resume_progress().await?;
        while !self.stop.is_stopped() {
            if self
                .last_sweep
                .is_none_or(|at| at.elapsed() >= self.settings.sweep_interval)
            {
                self.sweep().await?;
            }
            self.follow_interventions().await?;
            let (alive, leases) =
                tokio::try_join!(self.population.alive(), self.population.leases())?;
            self.best_seen = alive
                .iter()
                .map(|a| a.fitness)
                .fold(self.best_seen, f64::max);
            let step = if let Some((vacancy, expired)) =
                adoptable(&leases, self.name(), now_ms(), self.settings.clock_skew)
                    .choose(&mut self.rng)
                    .cloned()
            {
                self.adopt(vacancy, expired, &alive).await?
            } else if !self.slots_full {
                self.fill_a_slot(&leases).await?
            } else if let Some(stale) = self.stale(&alive) {
                self.retrain(&stale, &leases).await?
            } else {
                self.reproduce(&alive, &leases).await?
            };
            // Done does not set the stop flag: loops of this process that share it may still
            // be training the last tickets.
            if let Step::Done = step {
                tracing::info!(experiment = %experiment, worker = %self.settings.name,
                    "every training of the run's individualsTrained is claimed and done");
                break;
            }
        }
        tracing::info!(
            experiment = %experiment,
            worker = %self.settings.name,
            trained = self.report.trained,
            conflicts = self.report.conflicts,
            adopted = self.report.adopted,
            failed = self.report.failed,
            reason = %self.stop.reason().unwrap_or_default(),
            "worker stopped"
        );
        Ok(())
    }

    /// Reads the interventions (§5) and writes the scheduled ones whose point has come.
    async fn follow_interventions(&mut self) -> Result<(), WorkerError> {
        // The record's schedules may be edited; reading it every few seconds is enough.
        if self
            .last_record_read
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(10))
        {
            if let Some(record) = self.population.experiment().await? {
                self.current = record;
            }
            self.last_record_read = Some(Instant::now());
        }
        self.population
            .refresh_interventions(&mut self.interventions)
            .await?;
        let spec = &self.current.spec;
        if !Population::schedule_pending(spec, &self.interventions) {
            return Ok(());
        }
        // The trained total as the status counts it, with this worker's own count up to date
        // (its flushed key lags), so that one worker's schedule by count is exact.
        let needs_count = spec.mutation_schedule.iter().any(|e| e.trained.is_some())
            || spec.weight_resets.iter().any(|w| w.trained.is_some());
        let trained = if needs_count {
            let others: u64 = self
                .population
                .progress()
                .await?
                .iter()
                .filter(|p| p.worker != self.settings.name)
                .map(|p| p.trained)
                .sum();
            others + self.progress.trained
        } else {
            0
        };
        if self
            .population
            .schedule_due(
                spec,
                self.current.created_at_ms,
                trained,
                &self.interventions,
            )
            .await?
        {
            self.population
                .refresh_interventions(&mut self.interventions)
                .await?;
        }
        Ok(())
    }

    fn mutation_rate(&self) -> u32 {
        self.interventions
            .mutation_rate(self.current.spec.mutation_rate)
    }

    /// An alive individual trained before the latest weight reset, if any: it is retrained
    /// before tournaments resume, so no stale fitness competes with retrained ones.
    fn stale(&mut self, alive: &[AliveEntry]) -> Option<AliveEntry> {
        let epoch = self.interventions.epoch();
        let stale: Vec<&AliveEntry> = alive.iter().filter(|a| a.epoch < epoch).collect();
        stale.choose(&mut self.rng).map(|a| (*a).clone())
    }

    /// §5's weight reset for one individual: it is replaced by its own DNA trained from fresh
    /// weights. The kill is create-only, so each stale individual is retrained once.
    async fn retrain(&mut self, stale: &AliveEntry, leases: &[Lease]) -> Result<Step, WorkerError> {
        let started = Instant::now();
        let dna = match self.read(stale, false).await {
            Read::Ok(record, _) => record.dna,
            Read::Gone => {
                self.report.conflicts += 1;
                return Ok(Step::Continue);
            }
            // Its DNA is lost: the place gets an initial individual.
            Read::Corrupt => Population::initial_dna(&self.record.spec),
        };
        let lease = match self.take_place(stale, leases).await? {
            Ok(lease) => lease,
            Err(step) => return Ok(step),
        };
        let seed = self.rng.random();
        let mut lineage = self.lineage(Some(stale.id.clone()), None, Vec::new(), seed);
        lineage.retrained = true;
        let birth = Birth {
            lease,
            dna,
            parent_weights: None,
            lineage,
            started,
            undo: Undo::Revive(stale.clone()),
        };
        self.raise(birth).await?;
        Ok(Step::Continue)
    }

    /// A worker restarted under its old name continues its running totals instead of
    /// starting a second, smaller set beside them.
    async fn resume_progress(&mut self) -> Result<(), WorkerError> {
        if let Some(previous) = self
            .population
            .progress()
            .await?
            .into_iter()
            .find(|p| p.worker == self.settings.name)
        {
            self.progress_key = Some(previous.key());
            if let Some(best) = &previous.best {
                self.best_seen = self.best_seen.max(best.fitness);
            }
            self.progress = previous;
        }
        Ok(())
    }

    /// Sweeps the store if no other worker has in this sweep interval.
    async fn sweep(&mut self) -> Result<(), WorkerError> {
        self.last_sweep = Some(Instant::now());
        let interval = self.settings.sweep_interval.as_millis().max(1) as u64;
        let name = self.settings.name.clone();
        if !self
            .population
            .claim_sweep(now_ms() / interval, &name)
            .await?
        {
            return Ok(());
        }
        let swept = self
            .population
            .sweep(self.settings.sweep_grace, self.settings.clock_skew)
            .await?;
        if swept.zombies + swept.orphans > 0 {
            tracing::info!(experiment = %self.record.name, worker = %self.settings.name,
                zombies = swept.zombies, orphans = swept.orphans, "swept the store");
        }
        Ok(())
    }

    fn lease(&self, vacancy: Vacancy, ticket: Option<u64>) -> Lease {
        Lease {
            vacancy,
            worker: self.settings.name.clone(),
            deadline_ms: now_ms() + self.settings.lease.as_millis() as u64,
            ticket,
            child: IndividualId::new(),
        }
    }

    /// The ticket for one more training of a bounded run (`Ok(None)` when unbounded);
    /// `Err(step)` when every ticket is taken: the worker waits for trainings in flight (whose
    /// holders might crash and leave vacancies to fill) and is done when there are none.
    async fn ticket(&mut self, leases: &[Lease]) -> Result<Result<Option<u64>, Step>, WorkerError> {
        // The stored stop conditions decide: they may have been edited since the start.
        let limit = self
            .population
            .experiment()
            .await?
            .unwrap_or_else(|| self.record.clone())
            .spec
            .stop
            .individuals_trained;
        let Some(limit) = limit else {
            return Ok(Ok(None));
        };
        let name = self.settings.name.clone();
        match self
            .population
            .claim_ticket(limit, &name, &mut self.rng)
            .await?
        {
            Some(ticket) => Ok(Ok(Some(ticket))),
            None if leases.is_empty() => Ok(Err(Step::Done)),
            None => {
                self.idle(
                    leases.len(),
                    "every training is claimed; waiting for those in flight",
                )
                .await;
                Ok(Err(Step::Continue))
            }
        }
    }

    async fn give_back_ticket(&self, ticket: Option<u64>) -> Result<(), WorkerError> {
        if let Some(ticket) = ticket {
            self.population.release_ticket(ticket).await?;
        }
        Ok(())
    }

    async fn idle(&mut self, in_flight: usize, why: &str) {
        if self
            .last_idle_log
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(30))
        {
            self.last_idle_log = Some(Instant::now());
            tracing::info!(experiment = %self.record.name, worker = %self.settings.name,
                in_flight, "{why}");
        }
        tokio::time::sleep(self.settings.idle_wait).await;
    }

    /// Claims and trains one initial individual (§3.3) if a slot is free.
    async fn fill_a_slot(&mut self, leases: &[Lease]) -> Result<Step, WorkerError> {
        let size = self.record.spec.population;
        let claimed = self.population.claimed_slots().await?;
        let free: Vec<u32> = (0..size).filter(|k| !claimed.contains(k)).collect();
        let Some(&slot) = free.choose(&mut self.rng) else {
            self.slots_full = true;
            return Ok(Step::Continue);
        };
        let ticket = match self.ticket(leases).await? {
            Ok(ticket) => ticket,
            Err(step) => return Ok(step),
        };
        // The lease first: a worker that dies right after its claim leaves a vacancy that
        // others can see.
        let lease = self.lease(Vacancy::Slot(slot), ticket);
        self.population.hold(&lease).await?;
        if !self.population.claim_slot(slot, self.name()).await? {
            self.population.release(&lease).await?;
            self.give_back_ticket(ticket).await?;
            return Ok(Step::Continue);
        }
        let seed = self.rng.random();
        let birth = Birth {
            lease,
            dna: Population::initial_dna(&self.record.spec),
            parent_weights: None,
            lineage: self.lineage(None, Some(slot), Vec::new(), seed),
            started: Instant::now(),
            undo: Undo::ReleaseSlot(slot),
        };
        self.raise(birth).await?;
        Ok(Step::Continue)
    }

    fn lineage(
        &self,
        parent: Option<IndividualId>,
        slot: Option<u32>,
        mutations: Vec<AppliedMutation>,
        seed: u64,
    ) -> Lineage {
        Lineage {
            parent,
            slot,
            mutations,
            seed,
            worker: self.settings.name.clone(),
            inherited_tensors: 0,
            fresh_tensors: 0,
            mutation_rate: self.mutation_rate(),
            reset_epoch: self.interventions.epoch(),
            retrained: false,
        }
    }

    /// One reproduction event of §3.1.
    async fn reproduce(
        &mut self,
        alive: &[AliveEntry],
        leases: &[Lease],
    ) -> Result<Step, WorkerError> {
        let started = Instant::now();
        let Some((mut parent, mut loser)) =
            select(alive, &self.record.spec.controls, &mut self.rng)
        else {
            self.idle(
                leases.len(),
                "fewer than two individuals alive; waiting for those being trained",
            )
            .await;
            return Ok(Step::Continue);
        };
        // Read the parent before killing: if it died meanwhile, nobody has been killed in vain.
        let inherit = self.record.spec.controls.weight_inheritance;
        let (record, weights) = match self.read(&parent, inherit).await {
            Read::Ok(record, weights) => (record, weights),
            Read::Gone => {
                self.report.conflicts += 1;
                return Ok(Step::Continue);
            }
            Read::Corrupt => {
                // An unreadable individual cannot be a parent; it is this tournament's loser,
                // and the other one becomes the parent.
                if parent.id == loser.id {
                    self.report.conflicts += 1;
                    return Ok(Step::Continue);
                }
                std::mem::swap(&mut parent, &mut loser);
                match self.read(&parent, inherit).await {
                    Read::Ok(record, weights) => (record, weights),
                    _ => {
                        self.report.conflicts += 1;
                        return Ok(Step::Continue);
                    }
                }
            }
        };
        let lease = match self.take_place(&loser, leases).await? {
            Ok(lease) => lease,
            Err(step) => return Ok(step),
        };
        // The vacancy is ours now. A dead individual never reproduces: if the parent died
        // while we read it, fill the place from another. (Under aging the oldest may be its
        // own sample's best: it dies by our hand, after we read it, and still reproduces.)
        if parent.id != loser.id && self.population.is_dead(&parent.id).await? {
            let rest: Vec<AliveEntry> = alive
                .iter()
                .filter(|a| a.id != parent.id && a.id != loser.id)
                .cloned()
                .collect();
            return self.fill(lease, &rest, Undo::Revive(loser)).await;
        }
        let birth = self.offspring(&record, weights, lease, started, Undo::Revive(loser));
        self.raise(birth).await?;
        Ok(Step::Continue)
    }

    /// Kills `victim` for a child of ours, with the lease on its place written first and a
    /// ticket for a bounded run; `Err(step)` when the experiment stopped, every ticket is
    /// taken, or another worker won the kill.
    async fn take_place(
        &mut self,
        victim: &AliveEntry,
        leases: &[Lease],
    ) -> Result<Result<Lease, Step>, WorkerError> {
        // A stopped experiment kills no one: its last kills would leave places unfilled.
        if let Some(marker) = self.population.stop_marker().await? {
            self.stop.stop(&marker.reason);
            return Ok(Err(Step::Continue));
        }
        let ticket = match self.ticket(leases).await? {
            Ok(ticket) => ticket,
            Err(step) => return Ok(Err(step)),
        };
        let lease = self.lease(Vacancy::Replacing(victim.id.clone()), ticket);
        self.population.hold(&lease).await?;
        if !self.population.kill(victim, self.name()).await? {
            tracing::debug!(worker = %self.settings.name, id = %victim.id, "lost the kill to another worker");
            self.population.release(&lease).await?;
            self.give_back_ticket(ticket).await?;
            self.report.conflicts += 1;
            return Ok(Err(Step::Continue));
        }
        self.report.kills += 1;
        Ok(Ok(lease))
    }

    /// The mutated copy of `parent` (§3.2), to be trained for `lease`'s vacancy.
    fn offspring(
        &mut self,
        parent: &Individual,
        weights: Option<Bytes>,
        lease: Lease,
        started: Instant,
        undo: Undo,
    ) -> Birth {
        let child_seed: u64 = self.rng.random();
        let child = mutate(
            &parent.dna,
            self.mutation_rate() as usize,
            &mut seed::rng(child_seed, Stream::Mutation),
        );
        let parent_weights = weights.filter(|_| child.inherits_weights());
        Birth {
            lease,
            dna: child.dna,
            parent_weights,
            lineage: self.lineage(Some(parent.id.clone()), None, child.mutations, child_seed),
            started,
            undo,
        }
    }

    /// Takes over a vacancy whose worker is gone: finishes it if it was filled, drops it if it
    /// never opened, and otherwise fills it.
    async fn adopt(
        &mut self,
        vacancy: Vacancy,
        expired: Vec<Lease>,
        alive: &[AliveEntry],
    ) -> Result<Step, WorkerError> {
        let ticket = expired.iter().find_map(|l| l.ticket);
        let state = match self.population.vacancy_state(&vacancy).await {
            Err(e @ StoreError::Corrupt { .. }) => {
                tracing::warn!(vacancy = %vacancy, error = %e, "a vacancy's fill is unreadable; taking it as filled");
                VacancyState::Filled(IndividualId::new())
            }
            other => other?,
        };
        match state {
            VacancyState::Closed => {
                self.population.restore_if_lost(&vacancy, alive).await?;
                for lease in &expired {
                    self.population.release(lease).await?;
                }
                self.give_back_ticket(ticket).await?;
                Ok(Step::Continue)
            }
            VacancyState::Filled(child) => {
                self.population.settle(&vacancy, &child, alive).await?;
                for lease in &expired {
                    self.population.release(lease).await?;
                }
                Ok(Step::Continue)
            }
            VacancyState::Open => {
                let lease = self.lease(vacancy.clone(), ticket);
                self.population.hold(&lease).await?;
                for old in &expired {
                    self.population.release(old).await?;
                }
                tracing::info!(experiment = %self.record.name, worker = %self.settings.name,
                    vacancy = %vacancy, from = %expired[0].worker, "refilling a vacancy its worker left");
                self.report.adopted += 1;
                let mut rest: Vec<AliveEntry> = alive.to_vec();
                let undo = match &vacancy {
                    Vacancy::Slot(k) => Undo::ReleaseSlot(*k),
                    Vacancy::Replacing(victim) => {
                        // A killer that crashed before removing its victim's alive key left
                        // a zombie: it goes now.
                        if let Some(zombie) = alive.iter().find(|a| a.id == *victim) {
                            self.population.store().delete(&zombie.key()).await?;
                        }
                        rest.retain(|a| a.id != *victim);
                        // Its weights stay until the place is filled, so a stop can still
                        // give it the place back.
                        match self.population.individual(victim).await {
                            Ok(Some(record)) => Undo::Revive(Population::alive_entry(&record)),
                            _ => Undo::Leave,
                        }
                    }
                };
                self.fill(lease, &rest, undo).await
            }
        }
    }

    /// Fills a vacancy without a kill: with an initial individual for a slot, else with the
    /// child of a tournament's winner among `alive` (or of the only one alive, or, when none
    /// is, an initial individual).
    async fn fill(
        &mut self,
        lease: Lease,
        alive: &[AliveEntry],
        undo: Undo,
    ) -> Result<Step, WorkerError> {
        let started = Instant::now();
        let inherit = self.record.spec.controls.weight_inheritance;
        let mut candidates = alive.to_vec();
        // After a weight reset, parents come from the retrained where there are any.
        let epoch = self.interventions.epoch();
        if candidates.iter().any(|c| c.epoch >= epoch) {
            candidates.retain(|c| c.epoch >= epoch);
        }
        if !matches!(lease.vacancy, Vacancy::Slot(_)) {
            while !candidates.is_empty() {
                let parent = match select(&candidates, &self.record.spec.controls, &mut self.rng) {
                    Some((parent, _)) => parent,
                    None => candidates[0].clone(),
                };
                candidates.retain(|c| c.id != parent.id);
                if let Read::Ok(record, weights) = self.read(&parent, inherit).await {
                    if !self.population.is_dead(&parent.id).await? {
                        let birth = self.offspring(&record, weights, lease, started, undo);
                        self.raise(birth).await?;
                        return Ok(Step::Continue);
                    }
                }
            }
        }
        let slot = match lease.vacancy {
            Vacancy::Slot(k) => Some(k),
            Vacancy::Replacing(_) => None,
        };
        let seed = self.rng.random();
        let birth = Birth {
            lease,
            dna: Population::initial_dna(&self.record.spec),
            parent_weights: None,
            lineage: self.lineage(None, slot, Vec::new(), seed),
            started,
            undo,
        };
        self.raise(birth).await?;
        Ok(Step::Continue)
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
        // A failed individual has no weights; its child starts afresh.
        let Some(weights) = weights.filter(|_| record.outcome.failure.is_none()) else {
            return Read::Ok(Box::new(record), None);
        };
        match weights {
            // Weights are collected after a kill: their absence means the parent died.
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

    /// Trains a child, renewing its lease meanwhile, and puts it in its vacancy.
    async fn raise(&mut self, birth: Birth) -> Result<(), WorkerError> {
        let Birth {
            lease,
            dna,
            parent_weights,
            mut lineage,
            started,
            undo,
        } = birth;
        let started_at_ms = now_ms();
        let id = lease.child.clone();
        tracing::debug!(experiment = %self.record.name, worker = %self.settings.name, id = %id,
            parent = %lineage.parent.as_ref().map(|p| p.to_string()).unwrap_or_default(),
            mutations = %lineage.mutations.iter().map(|m: &AppliedMutation| m.mutation.name()).collect::<Vec<_>>().join(","),
            "training");
        let job = ChildJob {
            dna: dna.clone(),
            parent_weights,
            seed: lineage.seed,
        };
        let (trained, lease) = self.train(job, lease).await?;
        let trained = match trained {
            Ok(trained) if trained.interrupted => {
                self.abandon(&lease, undo).await?;
                return Ok(());
            }
            Ok(trained) => Ok(trained),
            Err(reason) => Err(reason),
        };
        let (mut outcome, weights) = match trained {
            Ok(trained) => {
                lineage.inherited_tensors = trained.inherited_tensors;
                lineage.fresh_tensors = trained.fresh_tensors;
                (trained.outcome, Some(trained.weights))
            }
            Err(reason) => {
                tracing::warn!(experiment = %self.record.name, worker = %self.settings.name,
                    id = %id, reason, "the child could not be trained; it goes in with fitness 0");
                self.report.failed += 1;
                (failed_outcome(reason), None)
            }
        };
        let fitness = outcome.validation_accuracy;
        let kept = outcome.failure.is_none() && fitness > self.best_seen;
        let mut individual = Individual {
            format_version: FORMAT_VERSION,
            id,
            dna,
            lineage,
            outcome: outcome.clone(),
            started_at_ms,
            born_at_ms: 0,
            kept,
        };
        if let Some(weights) = weights {
            self.population.put_weights(&individual.id, weights).await?;
        }
        // Overhead is what the reproduction took beyond training and evaluation, up to the
        // last writes (record, fill and alive key), which the worker's running total includes.
        individual.born_at_ms = now_ms();
        outcome.overhead_seconds = (started.elapsed().as_secs_f64()
            - outcome.training_seconds
            - outcome.evaluation_seconds)
            .max(0.0);
        individual.outcome = outcome;
        if !self
            .population
            .publish_into(&lease.vacancy, &individual)
            .await?
        {
            tracing::info!(worker = %self.settings.name, vacancy = %lease.vacancy,
                "another worker filled this vacancy first; the child is discarded");
            self.report.surplus += 1;
            self.population.release(&lease).await?;
            return Ok(());
        }
        match &undo {
            Undo::Revive(loser) => self.population.collect(loser).await?,
            Undo::Leave => {
                if let Vacancy::Replacing(victim) = &lease.vacancy {
                    self.population.bury(victim, &[]).await?;
                }
            }
            Undo::ReleaseSlot(_) => {}
        }
        self.population.release(&lease).await?;
        // Debug: a short run has thousands; the progress display says how it goes.
        tracing::debug!(
            experiment = %self.record.name,
            worker = %self.settings.name,
            id = %individual.id,
            parent = %individual.lineage.parent.as_ref().map_or("none".to_string(), |p| p.to_string()),
            validation_accuracy = individual.fitness(),
            convolutions = individual.outcome.convolutions,
            seconds = started.elapsed().as_secs_f64(),
            "individual born"
        );
        self.best_seen = self.best_seen.max(fitness);
        self.report.trained += 1;
        self.progress.trained += 1;
        self.progress.flops += individual.outcome.flops;
        self.progress.seconds += started.elapsed().as_secs_f64();
        let entry = AliveEntry::new(individual.id.clone(), individual.fitness());
        if self.progress.best.as_ref().is_none_or(|b| {
            population::individual::rank((entry.fitness, &entry.id), (b.fitness, &b.id)).is_gt()
        }) {
            self.progress.best = Some(entry);
        }
        if self.last_progress.elapsed() >= self.settings.progress_interval {
            self.write_progress().await?;
        }
        Ok(())
    }

    /// Trains `job` off the runtime while a task renews `lease`; returns the training's
    /// result (a failure's reason as text) and the lease as last renewed.
    async fn train(
        &self,
        job: ChildJob,
        lease: Lease,
    ) -> Result<(Result<TrainedChild, String>, Lease), WorkerError> {
        let trainer = self.trainer.clone();
        let stop = self.stop.clone();
        let training = tokio::task::spawn_blocking(move || trainer.train_child(job, &stop));
        let (population, every) = (self.population.clone(), self.settings.lease / 3);
        let length = self.settings.lease.as_millis() as u64;
        let (done, mut finished) = tokio::sync::oneshot::channel::<()>();
        let renewal = tokio::spawn(async move {
            let mut lease = lease;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = &mut finished => return lease,
                }
                if let Err(e) = population.renew(&mut lease, now_ms() + length).await {
                    tracing::warn!(vacancy = %lease.vacancy, error = %e, "cannot renew a lease");
                }
            }
        });
        let result = match training.await {
            Ok(Ok(trained)) => Ok(trained),
            Ok(Err(e)) => Err(format!("{e}")),
            Err(e) => Err(format!("the training panicked: {e}")),
        };
        let _ = done.send(());
        let lease = renewal
            .await
            .map_err(|e| WorkerError::Join(e.to_string()))?;
        Ok((result, lease))
    }

    /// A child stopped mid-training: its vacancy goes back as it was, so a stop costs the
    /// population nothing.
    async fn abandon(&mut self, lease: &Lease, undo: Undo) -> Result<(), WorkerError> {
        tracing::info!(worker = %self.settings.name, vacancy = %lease.vacancy,
            "stopped during training; the child is abandoned and its place given back");
        self.report.abandoned += 1;
        match undo {
            Undo::Revive(loser) => self.population.revive(&loser).await?,
            Undo::ReleaseSlot(slot) => self.population.release_slot(slot).await?,
            // The lease stays to expire: the next worker to run refills the vacancy.
            Undo::Leave => return Ok(()),
        }
        self.population.release(lease).await?;
        self.give_back_ticket(lease.ticket).await
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

/// The outcome of a child that could not be trained: fitness 0 and the reason.
fn failed_outcome(reason: String) -> Outcome {
    Outcome {
        validation_accuracy: 0.0,
        validation_correct: 0,
        validation_total: 0,
        steps: 0,
        diverged: false,
        first_loss: None,
        last_loss: None,
        flops: 0.0,
        parameters: 0,
        convolutions: 0,
        training_seconds: 0.0,
        evaluation_seconds: 0.0,
        overhead_seconds: 0.0,
        tf32: false,
        device: String::new(),
        failure: Some(reason),
    }
}

enum Read {
    Ok(Box<Individual>, Option<Bytes>),
    /// Killed or collected since the listing.
    Gone,
    Corrupt,
}

/// Selection (§3.1), as `(parent, loser)`; `None` with fewer than two alive. S individuals
/// (`controls.sampleSize`, 2 in the paper) are drawn uniformly without replacement and the
/// fittest reproduces. Under `tournament` the least fit of them dies; under `aging` the oldest
/// of the whole population (the earliest id: ids begin with their creation time) dies; under
/// the random-search control (`none`) the parent and the loser are two of them at random. Ties
/// are decided at random.
pub fn select(
    alive: &[AliveEntry],
    controls: &crds::ControlsSpec,
    rng: &mut impl Rng,
) -> Option<(AliveEntry, AliveEntry)> {
    if alive.len() < 2 {
        return None;
    }
    let size = (controls.sample_size as usize).clamp(2, alive.len());
    let mut sample: Vec<&AliveEntry> = alive.choose_multiple(rng, size).collect();
    // A random order first, so that the first of equals is a fair pick.
    sample.shuffle(rng);
    let fittest = sample
        .iter()
        .copied()
        .reduce(|best, e| if e.fitness > best.fitness { e } else { best });
    let (parent, loser) = match controls.selection {
        crds::Selection::None => (sample[0], sample[1]),
        crds::Selection::Tournament => {
            let parent = fittest?;
            let loser = sample
                .iter()
                .copied()
                .filter(|e| e.id != parent.id)
                .reduce(|worst, e| if e.fitness < worst.fitness { e } else { worst })?;
            (parent, loser)
        }
        crds::Selection::Aging => {
            let parent = fittest?;
            let oldest = alive.iter().min_by(|a, b| {
                (a.id.created_ms(), a.id.to_string()).cmp(&(b.id.created_ms(), b.id.to_string()))
            })?;
            (parent, oldest)
        }
    };
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
        AliveEntry::new(IndividualId::new(), fitness)
    }

    fn controls(selection: crds::Selection, sample_size: u32) -> crds::ControlsSpec {
        crds::ControlsSpec {
            selection,
            sample_size,
            ..crds::ControlsSpec::default()
        }
    }

    #[test]
    fn the_fitter_of_two_reproduces_and_the_other_dies() {
        let alive = [entry(0.2), entry(0.7)];
        let mut rng = seed::rng(3, Stream::Selection);
        for _ in 0..20 {
            let (parent, loser) = select(&alive, &crds::ControlsSpec::default(), &mut rng).unwrap();
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
                .map(|_| {
                    select(&alive, &controls(selection, 2), &mut rng)
                        .unwrap()
                        .0
                        .id
                })
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
            let (parent, loser) = select(&alive, &crds::ControlsSpec::default(), &mut rng).unwrap();
            assert_ne!(parent.id, loser.id);
            assert!(parent.fitness > loser.fitness);
        }
        let pair = crds::ControlsSpec::default();
        assert!(select(&alive[..1], &pair, &mut rng).is_none());
        assert!(select(&[], &pair, &mut rng).is_none());
    }

    #[test]
    fn a_larger_sample_kills_its_worst_and_copies_its_best() {
        let alive: Vec<AliveEntry> = (0..6).map(|i| entry(f64::from(i) / 10.0)).collect();
        let mut rng = seed::rng(4, Stream::Selection);
        // The whole population as the sample: always the best and the worst.
        for _ in 0..20 {
            let (parent, loser) =
                select(&alive, &controls(crds::Selection::Tournament, 6), &mut rng).unwrap();
            assert_eq!((parent.fitness, loser.fitness), (0.5, 0.0));
        }
    }

    #[test]
    fn aging_kills_the_oldest_whatever_its_fitness() {
        // Ids begin with their creation time: the first made is the oldest.
        let oldest = entry(0.9);
        std::thread::sleep(Duration::from_millis(3));
        let mut alive = vec![oldest.clone()];
        alive.extend((0..4).map(|i| entry(f64::from(i) / 10.0)));
        alive.reverse();
        let mut rng = seed::rng(5, Stream::Selection);
        let mut parents = std::collections::HashSet::new();
        for _ in 0..50 {
            let (parent, loser) =
                select(&alive, &controls(crds::Selection::Aging, 2), &mut rng).unwrap();
            assert_eq!(loser.id, oldest.id, "the oldest dies");
            parents.insert(parent.id);
        }
        // The best of a pair of five reproduces: never the worst.
        assert!(parents.len() > 1);
        assert!(!parents.contains(&alive.iter().find(|a| a.fitness == 0.0).unwrap().id));
    }
}
