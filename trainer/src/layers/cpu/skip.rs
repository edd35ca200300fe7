//! A skip connection's contribution to the vertex it enters, `v + fit(s)`, as one op with its
//! own backward pass.
//!
//! `fit` is the resize of §3.2: nearest-neighbour row and column selection, then channels
//! truncated or padded with zeros. Composed from Candle's operations (two `index_select`s, a
//! `pad_with_zeros` and an addition, each a full pass and each with its own backward:
//! `index_add`s into zeroed tensors, a `narrow`), it ran on the calling thread while the
//! other threads waited. Here the forward is one parallel pass over the output planes, and the
//! backward one parallel pass over the source planes.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

use super::{assume_written, contiguous, par_written};

/// Which source pixel each target pixel takes, and how many channels the two share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fit {
    /// For each target row, its source row.
    pub rows: Vec<usize>,
    /// For each target column, its source column.
    pub cols: Vec<usize>,
}

impl Fit {
    /// `Some(k)` where target column x is source column k·x and the source row is exactly k
    /// times as wide, so that every row is a whole number of k-wide chunks.
    fn column_step(&self, source_width: usize) -> Option<usize> {
        let target_width = self.cols.len();
        if target_width == 0 || !source_width.is_multiple_of(target_width) {
            return None;
        }
        let k = source_width / target_width;
        self.cols
            .iter()
            .enumerate()
            .all(|(x, &col)| col == k * x)
            .then_some(k)
    }

    /// Whether the fit keeps every pixel where it is: then a source of the target's shape
    /// passes its gradient on unchanged.
    fn is_identity(&self, source_width: usize) -> bool {
        self.column_step(source_width) == Some(1)
            && self.rows.iter().enumerate().all(|(y, &r)| r == y)
    }

    /// Checks `source` [N, Cs, Hs, Ws] and `target` [N, Ct, Ht, Wt] against the indices.
    fn check(
        &self,
        source: (usize, usize, usize, usize),
        target: (usize, usize, usize, usize),
    ) -> Result<()> {
        let (n, _, hs, ws) = source;
        let (nt, _, ht, wt) = target;
        if n != nt || ht != self.rows.len() || wt != self.cols.len() {
            candle_core::bail!(
                "skip connection: a {source:?} source does not fit a {target:?} target with \
                 {}x{} indices",
                self.rows.len(),
                self.cols.len()
            );
        }
        if self.rows.iter().any(|&r| r >= hs) || self.cols.iter().any(|&c| c >= ws) {
            candle_core::bail!("skip connection: an index lies outside the {hs}x{ws} source");
        }
        Ok(())
    }
}

vectorised! {
    /// `out[x] = v[x] + src[cols[x]]` for one row. Two of the skip model's three skips keep the
    /// size, and the third halves it, so those two cases get loops without indexing, which
    /// vectorise; the indexed loop does not.
    fn add_row(
        out: &mut [MaybeUninit<f32>],
        v: &[f32],
        src: &[f32],
        cols: &[usize],
        step: Option<usize>,
    ) {
        fn stepped<const S: usize>(out: &mut [MaybeUninit<f32>], v: &[f32], src: &[f32]) {
            let (chunks, _) = src.as_chunks::<S>();
            for ((o, &v), chunk) in out.iter_mut().zip(v).zip(chunks) {
                o.write(v + chunk[0]);
            }
        }
        match step {
            Some(1) => {
                for ((o, &v), &s) in out.iter_mut().zip(v).zip(src) {
                    o.write(v + s);
                }
            }
            Some(2) => stepped::<2>(out, v, src),
            Some(4) => stepped::<4>(out, v, src),
            _ => {
                for ((o, &v), &col) in out.iter_mut().zip(v).zip(cols) {
                    o.write(v + src[col]);
                }
            }
        }
    }
}

/// out = v + fit(s); differentiable in both.
pub struct SkipAdd {
    pub fit: Arc<Fit>,
}

impl CustomOp2 for SkipAdd {
    fn name(&self) -> &'static str {
        "cambrian-skip-add"
    }

    cpu_fwd!(self, v @ l1: "skip target", s @ l2: "skip source" => {
        let target = l1.shape().dims4()?;
        let source = l2.shape().dims4()?;
        self.fit.check(source, target)?;
        let (_, ct, ht, wt) = target;
        let (_, cs, hs, ws) = source;
        let plane = ht * wt;
        let step = self.fit.column_step(ws);
        // SAFETY: chunk `index` is plane (n, c) of the target, and every element of it is
        // written, from v alone or from v plus the source pixel.
        let out = unsafe {
            par_written(v.len(), plane, |index, out| {
                let (n, c) = (index / ct, index % ct);
                let v = &v[index * plane..][..plane];
                if c >= cs {
                    for (o, &v) in out.iter_mut().zip(v) {
                        o.write(v);
                    }
                    return;
                }
                let src = &s[(n * cs + c) * hs * ws..][..hs * ws];
                for ((out, v), &row) in out
                    .chunks_exact_mut(wt)
                    .zip(v.chunks_exact(wt))
                    .zip(&self.fit.rows)
                {
                    add_row(out, v, &src[row * ws..][..ws], &self.fit.cols, step);
                }
            })
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    });

    fn bwd(
        &self,
        _v: &Tensor,
        s: &Tensor,
        _out: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = if !s.track_op() {
            None
        } else if s.dims() == dy.dims() && self.fit.is_identity(s.dims4()?.3) {
            // The adjoint would copy dy whole.
            Some(dy.clone())
        } else {
            Some(dy.contiguous()?.apply_op1_no_bwd(&FitAdjoint {
                fit: self.fit.clone(),
                source: s.dims4()?,
            })?)
        };
        Ok((Some(dy.clone()), ds))
    }
}

/// The gradient of the source: every target pixel's gradient added into the source pixel it
/// came from (several, when the fit upsamples), 0 for the source's channels the target lacks.
struct FitAdjoint {
    fit: Arc<Fit>,
    source: (usize, usize, usize, usize),
}

impl CustomOp1 for FitAdjoint {
    fn name(&self) -> &'static str {
        "cambrian-skip-add-source-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = contiguous(storage, layout, "skip output gradient")?;
        let target = layout.shape().dims4()?;
        self.fit.check(self.source, target)?;
        let (n, cs, hs, ws) = self.source;
        let (_, ct, ht, wt) = target;
        let plane = hs * ws;
        // SAFETY: chunk `index` is plane (n, c) of the source, and is zeroed whole before
        // anything is added into it.
        let ds = unsafe {
            par_written(n * cs * plane, plane, |index, ds| {
                for d in ds.iter_mut() {
                    d.write(0.0);
                }
                let ds = assume_written(ds);
                let (n, c) = (index / cs, index % cs);
                if c >= ct {
                    return;
                }
                let dy = &dy[(n * ct + c) * ht * wt..][..ht * wt];
                for (dy, &row) in dy.chunks_exact(wt).zip(&self.fit.rows) {
                    let ds = &mut ds[row * ws..][..ws];
                    for (&g, &col) in dy.iter().zip(&self.fit.cols) {
                        ds[col] += g;
                    }
                }
            })
        };
        Ok((CpuStorage::F32(ds), Shape::from(self.source)))
    }
}
