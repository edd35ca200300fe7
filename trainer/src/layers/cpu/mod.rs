//! CPU kernels for the layers that dominate training time, as Candle custom ops with their
//! own backward passes: convolution (im2col + GEMM, or Winograd for 3- and 5-tap filters at stride 1) and
//! batch norm fused with its ReLU.
//! Their CUDA counterparts are in `layers::gpu`.

/// Compiles an element-wise kernel (a free function) three times, for AVX-512, AVX2 and the
/// SSE2 baseline, and picks the best the CPU has at run time. `gemm` does this for its own
/// kernels; ours otherwise compile for SSE2 only, since a binary built for AVX2 would die
/// with SIGILL on a CPU without it. Floating-point results do not depend on the clone:
/// without fast-math, LLVM keeps the source's order of operations and never fuses a
/// multiply and an add.
macro_rules! vectorised {
    ($kernel:item) => {
        #[multiversion::multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
            "x86_64+avx2+fma"
        ))]
        $kernel
    };
}

pub mod batch_norm;
pub mod conv;
pub mod cross_entropy;
pub mod linear;
pub mod skip;
mod winograd;

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::{CpuStorage, Layout, Result};
use rayon::prelude::*;

/// The f32 data of a contiguous tensor.
pub(crate) fn contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: only f32 tensors are supported");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous"),
    }
}

/// A vector of `len` floats written in parallel by `write(index, chunk)`, over chunks of
/// `chunk` floats (the last one may be shorter), without zeroing it first as
/// `vec![0.0; len]` does. For the megabyte outputs of convolution and batch norm, that zeroing
/// was a pass over memory of its own, evicting the lines the write then brought back.
///
/// # Safety
/// `write` must write every element of every chunk it is given.
pub(crate) unsafe fn par_written(
    len: usize,
    chunk: usize,
    write: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    // SAFETY: passed on to the caller.
    unsafe { par_written_then(len, chunk, &[], write) }
}

/// [`par_written`], followed by `tail`: for outputs that pack a few per-channel values after
/// the tensor.
///
/// # Safety
/// `write` must write every element of every chunk it is given.
pub(crate) unsafe fn par_written_then(
    len: usize,
    chunk: usize,
    tail: &[f32],
    write: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len + tail.len());
    let (body, rest) = out.spare_capacity_mut()[..len + tail.len()].split_at_mut(len);
    body.par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(index, chunk)| write(index, chunk));
    for (slot, &v) in rest.iter_mut().zip(tail) {
        slot.write(v);
    }
    // SAFETY: the chunks cover `..len` and the caller guarantees that each was written; the
    // tail was written above. A panic in `write` never gets here, and the vector is dropped
    // empty.
    unsafe { out.set_len(len + tail.len()) };
    out
}

/// `chunk` as the floats it holds.
///
/// # Safety
/// Every element of `chunk` must have been written.
pub(crate) unsafe fn assume_written(chunk: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    // SAFETY: MaybeUninit<f32> has f32's layout, and the caller guarantees initialisation.
    unsafe { &mut *(chunk as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

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

/// Runs `f` on this thread's scratch buffer of `len` floats, whose contents are whatever an
/// earlier user left: for column matrices, which are written whole before they are read.
///
/// A fresh zeroed buffer per image (or per rayon split) cost a megabyte-sized memset each
/// time. Each thread keeps the largest buffer it was asked for. `f` must not call back into
/// rayon or into another user of the buffer; if it does, the inner call gets its own buffer.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            f(&mut buffer[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
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
    fn add_into(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

/// A matrix for `gemm`: data with a row stride and a column stride, so that a row-major
/// matrix and its transpose are both operands without a copy.
pub(crate) struct GemmOperand<'a> {
    data: &'a [f32],
    row_stride: usize,
    column_stride: usize,
}

impl<'a> GemmOperand<'a> {
    /// A row-major matrix with `columns` columns.
    pub fn row_major(data: &'a [f32], columns: usize) -> Self {
        Self {
            data,
            row_stride: columns,
            column_stride: 1,
        }
    }

    /// The transpose of a row-major matrix that has `columns` columns.
    pub fn transposed(data: &'a [f32], columns: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            column_stride: columns,
        }
    }

    fn extent(&self, rows: usize, columns: usize) -> usize {
        (rows - 1) * self.row_stride + (columns - 1) * self.column_stride + 1
    }

    /// `out` [m×n], row-major, becomes `self` [m×k] · `rhs` [k×n], added to what it held if
    /// `accumulate`. Single-threaded: callers parallelise over images.
    pub fn times(
        &self,
        rhs: &GemmOperand,
        out: &mut [f32],
        m: usize,
        n: usize,
        k: usize,
        accumulate: bool,
    ) {
        self.times_strided(rhs, out, (n, 1), (m, n, k), accumulate)
    }

    /// [`Self::times`] into an `out` whose rows are `strides.0` apart and whose columns
    /// `strides.1`: (1, m) stores the product transposed, and (n + pad, 1) leaves a gap
    /// after each row.
    pub fn times_strided(
        &self,
        rhs: &GemmOperand,
        out: &mut [f32],
        strides: (usize, usize),
        (m, n, k): (usize, usize, usize),
        accumulate: bool,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let out_extent = (m - 1) * strides.0 + (n - 1) * strides.1 + 1;
        assert!(out.len() >= out_extent, "gemm: output too short");
        if k == 0 {
            if !accumulate {
                for r in 0..m {
                    for c in 0..n {
                        out[r * strides.0 + c * strides.1] = 0.0;
                    }
                }
            }
            return;
        }
        assert!(
            self.data.len() >= self.extent(m, k),
            "gemm: left operand too short"
        );
        assert!(
            rhs.data.len() >= rhs.extent(k, n),
            "gemm: right operand too short"
        );
        // SAFETY: the extents checked above keep every access inside the three slices, and
        // `out` does not alias the operands (it is borrowed mutably).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                strides.1 as isize,
                strides.0 as isize,
                accumulate,
                self.data.as_ptr(),
                self.column_stride as isize,
                self.row_stride as isize,
                rhs.data.as_ptr(),
                rhs.column_stride as isize,
                rhs.row_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// The largest absolute difference between two tensors of one shape, for the tests that
/// compare a kernel with Candle's composed operations.
#[cfg(test)]
pub(crate) fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(candle_core::D::Minus1))
        .and_then(|d| d.to_scalar())
        .expect("tensors of one shape")
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
