//! The test set, kept behind its own type (§3.7): evolution selects by validation accuracy
//! only, and the test accuracy of the best-by-validation individual is measured once, for
//! reporting. Nothing in training or selection takes a [`TestSet`], so reaching for it there
//! is a visible act, not an accident.

use std::path::Path;

use crds::Dataset;

use super::cifar::{self, BinaryFormat, DataError, Images};

pub struct TestSet {
    images: Images,
}

impl TestSet {
    pub fn load(dir: &Path, kind: Dataset) -> Result<Self, DataError> {
        let dir = cifar::resolve(dir, kind);
        Ok(Self {
            images: cifar::read_file(&dir.join(kind.test_file()), kind)?,
        })
    }

    /// The images, for the final evaluation of the reported individual.
    pub fn images_for_reporting(&self) -> &Images {
        &self.images
    }
}
