//! Turning stored bytes into normalised float batches, with the training augmentation of
//! He et al. (2016) that §3.4 uses: pad by 4 pixels, crop a random 32x32 window, flip
//! horizontally with probability 1/2.

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::cifar::{Images, IMAGE_BYTES};
use population::seed::{self, Stream};

const SIDE: usize = 32;
const PLANE: usize = SIDE * SIDE;
const PAD: i32 = 4;

/// Per-channel mean and standard deviation of the training images, on the [0, 1] scale.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    pub fn of(images: &Images) -> Self {
        let mut sum = [0f64; 3];
        let mut sq = [0f64; 3];
        for (pixels, _) in images.iter() {
            for c in 0..3 {
                for &p in &pixels[c * PLANE..(c + 1) * PLANE] {
                    let v = f64::from(p) / 255.0;
                    sum[c] += v;
                    sq[c] += v * v;
                }
            }
        }
        let n = (images.len() * PLANE).max(1) as f64;
        let mut out = Normalization {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        for c in 0..3 {
            let mean = sum[c] / n;
            let var = (sq[c] / n - mean * mean).max(0.0);
            out.mean[c] = mean as f32;
            // A constant channel (possible in synthetic data) would divide by zero.
            out.std[c] = (var.sqrt() as f32).max(1e-3);
        }
        out
    }

    /// The normalised value of every byte value, per channel.
    fn table(&self) -> [[f32; 256]; 3] {
        let mut t = [[0f32; 256]; 3];
        for (c, row) in t.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        t
    }
}

/// One batch: images `[n, 3, 32, 32]` f32 and labels `[n]` u32.
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
}

/// An endless stream of augmented training batches: a fresh seeded permutation every epoch,
/// so every image is seen once per epoch.
pub struct TrainingBatches<'a> {
    images: &'a Images,
    table: [[f32; 256]; 3],
    order: Vec<u32>,
    cursor: usize,
    rng: ChaCha8Rng,
    augment: bool,
    pixels: Vec<f32>,
    labels: Vec<u32>,
}

impl<'a> TrainingBatches<'a> {
    pub fn new(
        images: &'a Images,
        normalization: &Normalization,
        seed: u64,
        augment: bool,
    ) -> Self {
        Self {
            images,
            table: normalization.table(),
            order: Vec::new(),
            cursor: 0,
            rng: seed::rng(seed, Stream::Training),
            augment,
            pixels: Vec::new(),
            labels: Vec::new(),
        }
    }

    pub fn next_batch(&mut self, size: usize, device: &Device) -> candle_core::Result<Batch> {
        self.pixels.clear();
        self.labels.clear();
        self.pixels.reserve(size * IMAGE_BYTES);
        for _ in 0..size {
            if self.cursor == self.order.len() {
                self.order = (0..self.images.len() as u32).collect();
                rand::seq::SliceRandom::shuffle(self.order.as_mut_slice(), &mut self.rng);
                self.cursor = 0;
            }
            let index = self.order[self.cursor] as usize;
            self.cursor += 1;
            let (dy, dx, flip) = if self.augment {
                (
                    self.rng.random_range(-PAD..=PAD) as isize,
                    self.rng.random_range(-PAD..=PAD) as isize,
                    self.rng.random_bool(0.5),
                )
            } else {
                (0, 0, false)
            };
            push_image(
                &mut self.pixels,
                self.images.image(index),
                &self.table,
                dy,
                dx,
                flip,
            );
            self.labels.push(self.images.labels[index]);
        }
        Ok(Batch {
            images: Tensor::from_slice(&self.pixels, (size, 3, SIDE, SIDE), device)?,
            labels: Tensor::from_slice(&self.labels, size, device)?,
        })
    }
}

/// Appends one image shifted by (dy, dx) — the crop of the padded image — and optionally
/// mirrored. Pixels from the padding are 0 after normalisation, i.e. the mean colour.
fn push_image(
    out: &mut Vec<f32>,
    image: &[u8],
    table: &[[f32; 256]; 3],
    dy: isize,
    dx: isize,
    flip: bool,
) {
    for (c, lut) in table.iter().enumerate() {
        let plane = &image[c * PLANE..(c + 1) * PLANE];
        for y in 0..SIDE as isize {
            let sy = y + dy;
            if !(0..SIDE as isize).contains(&sy) {
                out.extend(std::iter::repeat_n(0.0, SIDE));
                continue;
            }
            let row = &plane[sy as usize * SIDE..(sy as usize + 1) * SIDE];
            for x in 0..SIDE as isize {
                let x = if flip { SIDE as isize - 1 - x } else { x };
                let sx = x + dx;
                out.push(if (0..SIDE as isize).contains(&sx) {
                    lut[usize::from(row[sx as usize])]
                } else {
                    0.0
                });
            }
        }
    }
}

/// Unaugmented batches over all of `images`, in order, for evaluation.
pub fn evaluation_batches<'a>(
    images: &'a Images,
    normalization: &Normalization,
    size: usize,
    device: &'a Device,
) -> impl Iterator<Item = candle_core::Result<Batch>> + 'a {
    let table = normalization.table();
    (0..images.len()).step_by(size.max(1)).map(move |start| {
        let n = size.min(images.len() - start);
        let mut pixels = Vec::with_capacity(n * IMAGE_BYTES);
        for i in start..start + n {
            push_image(&mut pixels, images.image(i), &table, 0, 0, false);
        }
        Ok(Batch {
            images: Tensor::from_vec(pixels, (n, 3, SIDE, SIDE), device)?,
            labels: Tensor::from_slice(&images.labels[start..start + n], n, device)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_image() -> (Images, Normalization) {
        // Pixel value = x coordinate, on all channels.
        let mut pixels = Vec::new();
        for _ in 0..3 {
            for _y in 0..SIDE {
                pixels.extend((0..SIDE as u8).map(|x| x + 1));
            }
        }
        let images = Images {
            pixels,
            labels: vec![3],
        };
        let identity = Normalization {
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
        };
        (images, identity)
    }

    #[test]
    fn crop_and_flip_move_pixels_and_pad_with_the_mean() {
        let (images, norm) = one_image();
        let table = norm.table();
        let mut out = Vec::new();
        let rounded = |v: &[f32]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
        push_image(&mut out, images.image(0), &table, 0, 2, false);
        assert_eq!(rounded(&out[..3]), vec![3.0, 4.0, 5.0]);
        assert_eq!(out[31], 0.0, "shifted in from the padding");
        out.clear();
        push_image(&mut out, images.image(0), &table, 0, 0, true);
        assert_eq!(rounded(&out[..2]), vec![32.0, 31.0]);
        out.clear();
        push_image(&mut out, images.image(0), &table, -4, 0, false);
        assert!(out[..4 * SIDE].iter().all(|&v| v == 0.0));
        assert_eq!(out[4 * SIDE].round(), 1.0);
    }

    #[test]
    fn epochs_visit_every_image_once() {
        let images = Images {
            pixels: vec![0; 5 * IMAGE_BYTES],
            labels: vec![0, 1, 2, 3, 4],
        };
        let norm = Normalization::of(&images);
        let mut batches = TrainingBatches::new(&images, &norm, 0, true);
        let b = batches.next_batch(5, &Device::Cpu).unwrap();
        let mut labels: Vec<u32> = b.labels.to_vec1().unwrap();
        labels.sort();
        assert_eq!(labels, vec![0, 1, 2, 3, 4]);
        assert!(norm.std.iter().all(|s| s.is_finite() && *s > 0.0));
    }

    #[test]
    fn evaluation_covers_all_images_in_order() {
        let (images, norm) = one_image();
        let total: usize = evaluation_batches(&images, &norm, 7, &Device::Cpu)
            .map(|b| b.unwrap().labels.dim(0).unwrap())
            .sum();
        assert_eq!(total, 1);
    }
}
