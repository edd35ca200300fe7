//! Which key holds what, and the keys that carry values of their own.
//!
//! ```text
//! experiment.json                        the spec and start time, written once, create-only
//! slots/<k>                              claim of initial-population slot k, create-only
//! individuals/<id>/individual.json       DNA, lineage and outcome (kept after death)
//! individuals/<id>/weights.safetensors   deleted when the individual dies
//! alive/<id>@<fitness>                   written last: the individual exists from here on
//! dead/<id>                              the kill, create-only: exactly one worker wins it
//! progress/<worker>@<trained>@<mflops>@<ms>@<best fitness>@<best id>
//!                                        each worker's running totals, replaced as they grow
//! control/stop                           the stop marker, create-only
//! evaluation/<id>.json                   test accuracy of the reported individual
//! ```
//!
//! As in the paper's footnote 2, keys carry what the hot paths need: one LIST of `alive/`
//! answers a tournament, and one LIST of `alive/` plus one of `progress/` answers the status.
//! Everything written into a key (ids, worker names, numbers) is checked before it gets there.

use crate::individual::IndividualId;

pub const EXPERIMENT: &str = "experiment.json";
pub const SLOTS: &str = "slots/";
pub const INDIVIDUALS: &str = "individuals/";
pub const ALIVE: &str = "alive/";
pub const DEAD: &str = "dead/";
pub const PROGRESS: &str = "progress/";
pub const CONTROL: &str = "control/";
pub const STOP: &str = "control/stop";
/// Which Kubernetes object owns the store (see [`StoreOwner`](super::StoreOwner)).
pub const OWNER: &str = "control/owner";
pub const EVALUATION: &str = "evaluation/";

/// Every prefix under which the experiment keeps objects (besides [`EXPERIMENT`]).
pub const PREFIXES: [&str; 7] = [
    ALIVE,
    DEAD,
    SLOTS,
    PROGRESS,
    CONTROL,
    EVALUATION,
    INDIVIDUALS,
];

pub fn slot_key(slot: u32) -> String {
    format!("{SLOTS}{slot}")
}

pub fn record_key(id: &IndividualId) -> String {
    format!("{INDIVIDUALS}{id}/individual.json")
}

pub fn weights_key(id: &IndividualId) -> String {
    format!("{INDIVIDUALS}{id}/weights.safetensors")
}

pub fn dead_key(id: &IndividualId) -> String {
    format!("{DEAD}{id}")
}

pub fn evaluation_key(id: &IndividualId) -> String {
    format!("{EVALUATION}{id}.json")
}

/// A worker name that cannot go into a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker name {name:?} must be 1-63 lower-case letters, digits or '-'")]
pub struct InvalidWorkerName {
    pub name: String,
}

/// Worker names go into keys: 1-63 lower-case letters, digits and '-', like a pod name.
pub fn check_worker_name(name: &str) -> Result<(), InvalidWorkerName> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(InvalidWorkerName {
            name: name.to_string(),
        })
    }
}

/// A fitness as keys write it: a validation accuracy in [0, 1].
fn parse_fitness(text: &str) -> Option<f64> {
    text.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite() && (0.0..=1.0).contains(f))
}

/// An alive individual as its key shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct AliveEntry {
    pub id: IndividualId,
    pub fitness: f64,
}

impl AliveEntry {
    pub fn key(&self) -> String {
        alive_key(&self.id, self.fitness)
    }

    /// The entry an `alive/` key names, if it is one.
    pub fn parse(key: &str) -> Option<Self> {
        let (id, fitness) = key.strip_prefix(ALIVE)?.split_once('@')?;
        Some(Self {
            id: IndividualId::parse(id).ok()?,
            fitness: parse_fitness(fitness)?,
        })
    }
}

pub fn alive_key(id: &IndividualId, fitness: f64) -> String {
    format!("{ALIVE}{id}@{fitness:.6}")
}

/// A worker's running totals, as its progress key shows them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProgressEntry {
    pub worker: String,
    pub trained: u64,
    pub flops: f64,
    pub seconds: f64,
    pub best: Option<AliveEntry>,
}

impl ProgressEntry {
    pub fn key(&self) -> String {
        let (fitness, id) = match &self.best {
            Some(b) => (format!("{:.6}", b.fitness), b.id.to_string()),
            None => ("0".to_string(), "none".to_string()),
        };
        format!(
            "{PROGRESS}{}@{}@{}@{}@{fitness}@{id}",
            self.worker,
            self.trained,
            (self.flops / 1e6).round() as u64,
            (self.seconds * 1e3).round() as u64,
        )
    }

    /// The entry a `progress/` key names, if it is one.
    pub fn parse(key: &str) -> Option<Self> {
        let rest = key.strip_prefix(PROGRESS)?;
        let parts: Vec<&str> = rest.split('@').collect();
        let [worker, trained, mflops, ms, fitness, id] = parts[..] else {
            return None;
        };
        check_worker_name(worker).ok()?;
        let best = if id == "none" {
            None
        } else {
            Some(AliveEntry {
                id: IndividualId::parse(id).ok()?,
                fitness: parse_fitness(fitness)?,
            })
        };
        Some(Self {
            worker: worker.to_string(),
            trained: trained.parse().ok()?,
            flops: mflops.parse::<u64>().ok()? as f64 * 1e6,
            seconds: ms.parse::<u64>().ok()? as f64 / 1e3,
            best,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_keys_round_trip() {
        let entry = ProgressEntry {
            worker: "trainer-abc-0".into(),
            trained: 12,
            flops: 3.5e12,
            seconds: 81.25,
            best: Some(AliveEntry {
                id: IndividualId::parse("18c-00ff").unwrap(),
                fitness: 0.4375,
            }),
        };
        let back = ProgressEntry::parse(&entry.key()).unwrap();
        assert_eq!(back, entry);
        assert!(ProgressEntry::parse("progress/../x@1@2@3@0@none").is_none());
    }

    #[test]
    fn alive_keys_round_trip() {
        let entry = AliveEntry {
            id: IndividualId::parse("18c-00ff").unwrap(),
            fitness: 0.5,
        };
        assert_eq!(AliveEntry::parse(&entry.key()), Some(entry));
        for foreign in ["alive/x", "alive/18c@2", "alive/A@0.5", "dead/18c@0.5"] {
            assert_eq!(AliveEntry::parse(foreign), None, "{foreign}");
        }
    }
}
