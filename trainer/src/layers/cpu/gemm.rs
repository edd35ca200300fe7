//! Matrix products through the `gemm` crate (its AVX-512/AVX2 kernels, chosen at run time),
//! with operands described by strides so that a matrix and its transpose need no copy.

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
