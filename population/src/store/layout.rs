//! Which key holds what, and the keys that carry values of their own.
//!
//! ```text
//! experiment.json                        the spec and start time, written once, create-only
//! slots/<k>                              claim of initial-population slot k, create-only
//! individuals/<id>/individual.json       DNA, lineage and outcome (kept after death)
//! individuals/<id>/weights.safetensors   deleted when the individual dies
//! alive/<id>@<fitness>[@kept]            written last: the individual exists from here on;
//!                                        `kept` marks one that was the best its parent's
//!                                        worker had seen, whose weights outlive it
//! dead/<id>                              the kill, create-only: exactly one worker wins it
//! holes/<vacancy>@<worker>@<deadline>@<ticket>@<child>
//!                                        a worker's lease on a vacancy it is filling,
//!                                        renewed while it trains; an expired one is adopted
//! filled/<vacancy>                       the fill, create-only: exactly one child fills it
//! tickets/<n>                            claim of the n-th training of a bounded run
//! progress/<worker>@<trained>@<mflops>@<ms>@<best fitness>@<best id>
//!                                        each worker's running totals, replaced as they grow
//! control/stop                           the stop marker, create-only
//! evaluation/<id>.json                   test accuracy of an individual
//! evaluation/reported.json               the one the experiment reports (the best readable)
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
pub const INTERVENTIONS: &str = "control/interventions/";
/// Which Kubernetes object owns the store (see [`StoreOwner`](super::StoreOwner)).
pub const OWNER: &str = "control/owner";
pub const EVALUATION: &str = "evaluation/";
pub const REPORTED: &str = "evaluation/reported.json";
pub const HOLES: &str = "holes/";
pub const FILLED: &str = "filled/";
pub const TICKETS: &str = "tickets/";

/// Every prefix under which the experiment keeps objects (besides [`EXPERIMENT`]).
pub const PREFIXES: [&str; 10] = [
    ALIVE,
    DEAD,
    SLOTS,
    PROGRESS,
    CONTROL,
    EVALUATION,
    HOLES,
    FILLED,
    TICKETS,
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

pub fn ticket_key(ticket: u64) -> String {
    format!("{TICKETS}{ticket}")
}

/// A place in the population that a child is to fill: an initial slot, or the place of an
/// individual that was killed. Each is filled exactly once (`filled/<vacancy>` is
/// create-only), so a vacancy that two workers fill, one after a crash of the other, still
/// makes one individual.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vacancy {
    Slot(u32),
    /// The place of this individual, killed in a tournament.
    Replacing(IndividualId),
}

impl Vacancy {
    /// Ids never hold a '.', so `slot.<k>` cannot be one.
    pub fn parse(text: &str) -> Option<Self> {
        match text.strip_prefix("slot.") {
            Some(k) => k.parse().ok().map(Vacancy::Slot),
            None => IndividualId::parse(text).ok().map(Vacancy::Replacing),
        }
    }

    pub fn filled_key(&self) -> String {
        format!("{FILLED}{self}")
    }
}

impl std::fmt::Display for Vacancy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Vacancy::Slot(k) => write!(f, "slot.{k}"),
            Vacancy::Replacing(id) => write!(f, "{id}"),
        }
    }
}

/// A worker's lease on a vacancy, as its `holes/` key shows it: who fills it, until when (Unix
/// ms; the holder renews it while it trains), the ticket of a bounded run it holds, and the
/// id of the child it trains (so that the sweeper leaves that child's objects alone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub vacancy: Vacancy,
    pub worker: String,
    pub deadline_ms: u64,
    pub ticket: Option<u64>,
    pub child: IndividualId,
}

impl Lease {
    pub fn key(&self) -> String {
        let ticket = self
            .ticket
            .map_or_else(|| "none".to_string(), |t| t.to_string());
        format!(
            "{HOLES}{}@{}@{}@{ticket}@{}",
            self.vacancy, self.worker, self.deadline_ms, self.child
        )
    }

    /// The lease a `holes/` key names, if it is one.
    pub fn parse(key: &str) -> Option<Self> {
        let parts: Vec<&str> = key.strip_prefix(HOLES)?.split('@').collect();
        let [vacancy, worker, deadline, ticket, child] = parts[..] else {
            return None;
        };
        check_worker_name(worker).ok()?;
        Some(Self {
            vacancy: Vacancy::parse(vacancy)?,
            worker: worker.to_string(),
            deadline_ms: deadline.parse().ok()?,
            ticket: match ticket {
                "none" => None,
                t => Some(t.parse().ok()?),
            },
            child: IndividualId::parse(child).ok()?,
        })
    }
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
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AliveEntry {
    pub id: IndividualId,
    pub fitness: f64,
    /// Its weights are kept after its death: when it was born it was the best individual its
    /// worker had seen, so a record of the best-so-far over time can still measure it.
    pub kept: bool,
    /// The weight-reset epoch (§5) its weights were trained in: after a reset, an individual
    /// of an earlier epoch is retrained before any tournament compares it again, so workers
    /// must tell it apart from the listing alone.
    pub epoch: u32,
}

impl AliveEntry {
    pub fn new(id: IndividualId, fitness: f64) -> Self {
        Self {
            id,
            fitness,
            kept: false,
            epoch: 0,
        }
    }

    pub fn key(&self) -> String {
        let kept = if self.kept { "@kept" } else { "" };
        let epoch = if self.epoch > 0 {
            format!("@r{}", self.epoch)
        } else {
            String::new()
        };
        format!("{}{kept}{epoch}", alive_key(&self.id, self.fitness))
    }

    /// The entry an `alive/` key names, if it is one.
    pub fn parse(key: &str) -> Option<Self> {
        let mut parts = key.strip_prefix(ALIVE)?.split('@');
        let id = IndividualId::parse(parts.next()?).ok()?;
        let fitness = parse_fitness(parts.next()?)?;
        let mut entry = Self::new(id, fitness);
        for part in parts {
            match part {
                "kept" if !entry.kept => entry.kept = true,
                _ => entry.epoch = part.strip_prefix('r')?.parse().ok()?,
            }
        }
        Some(entry)
    }
}

fn alive_key(id: &IndividualId, fitness: f64) -> String {
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
            Some(AliveEntry::new(
                IndividualId::parse(id).ok()?,
                parse_fitness(fitness)?,
            ))
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
            best: Some(AliveEntry::new(
                IndividualId::parse("18c-00ff").unwrap(),
                0.4375,
            )),
        };
        let back = ProgressEntry::parse(&entry.key()).unwrap();
        assert_eq!(back, entry);
        assert!(ProgressEntry::parse("progress/../x@1@2@3@0@none").is_none());
    }

    #[test]
    fn alive_keys_round_trip() {
        let mut entry = AliveEntry::new(IndividualId::parse("18c-00ff").unwrap(), 0.5);
        assert_eq!(AliveEntry::parse(&entry.key()), Some(entry.clone()));
        entry.kept = true;
        assert_eq!(entry.key(), "alive/18c-00ff@0.500000@kept");
        assert_eq!(AliveEntry::parse(&entry.key()), Some(entry.clone()));
        entry.epoch = 3;
        assert_eq!(entry.key(), "alive/18c-00ff@0.500000@kept@r3");
        assert_eq!(AliveEntry::parse(&entry.key()), Some(entry.clone()));
        entry.kept = false;
        assert_eq!(AliveEntry::parse(&entry.key()), Some(entry));
        for foreign in [
            "alive/x",
            "alive/18c@2",
            "alive/A@0.5",
            "dead/18c@0.5",
            "alive/18c@0.5@other",
            "alive/18c@0.5@kept@kept",
            "alive/18c@0.5@r",
        ] {
            assert_eq!(AliveEntry::parse(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn leases_round_trip_and_vacancies_are_unambiguous() {
        for vacancy in [
            Vacancy::Slot(7),
            Vacancy::Replacing(IndividualId::parse("18c-00ff").unwrap()),
        ] {
            let lease = Lease {
                vacancy: vacancy.clone(),
                worker: "local-0".into(),
                deadline_ms: 1234,
                ticket: Some(3),
                child: IndividualId::parse("18d-0001").unwrap(),
            };
            assert_eq!(Lease::parse(&lease.key()), Some(lease.clone()));
            let lease = Lease {
                ticket: None,
                ..lease
            };
            assert_eq!(Lease::parse(&lease.key()), Some(lease));
            assert_eq!(Vacancy::parse(&vacancy.to_string()), Some(vacancy));
        }
        assert_eq!(Vacancy::parse("slot.x"), None);
        assert_eq!(Lease::parse("holes/slot.1@w@1@none"), None);
    }
}
