//! Element-wise loops written so that the compiler vectorises them, each compiled for
//! AVX-512, AVX2 and SSE2 (`vectorised!`) and chosen at run time.

vectorised! {
    /// `dst` [cols×rows] becomes the transpose of `src` [rows×cols], both row-major: for
    /// weight gradients that a GEMM computed in the faster orientation, and for channels-last
    /// copies. In blocks of 16×16 through a local array, so that both sides are read and
    /// written whole rows of 16 at a time rather than one float per cache line on the
    /// strided side.
    pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
        const B: usize = 16;
        let (src, dst) = (&src[..rows * cols], &mut dst[..rows * cols]);
        let (full_rows, full_cols) = (rows / B * B, cols / B * B);
        let mut block = [[0f32; B]; B];
        for r0 in (0..full_rows).step_by(B) {
            for c0 in (0..full_cols).step_by(B) {
                for (r, line) in block.iter_mut().enumerate() {
                    line.copy_from_slice(&src[(r0 + r) * cols + c0..][..B]);
                }
                for c in 0..B {
                    let out: &mut [f32; B] = (&mut dst[(c0 + c) * rows + r0..][..B])
                        .try_into()
                        .expect("a block row");
                    for r in 0..B {
                        out[r] = block[r][c];
                    }
                }
            }
        }
        // The edges: the last rows, and the last columns of the other rows.
        for r in 0..rows {
            let from = if r < full_rows { full_cols } else { 0 };
            for c in from..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
}

/// Σ f(x) over a slice in eight independent lanes, which the compiler turns into vector
/// instructions (a single running sum would serialise every addition).
#[inline]
pub(crate) fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (chunks, tail) = xs.as_chunks::<8>();
    for chunk in chunks {
        for l in 0..8 {
            acc[l] += f(chunk[l]);
        }
    }
    acc.iter().sum::<f32>() + tail.iter().map(|&v| f(v)).sum::<f32>()
}

vectorised! {
    /// dst += src, element by element.
    pub(crate) fn add_into(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole blocks of 16 and the edges past them, on both axes.
    #[test]
    fn transpose_moves_every_element() {
        for (rows, cols) in [
            (1, 1),
            (3, 5),
            (16, 16),
            (32, 1024),
            (17, 33),
            (40, 7),
            (7, 40),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }
}
