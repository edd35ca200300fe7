//! The geometry of a convolution, shared by every implementation (CPU, CUDA, cuDNN), so that
//! they all size their output, and refuse impossible shapes, the same way.

use candle_core::Result;

/// Stride and zero padding (per side) of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub stride: usize,
    pub pad_h: usize,
    pub pad_w: usize,
}

impl Geometry {
    /// The output's height and width for `input` [N, Cin, H, W] and `kernel`
    /// [Cout, Cin, kh, kw]; an error where the channels disagree, the stride is 0 or the filter
    /// does not fit the padded input. Every convolution path (CPU, GPU, cuDNN) sizes its
    /// output here.
    pub fn output_size(
        &self,
        input: (usize, usize, usize, usize),
        kernel: (usize, usize, usize, usize),
    ) -> Result<(usize, usize)> {
        let (_, cin, h, w) = input;
        let (_, kcin, kh, kw) = kernel;
        if kcin != cin {
            candle_core::bail!("conv2d: input has {cin} channels, kernel expects {kcin}");
        }
        if self.stride == 0 || h + 2 * self.pad_h < kh || w + 2 * self.pad_w < kw {
            candle_core::bail!(
                "conv2d: a {kh}x{kw} filter at stride {} does not fit a padded {h}x{w} input",
                self.stride
            );
        }
        Ok((
            (h + 2 * self.pad_h - kh) / self.stride + 1,
            (w + 2 * self.pad_w - kw) / self.stride + 1,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes that no convolution can have are errors, not panics (a stride of 0 divided by
    /// zero on the CPU path before `output_size` was shared).
    #[test]
    fn impossible_sizes_are_errors() {
        let g = |stride| Geometry {
            stride,
            pad_h: 1,
            pad_w: 1,
        };
        assert_eq!(
            g(2).output_size((1, 3, 8, 7), (4, 3, 3, 3)).unwrap(),
            (4, 4)
        );
        assert!(g(0).output_size((1, 3, 8, 8), (4, 3, 3, 3)).is_err());
        assert!(g(1).output_size((1, 3, 8, 8), (4, 2, 3, 3)).is_err());
        assert!(g(1).output_size((1, 3, 2, 2), (4, 3, 5, 3)).is_err());
    }
}
