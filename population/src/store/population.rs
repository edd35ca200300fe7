//! The population of one experiment in one store, and the operations of §3.1 on it: the
//! only code that knows which keys make an individual alive, dead or in progress
//! ([`super::layout`] names them).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::layout::{
    self, check_worker_name, dead_key, evaluation_key, record_key, slot_key, weights_key,
    AliveEntry, ProgressEntry, Vacancy, ALIVE, DEAD, EXPERIMENT, INDIVIDUALS, OWNER, PROGRESS,
    REPORTED, SLOTS, STOP,
};
use super::{ObjectStore, StoreError};
use crate::dna::Dna;
use crate::individual::{now_ms, Individual, IndividualId, FORMAT_VERSION};

/// The experiment as recorded when it started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRecord {
    pub format_version: u32,
    pub name: String,
    pub spec: crds::EvolutionExperimentSpec,
    pub created_at_ms: u64,
}

/// The Kubernetes object an experiment's store belongs to. Two experiments given the same
/// URL would otherwise share one population, and deleting one with `retention: Delete` would
/// empty the other's; the first to claim the store owns it until it is emptied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreOwner {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for StoreOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} (uid {})", self.namespace, self.name, self.uid)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StopMarker {
    pub reason: String,
    pub at_ms: u64,
    #[serde(default)]
    pub nonce: String,
}

impl StopMarker {
    /// How to go on from a stop, for the messages of commands that meet one.
    pub const HOW_TO_GO_ON: &'static str = "to go on, raise the stop condition that ended it (spec.stop) and run again, or give a fresh store URL for a new experiment";
}

/// What the status and the progress bar show; two LISTs compute it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub alive: usize,
    pub trained: u64,
    pub flops: f64,
    pub worker_seconds: f64,
    /// Best by validation accuracy, alive or dead.
    pub best: Option<AliveEntry>,
}

/// A test accuracy measured for reporting (§3.7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    pub id: IndividualId,
    pub test_accuracy: f64,
    pub correct: usize,
    pub total: usize,
    pub at_ms: u64,
}

/// A value no other write will ever carry. Every create-only body holds one, so that a
/// writer whose response was lost, and who retried and was told the key exists, can read the
/// object and tell its own write from another's.
pub(super) fn nonce() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// What a create-only claim holds: who made it, when, and a nonce that makes it unique.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub worker: String,
    pub at_ms: u64,
    pub nonce: String,
    /// The child that fills a vacancy (`filled/` claims only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child: Option<IndividualId>,
}

impl Claim {
    pub fn new(worker: &str) -> Self {
        Self {
            worker: worker.to_string(),
            at_ms: now_ms(),
            nonce: nonce(),
            child: None,
        }
    }

    pub fn body(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("serialisable"))
    }
}

/// The population of one experiment in one store.
#[derive(Clone, Debug)]
pub struct Population {
    store: Arc<dyn ObjectStore>,
    /// Foreign keys already warned about, so a stray object is reported once, not per LIST.
    reported: Arc<Mutex<HashSet<String>>>,
}

impl Population {
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            reported: Arc::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn url(&self) -> &str {
        self.store.url()
    }

    pub(super) fn skip_foreign(&self, key: &str, why: &str) {
        let new = self
            .reported
            .lock()
            .map(|mut r| r.insert(key.to_string()))
            .unwrap_or(true);
        if new {
            tracing::warn!(
                store = %self.url(),
                key,
                why,
                "skipping an object that is not ours"
            );
        }
    }

    fn corrupt(&self, key: &str, reason: impl ToString) -> StoreError {
        StoreError::Corrupt {
            store: self.url().to_string(),
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Records the experiment, or checks that the recorded one is the same experiment: a
    /// store holds one experiment, and resuming it with another spec would mix two.
    pub async fn start_experiment(
        &self,
        name: &str,
        spec: &crds::ValidatedSpec,
    ) -> Result<ExperimentRecord, StoreError> {
        let record = ExperimentRecord {
            format_version: FORMAT_VERSION,
            name: name.to_string(),
            spec: (**spec).clone(),
            created_at_ms: now_ms(),
        };
        let body = serde_json::to_vec_pretty(&record).expect("serialisable");
        if self.store.put_new(EXPERIMENT, Bytes::from(body)).await? {
            return Ok(record);
        }
        let existing = self.experiment().await?.ok_or_else(|| {
            self.corrupt(
                EXPERIMENT,
                "it vanished right after a create-only write failed",
            )
        })?;
        let essence = |s: &crds::EvolutionExperimentSpec| {
            (
                s.population,
                s.seed,
                s.training.clone(),
                s.data.dataset,
                s.data.validation_images,
                s.data.split_seed,
                s.controls.clone(),
            )
        };
        if essence(&existing.spec) != essence(&record.spec) {
            return Err(StoreError::Conflict {
                store: self.url().to_string(),
                message: format!(
                    "it holds experiment {:?} with a different spec (population, seed, training, data or controls differ); use another store URL for a new experiment",
                    existing.name
                ),
            });
        }
        Ok(existing)
    }

    pub async fn experiment(&self) -> Result<Option<ExperimentRecord>, StoreError> {
        let Some(bytes) = self.store.get(EXPERIMENT).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| self.corrupt(EXPERIMENT, e))
    }

    pub async fn claimed_slots(&self) -> Result<HashSet<u32>, StoreError> {
        let mut slots = HashSet::new();
        for key in self.store.list(SLOTS).await? {
            match key.strip_prefix(SLOTS).and_then(|k| k.parse::<u32>().ok()) {
                Some(k) => {
                    slots.insert(k);
                }
                None => self.skip_foreign(&key, "not a slot number"),
            }
        }
        Ok(slots)
    }

    /// Claims initial-population slot `slot`: `true` if this worker now owns it.
    pub async fn claim_slot(&self, slot: u32, worker: &str) -> Result<bool, StoreError> {
        self.store
            .put_new(&slot_key(slot), Claim::new(worker).body())
            .await
    }

    /// Gives a claimed slot back, for a child abandoned before it was born.
    pub async fn release_slot(&self, slot: u32) -> Result<(), StoreError> {
        self.store.delete(&slot_key(slot)).await
    }

    pub async fn slot_claimed(&self, slot: u32) -> Result<bool, StoreError> {
        Ok(self.store.get(&slot_key(slot)).await?.is_some())
    }

    /// The alive individuals, from one LIST.
    pub async fn alive(&self) -> Result<Vec<AliveEntry>, StoreError> {
        let mut alive = Vec::new();
        for key in self.store.list(ALIVE).await? {
            match AliveEntry::parse(&key) {
                Some(entry) => alive.push(entry),
                None => self.skip_foreign(&key, "not <id>@<fitness>"),
            }
        }
        Ok(alive)
    }

    /// An individual's record; a record that does not parse or whose DNA is invalid is an
    /// error the caller can skip.
    pub async fn individual(&self, id: &IndividualId) -> Result<Option<Individual>, StoreError> {
        let key = record_key(id);
        let Some(bytes) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let individual: Individual =
            serde_json::from_slice(&bytes).map_err(|e| self.corrupt(&key, e))?;
        if individual.id != *id {
            return Err(self.corrupt(&key, format!("it names individual {}", individual.id)));
        }
        individual
            .dna
            .validate()
            .map_err(|e| self.corrupt(&key, e))?;
        Ok(Some(individual))
    }

    pub async fn weights(&self, id: &IndividualId) -> Result<Option<Bytes>, StoreError> {
        self.store.get(&weights_key(id)).await
    }

    /// Puts a trained individual in: weights and record first, the alive key last, so that
    /// nobody ever sees part of an individual.
    pub async fn add(&self, individual: &Individual, weights: Bytes) -> Result<(), StoreError> {
        self.put_weights(&individual.id, weights).await?;
        self.publish(individual).await
    }

    /// The first half of [`Population::add`]: the weights, which nothing reads before the
    /// individual is published.
    pub async fn put_weights(&self, id: &IndividualId, weights: Bytes) -> Result<(), StoreError> {
        self.store.put(&weights_key(id), weights).await
    }

    /// The second half, outside any vacancy (tests and tools that build a population by
    /// hand): the record, then the alive key; from here on the individual exists.
    pub async fn publish(&self, individual: &Individual) -> Result<(), StoreError> {
        self.put_record(individual).await?;
        self.store
            .put(&Self::alive_entry(individual).key(), Bytes::new())
            .await
    }

    /// The alive key an individual's record calls for.
    pub fn alive_entry(individual: &Individual) -> AliveEntry {
        AliveEntry {
            id: individual.id.clone(),
            fitness: individual.fitness(),
            kept: individual.kept,
            epoch: individual.lineage.reset_epoch,
        }
    }

    pub async fn put_record(&self, individual: &Individual) -> Result<(), StoreError> {
        let record = serde_json::to_vec_pretty(individual).expect("serialisable");
        self.store
            .put(&record_key(&individual.id), Bytes::from(record))
            .await
    }

    /// Puts a trained child in `vacancy`: its record, the create-only fill, then its alive key.
    /// `false` if another child filled the vacancy first (a worker that adopted it while this
    /// one was presumed dead); this child's objects are then removed, and it never existed.
    pub async fn publish_into(
        &self,
        vacancy: &Vacancy,
        individual: &Individual,
    ) -> Result<bool, StoreError> {
        self.put_record(individual).await?;
        let claim = Claim {
            child: Some(individual.id.clone()),
            ..Claim::new(&individual.lineage.worker)
        };
        if !self
            .store
            .put_new(&vacancy.filled_key(), claim.body())
            .await?
        {
            self.discard(&individual.id).await?;
            return Ok(false);
        }
        self.store
            .put(&Self::alive_entry(individual).key(), Bytes::new())
            .await?;
        Ok(true)
    }

    /// Removes the objects of a child that never became alive.
    pub async fn discard(&self, id: &IndividualId) -> Result<(), StoreError> {
        self.store.delete(&record_key(id)).await?;
        self.store.delete(&weights_key(id)).await
    }

    /// The child that filled `vacancy`, if one did.
    pub async fn filled_by(&self, vacancy: &Vacancy) -> Result<Option<IndividualId>, StoreError> {
        let key = vacancy.filled_key();
        let Some(bytes) = self.store.get(&key).await? else {
            return Ok(None);
        };
        let claim: Claim = serde_json::from_slice(&bytes).map_err(|e| self.corrupt(&key, e))?;
        claim
            .child
            .map(Some)
            .ok_or_else(|| self.corrupt(&key, "it names no child"))
    }

    /// Kills `victim`: `true` if this call did it. Exactly one of any number of concurrent
    /// callers wins; the others get `false` and, as in the paper, give up and try again.
    /// The alive key goes at once, so that no other tournament picks the victim; its weights
    /// stay until its place is filled (see [`Population::collect`]), so that a reproduction
    /// abandoned at a stop can give the victim its place back; the record stays as lineage.
    pub async fn kill(&self, victim: &AliveEntry, killer: &str) -> Result<bool, StoreError> {
        let won = self
            .store
            .put_new(&dead_key(&victim.id), Claim::new(killer).body())
            .await?;
        // A loser also cleans up: the winner may have crashed between its kill and its
        // cleanup, and removing what is already removed is harmless.
        self.store.delete(&victim.key()).await?;
        Ok(won)
    }

    /// Undoes a kill whose child was abandoned: the victim is alive again, as if it had never
    /// lost. Only the killer, holding the vacancy's lease, does this. The tombstone goes first:
    /// an alive key beside a tombstone would be removed by any worker that tried to kill it.
    /// A crash between the two leaves the lease, and its adopter finishes the revival.
    pub async fn revive(&self, victim: &AliveEntry) -> Result<(), StoreError> {
        self.store.delete(&dead_key(&victim.id)).await?;
        self.store.put(&victim.key(), Bytes::new()).await
    }

    pub async fn is_dead(&self, id: &IndividualId) -> Result<bool, StoreError> {
        Ok(self.store.get(&dead_key(id)).await?.is_some())
    }

    /// Collects a dead individual's weights, unless it was marked to keep them.
    pub async fn collect(&self, victim: &AliveEntry) -> Result<(), StoreError> {
        if victim.kept {
            return Ok(());
        }
        self.store.delete(&weights_key(&victim.id)).await
    }

    pub async fn dead(&self) -> Result<HashSet<IndividualId>, StoreError> {
        let mut dead = HashSet::new();
        for key in self.store.list(DEAD).await? {
            match key.strip_prefix(DEAD).map(IndividualId::parse) {
                Some(Ok(id)) => {
                    dead.insert(id);
                }
                _ => self.skip_foreign(&key, "not an individual id"),
            }
        }
        Ok(dead)
    }

    /// Every individual that has a record, alive or dead.
    pub async fn recorded(&self) -> Result<Vec<IndividualId>, StoreError> {
        let mut ids = Vec::new();
        for key in self.store.list(INDIVIDUALS).await? {
            let Some(rest) = key.strip_prefix(INDIVIDUALS) else {
                continue;
            };
            match rest.split_once('/') {
                Some((id, "individual.json")) => match IndividualId::parse(id) {
                    Ok(id) => ids.push(id),
                    Err(_) => self.skip_foreign(&key, "not an individual id"),
                },
                Some((_, "weights.safetensors")) => {}
                _ => self.skip_foreign(&key, "not part of an individual"),
            }
        }
        Ok(ids)
    }

    /// Claims the store for `owner` unless someone has already; returns the owner it has.
    pub async fn claim(&self, owner: &StoreOwner) -> Result<StoreOwner, StoreError> {
        let body = Bytes::from(serde_json::to_vec_pretty(owner).expect("serialisable"));
        if self.store.put_new(OWNER, body).await? {
            return Ok(owner.clone());
        }
        self.owner().await?.ok_or_else(|| {
            self.corrupt(OWNER, "it vanished right after a create-only write failed")
        })
    }

    pub async fn owner(&self) -> Result<Option<StoreOwner>, StoreError> {
        let Some(bytes) = self.store.get(OWNER).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| self.corrupt(OWNER, e))
    }

    /// Replaces the recorded stop conditions with `stop`; see [`Population::update_mutable`].
    pub async fn update_stop(&self, stop: &crds::StopSpec) -> Result<bool, StoreError> {
        let Some(record) = self.experiment().await? else {
            return Ok(false);
        };
        let mut spec = record.spec;
        spec.stop = stop.clone();
        self.update_mutable(&spec).await
    }

    /// Copies the parts of a running experiment's spec that may change (stop conditions,
    /// mutation rate and schedule, weight resets) from `spec` into the record workers read.
    /// A new mutation rate is also recorded as an intervention, so that it takes effect over
    /// any earlier change. Returns whether the record changed.
    pub async fn update_mutable(
        &self,
        spec: &crds::EvolutionExperimentSpec,
    ) -> Result<bool, StoreError> {
        let Some(mut record) = self.experiment().await? else {
            return Ok(false);
        };
        let before = record.spec.clone();
        record.spec = before.with_edits_of(spec);
        if record.spec == before {
            return Ok(false);
        }
        if record.spec.mutation_rate != before.mutation_rate {
            self.intervene(
                super::Change::MutationRate {
                    rate: spec.mutation_rate,
                },
                "spec",
            )
            .await?;
        }
        let body = serde_json::to_vec_pretty(&record).expect("serialisable");
        self.store.put(EXPERIMENT, Bytes::from(body)).await?;
        Ok(true)
    }

    pub async fn stop_marker(&self) -> Result<Option<StopMarker>, StoreError> {
        match self.store.get(STOP).await? {
            None => Ok(None),
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                StopMarker {
                    reason: format!("stop marker present (unreadable: {e})"),
                    at_ms: 0,
                    nonce: String::new(),
                }
            }))),
        }
    }

    /// Removes the stop marker, when the stop conditions were raised past what stopped the
    /// experiment and it is resumed.
    pub async fn clear_stop(&self) -> Result<(), StoreError> {
        self.store.delete(STOP).await
    }

    /// Asks every worker to stop; `true` if this call set the marker.
    pub async fn request_stop(&self, reason: &str) -> Result<bool, StoreError> {
        let marker = StopMarker {
            reason: reason.to_string(),
            at_ms: now_ms(),
            nonce: nonce(),
        };
        self.store
            .put_new(
                STOP,
                Bytes::from(serde_json::to_vec(&marker).expect("serialisable")),
            )
            .await
    }

    /// Replaces a worker's progress key with `entry`'s; returns the new key to pass as
    /// `previous` next time.
    pub async fn record_progress(
        &self,
        entry: &ProgressEntry,
        previous: Option<&str>,
    ) -> Result<String, StoreError> {
        check_worker_name(&entry.worker).map_err(|e| StoreError::InvalidKey {
            key: entry.worker.clone(),
            reason: e.to_string(),
        })?;
        let key = entry.key();
        self.store.put(&key, Bytes::new()).await?;
        if let Some(previous) = previous.filter(|p| *p != key) {
            self.store.delete(previous).await?;
        }
        Ok(key)
    }

    /// Every worker's latest totals (the largest, should a crash have left two keys).
    pub async fn progress(&self) -> Result<Vec<ProgressEntry>, StoreError> {
        let mut latest: BTreeMap<String, ProgressEntry> = BTreeMap::new();
        for key in self.store.list(PROGRESS).await? {
            match ProgressEntry::parse(&key) {
                Some(entry) => {
                    let slot = latest.entry(entry.worker.clone()).or_default();
                    if entry.trained >= slot.trained {
                        *slot = entry;
                    }
                }
                None => self.skip_foreign(&key, "not a progress key"),
            }
        }
        Ok(latest.into_values().collect())
    }

    pub async fn summary(&self) -> Result<Summary, StoreError> {
        let (alive, progress) = tokio::try_join!(self.alive(), self.progress())?;
        let best = alive
            .iter()
            .chain(progress.iter().filter_map(|p| p.best.as_ref()))
            .max_by(|a, b| crate::individual::rank((a.fitness, &a.id), (b.fitness, &b.id)))
            .cloned();
        Ok(Summary {
            alive: alive.len(),
            trained: progress.iter().map(|p| p.trained).sum(),
            flops: progress.iter().map(|p| p.flops).sum(),
            worker_seconds: progress.iter().map(|p| p.seconds).sum(),
            best,
        })
    }

    pub async fn record_test_result(&self, result: &TestResult) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(result).expect("serialisable");
        self.store
            .put(&evaluation_key(&result.id), Bytes::from(body))
            .await
    }

    /// Marks `result` as the one the experiment reports: the best readable individual's, which
    /// is the best by validation unless that one's weights are unreadable.
    pub async fn record_reported(&self, result: &TestResult) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(result).expect("serialisable");
        self.store.put(REPORTED, Bytes::from(body)).await
    }

    pub async fn reported_test_result(&self) -> Result<Option<TestResult>, StoreError> {
        match self.store.get(REPORTED).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(REPORTED, e)),
        }
    }

    pub async fn test_result(&self, id: &IndividualId) -> Result<Option<TestResult>, StoreError> {
        let key = evaluation_key(id);
        match self.store.get(&key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| self.corrupt(&key, e)),
        }
    }

    /// Removes every object of the experiment (retention policy Delete). Objects written while
    /// this runs may survive it; stop the workers first.
    pub async fn delete_everything(&self) -> Result<usize, StoreError> {
        let mut keys = vec![EXPERIMENT.to_string()];
        for prefix in layout::PREFIXES {
            keys.extend(self.store.list(prefix).await?);
        }
        let count = keys.len();
        let store = self.store.clone();
        let mut deletions = futures::stream::iter(keys.into_iter().map(|key| {
            let store = store.clone();
            async move { store.delete(&key).await }
        }))
        .buffer_unordered(16);
        while let Some(result) = futures::StreamExt::next(&mut deletions).await {
            result?;
        }
        Ok(count)
    }

    /// The initial individual's DNA for this experiment.
    pub fn initial_dna(spec: &crds::EvolutionExperimentSpec) -> Dna {
        let mut dna = Dna::initial();
        dna.learning_rate = spec.training.initial_learning_rate;
        dna
    }
}
