//! Every random choice of a run flows from one seed, split into independent streams so that,
//! say, changing the number of training steps does not change which mutation was drawn.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The things that draw random numbers. Each gets its own ChaCha stream of the same seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Mutation = 1,
    Initialisation = 2,
    Training = 3,
    Split = 4,
    Selection = 5,
}

/// A generator for `stream` of `seed`; ChaCha is specified, so runs repeat across platforms
/// and library versions (unlike `StdRng`).
pub fn rng(seed: u64, stream: Stream) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream as u64);
    rng
}

/// The seed of worker `index` of an experiment seeded `seed`: SplitMix64 of the pair, so that
/// neighbouring seeds and indices give unrelated workers.
pub fn worker_seed(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_repeat_and_differ() {
        let a: u64 = rng(7, Stream::Mutation).random();
        let b: u64 = rng(7, Stream::Mutation).random();
        let c: u64 = rng(7, Stream::Training).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
