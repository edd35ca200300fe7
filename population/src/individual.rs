//! An individual as stored: its DNA, how it was made (lineage) and what training it gave
//! (result). One JSON object, so a worker reads a parent with one GET; it stays behind as the
//! lineage record when the individual dies and its weights are collected.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::dna::Dna;
use crate::mutation::AppliedMutation;

pub const FORMAT_VERSION: u32 = 1;

/// Text that is not an individual id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not an individual id")]
pub struct InvalidId {
    pub text: String,
}

/// An individual's id: the birth time in milliseconds (hex, so ids sort by time) and 32
/// random bits. Only these characters ever reach a store key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IndividualId(String);

impl IndividualId {
    pub fn new() -> Self {
        Self(format!("{:011x}-{:08x}", now_ms(), rand::random::<u32>()))
    }

    /// Accepts 1-64 characters of lower-case letters, digits and '-'.
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(InvalidId {
                text: s.to_string(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// When the id was made (Unix ms), for ids made by [`IndividualId::new`].
    pub fn created_ms(&self) -> Option<u64> {
        let (time, _) = self.0.split_once('-')?;
        u64::from_str_radix(time, 16).ok()
    }
}

impl Default for IndividualId {
    fn default() -> Self {
        Self::new()
    }
}

impl TryFrom<String> for IndividualId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        Self::parse(&s)
    }
}

impl From<IndividualId> for String {
    fn from(id: IndividualId) -> String {
        id.0
    }
}

impl fmt::Display for IndividualId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How an individual came to be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// `None` for the initial population.
    pub parent: Option<IndividualId>,
    /// The initial-population slot it filled, if any.
    pub slot: Option<u32>,
    pub mutations: Vec<AppliedMutation>,
    /// Seeds the mutations, the initialisation of new tensors and the training data order.
    pub seed: u64,
    pub worker: String,
    /// Tensors taken from the parent and tensors initialised afresh.
    pub inherited_tensors: usize,
    pub fresh_tensors: usize,
    /// The mutation rate it was born under (§5: a schedule or an intervention may change it).
    #[serde(default = "one")]
    pub mutation_rate: u32,
    /// How many population-wide weight resets had happened when it was born.
    #[serde(default)]
    pub reset_epoch: u32,
    /// A retraining of its parent's DNA from fresh weights after a reset, not a mutation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retrained: bool,
}

fn one() -> u32 {
    1
}

/// What training and evaluation gave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The fitness (§3.1).
    pub validation_accuracy: f64,
    pub validation_correct: usize,
    pub validation_total: usize,
    pub steps: u64,
    pub diverged: bool,
    /// Mean training loss over the first and the last 50 steps; absent when not finite.
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    /// F_t·N_t·E + F_v·N_v (§3.5).
    pub flops: f64,
    pub parameters: usize,
    pub convolutions: usize,
    pub training_seconds: f64,
    pub evaluation_seconds: f64,
    /// Everything else the reproduction took: store requests, model building, waiting.
    pub overhead_seconds: f64,
    /// Trained with TF32 matrix products (CUDA only).
    #[serde(default)]
    pub tf32: bool,
    /// The device it trained on (`cpu`, `cuda:0`).
    #[serde(default)]
    pub device: String,
    /// Why it could not be trained (a model too large for the device, a training error):
    /// such an individual has fitness 0 and no weights, and loses its next tournament.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Individual {
    pub format_version: u32,
    pub id: IndividualId,
    pub dna: Dna,
    pub lineage: Lineage,
    pub outcome: Outcome,
    /// When its worker started on it and when it became alive, in Unix milliseconds.
    pub started_at_ms: u64,
    pub born_at_ms: u64,
    /// Born the best its worker had seen: its weights are kept after its death.
    #[serde(default)]
    pub kept: bool,
}

impl Individual {
    pub fn fitness(&self) -> f64 {
        self.outcome.validation_accuracy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe_unique_and_sort_by_time() {
        let a = IndividualId::new();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = IndividualId::new();
        assert!(a < b);
        assert!(IndividualId::parse(a.as_str()).is_ok());
        for bad in ["", "../x", "A", "a/b", "a@b"] {
            assert!(IndividualId::parse(bad).is_err());
        }
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<IndividualId>(&json).unwrap(), a);
        assert!(serde_json::from_str::<IndividualId>("\"../../etc\"").is_err());
    }
}

/// The one order in which every reader ranks individuals, so that the operator's status and
/// the final evaluation name the same best individual: higher validation accuracy as store
/// keys write it (six decimals, so that a key and a record never disagree), then the earlier
/// id (ids begin with their birth time), so that ties have one winner.
pub fn rank(a: (f64, &IndividualId), b: (f64, &IndividualId)) -> std::cmp::Ordering {
    let micro = |f: f64| (f * 1e6).round() as i64;
    micro(a.0).cmp(&micro(b.0)).then_with(|| b.1.cmp(a.1))
}

#[cfg(test)]
mod rank_tests {
    use super::*;

    #[test]
    fn ties_go_to_the_earlier_id() {
        let early = IndividualId::parse("18f00000000-00000001").unwrap();
        let late = IndividualId::parse("18f00000001-00000001").unwrap();
        let best = [(0.75, &late), (0.75, &early), (0.5, &early)]
            .into_iter()
            .max_by(|a, b| rank(*a, *b))
            .unwrap();
        assert_eq!(best.1, &early);
        // Within the precision keys keep, a record's extra digits do not decide.
        assert_eq!(
            rank((0.7500001, &late), (0.75, &early)),
            std::cmp::Ordering::Less
        );
        assert_eq!(
            rank((0.76, &late), (0.75, &early)),
            std::cmp::Ordering::Greater
        );
    }
}
