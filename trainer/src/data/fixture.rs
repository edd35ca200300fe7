//! Small CIFAR-format files for tests and demonstrations, so that nothing in the default test
//! suite needs the real data set. The images are learnable but not trivial: each class has
//! its own colour and stripe pattern, buried in noise.

use std::path::Path;

use rand::Rng;

use crds::Dataset;

use super::cifar::{BinaryFormat, IMAGE_BYTES};
use population::seed::{self, Stream};

/// Writes `records` images into each training file of `kind` and into its test file.
pub fn write(dir: &Path, kind: Dataset, records: usize, seed: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = seed::rng(seed, Stream::Split);
    let test = [kind.test_file()];
    for name in kind.training_files().iter().chain(&test) {
        let mut bytes = Vec::with_capacity(records * kind.record_bytes());
        for _ in 0..records {
            let label = rng.random_range(0..kind.classes());
            if kind == Dataset::Cifar100 {
                bytes.push((label / 5) as u8);
            }
            bytes.push(label as u8);
            bytes.extend(image(label, &mut rng));
        }
        std::fs::write(dir.join(name), bytes)?;
    }
    Ok(())
}

fn image(label: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut pixels = Vec::with_capacity(IMAGE_BYTES);
    let colour = [
        (label * 37) % 256,
        (label * 91 + 40) % 256,
        (label * 53 + 90) % 256,
    ];
    let period = 2 + label % 5;
    for base in colour {
        for y in 0..32 {
            for x in 0..32 {
                let stripe = if ((x + y * (label % 2)) / period).is_multiple_of(2) {
                    40.0
                } else {
                    -40.0
                };
                let noise: f64 = rng.random_range(-90.0..90.0);
                let v = base as f64 * 0.5 + 64.0 + stripe + noise;
                pixels.push(v.clamp(0.0, 255.0) as u8);
            }
        }
    }
    pixels
}
