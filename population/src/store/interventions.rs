//! §5's interventions: a change of the mutation rate and a population-wide weight reset,
//! taken by a running experiment without a restart.
//!
//! Each one is an object under `control/interventions/`, so every worker sees it and every
//! child's record says which rate and which reset epoch it was born under. A scheduled one
//! (`spec.mutationSchedule`, `spec.weightResets`) is written create-only under a key named
//! for its schedule entry, by whichever worker (or the operator) first sees its point
//! reached, so it happens once however many notice; one asked for on demand (`trainer
//! intervene`, or an edit of `spec.mutationRate`) gets a key of its own.
//!
//! The state they make is a fold: the rate is the latest change's (or the spec's when there
//! is none), and the reset epoch is the number of resets. After a reset, an alive individual
//! of an earlier epoch is retrained from fresh weights before tournaments compare it again.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout::INTERVENTIONS;
use super::population::nonce;
use super::{Population, StoreError};
use crate::individual::now_ms;

/// What an intervention does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Change {
    /// Every child born from now on gets `rate` mutations.
    MutationRate { rate: u32 },
    /// Every alive individual retrains its DNA from fresh weights.
    ResetWeights,
}

/// One intervention as the store records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Intervention {
    #[serde(flatten)]
    pub change: Change,
    /// When it took effect: a scheduled point's own time for wall-time entries (so that
    /// entries noticed together keep their order), else when it was written.
    pub at_ms: u64,
    /// `schedule`, `command` or `spec`.
    pub source: String,
    pub nonce: String,
}

/// The interventions so far, keyed by their object names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Interventions {
    pub by_key: BTreeMap<String, Intervention>,
}

impl Interventions {
    /// In the order they took effect.
    pub fn in_order(&self) -> Vec<&Intervention> {
        let mut all: Vec<(&String, &Intervention)> = self.by_key.iter().collect();
        all.sort_by(|a, b| (a.1.at_ms, a.0).cmp(&(b.1.at_ms, b.0)));
        all.into_iter().map(|(_, i)| i).collect()
    }

    /// The mutation rate in force: the latest change's, or `base` (the spec's) without one.
    pub fn mutation_rate(&self, base: u32) -> u32 {
        self.in_order()
            .iter()
            .rev()
            .find_map(|i| match i.change {
                Change::MutationRate { rate } => Some(rate),
                Change::ResetWeights => None,
            })
            .unwrap_or(base)
    }

    /// How many weight resets have happened.
    pub fn epoch(&self) -> u32 {
        self.by_key
            .values()
            .filter(|i| i.change == Change::ResetWeights)
            .count() as u32
    }
}

fn schedule_rate_key(entry: &crds::ScheduledRate) -> String {
    format!(
        "{INTERVENTIONS}schedule.rate.{}.{}",
        entry.when().tag(),
        entry.rate
    )
}

fn schedule_reset_key(when: &crds::When) -> String {
    format!("{INTERVENTIONS}schedule.reset.{}", when.tag())
}

impl Population {
    /// Brings `known` up to date: one LIST, and a GET for each intervention not seen before
    /// (they never change once written). An unreadable one is named and left out.
    pub async fn refresh_interventions(&self, known: &mut Interventions) -> Result<(), StoreError> {
        for key in self.store().list(INTERVENTIONS).await? {
            if known.by_key.contains_key(&key) {
                continue;
            }
            let Some(bytes) = self.store().get(&key).await? else {
                continue;
            };
            match serde_json::from_slice::<Intervention>(&bytes) {
                Ok(intervention) => {
                    known.by_key.insert(key, intervention);
                }
                Err(e) => tracing::warn!(store = %self.url(), key, error = %e,
                    "skipping an unreadable intervention; delete it or write it again with trainer intervene"),
            }
        }
        Ok(())
    }

    pub async fn interventions(&self) -> Result<Interventions, StoreError> {
        let mut known = Interventions::default();
        self.refresh_interventions(&mut known).await?;
        Ok(known)
    }

    /// Records an intervention asked for now; returns it.
    pub async fn intervene(
        &self,
        change: Change,
        source: &str,
    ) -> Result<Intervention, StoreError> {
        let intervention = Intervention {
            change,
            at_ms: now_ms(),
            source: source.to_string(),
            nonce: nonce(),
        };
        let key = format!(
            "{INTERVENTIONS}{source}.{:013}.{}",
            intervention.at_ms, intervention.nonce
        );
        let body = serde_json::to_vec_pretty(&intervention).expect("serialisable");
        self.store().put_new(&key, Bytes::from(body)).await?;
        Ok(intervention)
    }

    /// Writes the scheduled interventions of `spec` whose points are reached, `elapsed`
    /// after the experiment's start with `trained` individuals trained, and that `known`
    /// lacks; returns whether it wrote any. Create-only: each happens once.
    pub async fn schedule_due(
        &self,
        spec: &crds::EvolutionExperimentSpec,
        created_at_ms: u64,
        trained: u64,
        known: &Interventions,
    ) -> Result<bool, StoreError> {
        let elapsed = Duration::from_millis(now_ms().saturating_sub(created_at_ms));
        let at = |when: &crds::When| match when.after.as_deref().map(crds::parse_duration) {
            Some(Ok(after)) => created_at_ms + after.as_millis() as u64,
            _ => now_ms(),
        };
        let mut due = Vec::new();
        for entry in &spec.mutation_schedule {
            let when = entry.when();
            let key = schedule_rate_key(entry);
            if when.reached(elapsed, trained) && !known.by_key.contains_key(&key) {
                due.push((key, Change::MutationRate { rate: entry.rate }, at(&when)));
            }
        }
        for when in &spec.weight_resets {
            let key = schedule_reset_key(when);
            if when.reached(elapsed, trained) && !known.by_key.contains_key(&key) {
                due.push((key, Change::ResetWeights, at(when)));
            }
        }
        let wrote = !due.is_empty();
        for (key, change, at_ms) in due {
            let intervention = Intervention {
                change,
                at_ms,
                source: "schedule".into(),
                nonce: nonce(),
            };
            let body = serde_json::to_vec_pretty(&intervention).expect("serialisable");
            if self.store().put_new(&key, Bytes::from(body)).await? {
                tracing::info!(store = %self.url(), key = %key, "scheduled intervention reached");
            }
        }
        Ok(wrote)
    }

    /// Whether `spec` schedules anything `known` has not seen happen yet.
    pub fn schedule_pending(spec: &crds::EvolutionExperimentSpec, known: &Interventions) -> bool {
        spec.mutation_schedule
            .iter()
            .any(|e| !known.by_key.contains_key(&schedule_rate_key(e)))
            || spec
                .weight_resets
                .iter()
                .any(|w| !known.by_key.contains_key(&schedule_reset_key(w)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, change: Change) -> Intervention {
        Intervention {
            change,
            at_ms: ms,
            source: "command".into(),
            nonce: String::new(),
        }
    }

    #[test]
    fn the_latest_rate_wins_and_resets_count() {
        let mut known = Interventions::default();
        assert_eq!((known.mutation_rate(1), known.epoch()), (1, 0));
        known
            .by_key
            .insert("b".into(), at(20, Change::MutationRate { rate: 1 }));
        known
            .by_key
            .insert("a".into(), at(10, Change::MutationRate { rate: 5 }));
        known
            .by_key
            .insert("c".into(), at(15, Change::ResetWeights));
        assert_eq!(known.mutation_rate(3), 1);
        assert_eq!(known.epoch(), 1);
    }
}
