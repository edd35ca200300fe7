//! CIFAR-10 and CIFAR-100 in their official binary formats, split as in §3.4: 45,000
//! training and 5,000 validation images (a fixed, seeded split of the 50,000), and the test
//! set kept apart in [`test_set`], which training and selection never touch (§3.7).

mod augment;
mod cifar;
pub mod fixture;
pub mod source;
pub mod test_set;

pub use augment::{evaluation_batches, Batch, Normalization, TrainingBatches};
pub use cifar::{BinaryFormat, DataError, Images, IMAGE_BYTES};

use std::path::Path;

use crds::{Dataset, ValidatedSpec};
use rand::seq::SliceRandom;

use population::seed::{self, Stream};

/// The images evolution may look at: training and validation, never test.
#[derive(Clone, Debug)]
pub struct Split {
    pub kind: Dataset,
    pub train: Images,
    pub validation: Images,
    /// Per-channel statistics of the training images, used for every image the models see.
    pub normalization: Normalization,
}

impl Split {
    /// Loads the training files of `kind` from `dir` and holds out `validation` images
    /// (default: a tenth, which is the paper's 5,000 of 50,000) chosen by `seed`.
    pub fn load(
        dir: &Path,
        kind: Dataset,
        seed: u64,
        validation: Option<usize>,
    ) -> Result<Self, DataError> {
        let all = cifar::read_training(dir, kind)?;
        Self::from_images(all, kind, seed, validation)
    }

    /// The split an experiment evolves on: its data set, held out by its split seed (not its
    /// evolution seed: every repeat of a study validates on the same images).
    pub fn for_spec(spec: &ValidatedSpec, dir: &Path) -> Result<Self, DataError> {
        let validation = spec.data.validation_images.map(|v| v as usize);
        Self::load(dir, spec.data.dataset, spec.data.split_seed, validation)
    }

    pub fn from_images(
        all: Images,
        kind: Dataset,
        seed: u64,
        validation: Option<usize>,
    ) -> Result<Self, DataError> {
        let total = all.len();
        let validation = validation.unwrap_or(total / 10);
        if validation == 0 || validation >= total {
            return Err(DataError::Split { validation, total });
        }
        let mut order: Vec<usize> = (0..total).collect();
        order.shuffle(&mut seed::rng(seed, Stream::Split));
        let (val_idx, train_idx) = order.split_at(validation);
        let train = all.select(train_idx);
        let validation = all.select(val_idx);
        let normalization = Normalization::of(&train);
        Ok(Self {
            kind,
            train,
            validation,
            normalization,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_disjoint_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        fixture::write(dir.path(), Dataset::Cifar10, 40, 0).unwrap();
        let a = Split::load(dir.path(), Dataset::Cifar10, 1, None).unwrap();
        let b = Split::load(dir.path(), Dataset::Cifar10, 1, None).unwrap();
        let c = Split::load(dir.path(), Dataset::Cifar10, 2, None).unwrap();
        assert_eq!(a.train.len(), 180);
        assert_eq!(a.validation.len(), 20);
        assert_eq!(a.validation.labels, b.validation.labels);
        assert_eq!(a.validation.pixels, b.validation.pixels);
        assert_ne!(a.validation.pixels, c.validation.pixels);
        // Every image lands on exactly one side.
        let all = cifar::read_training(dir.path(), Dataset::Cifar10).unwrap();
        let mut seen: Vec<&[u8]> = a
            .train
            .iter()
            .chain(a.validation.iter())
            .map(|(p, _)| p)
            .collect();
        let mut expected: Vec<&[u8]> = all.iter().map(|(p, _)| p).collect();
        seen.sort();
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn repeats_with_different_seeds_share_one_validation_split() {
        let dir = tempfile::tempdir().unwrap();
        fixture::write(dir.path(), Dataset::Cifar10, 40, 0).unwrap();
        let spec = |seed: u64, split_seed: u64| {
            let spec: crds::EvolutionExperimentSpec = serde_json::from_value(serde_json::json!({
                "seed": seed, "data": { "splitSeed": split_seed }, "store": { "url": "file:///x" }
            }))
            .unwrap();
            crds::validate(&spec).unwrap()
        };
        let a = Split::for_spec(&spec(1, 0), dir.path()).unwrap();
        let b = Split::for_spec(&spec(2, 0), dir.path()).unwrap();
        let c = Split::for_spec(&spec(1, 5), dir.path()).unwrap();
        assert_eq!(a.validation.pixels, b.validation.pixels);
        assert_ne!(a.validation.pixels, c.validation.pixels);
    }

    #[test]
    fn split_that_leaves_nothing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        fixture::write(dir.path(), Dataset::Cifar10, 2, 0).unwrap();
        let err = Split::load(dir.path(), Dataset::Cifar10, 1, Some(10)).unwrap_err();
        assert!(err.to_string().contains("validation"), "{err}");
    }
}
