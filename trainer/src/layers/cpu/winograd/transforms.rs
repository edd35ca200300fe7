//! The input and output transforms of Winograd's F(2×2, r_h×r_w), each half a pass over whole
//! rows or planes, so that the compiler vectorises it (written tile by tile, they cost as
//! much as the im2col they replace).

use std::mem::MaybeUninit;

use super::{Taps, Winograd, PLANE_GAP};

vectorised! {
    /// The column half of the input transform: each image row becomes r_w + 1 rows `d[j]`
    /// of w/2 values, row j of B_wᵀ applied to each tile's columns. With the row's pixels
    /// taken in pairs (2tx, 2tx+1), one pass over the whole image; [`row_transform`]
    /// then combines these rows, a band of tile rows at a time.
    ///
    /// A first version transformed tile row by tile row, four outputs of w/2 values from
    /// eight shifted slices at a time: mostly loop overhead and register spills, as slow as
    /// the im2col it replaced. Whole-row passes vectorise (figures: docs/PERFORMANCE.md, CPU
    /// kernels: Winograd).
    pub(super) fn column_transform(x: &[f32], shape: &Winograd, d: &mut [f32]) {
        let (h, tw) = (shape.h, shape.tiles().1);
        let n = shape.inputs * h * tw;
        let pairs = &x.as_chunks::<2>().0[..n];
        let mut out: Vec<&mut [f32]> = d[..shape.columns.tile() * n].chunks_exact_mut(n).collect();
        // Tile column k reads the pairs k − 1, k and k + 1 (for 3 taps one pixel of the
        // first and of the last). Across a row's edges those are the padding, mended below.
        if n >= 3 {
            let (prev, cur, next) = (&pairs[..n - 2], &pairs[1..n - 1], &pairs[2..]);
            match &mut out[..] {
                [o0, o1, o2, o3] => column_half3(
                    prev,
                    cur,
                    next,
                    &mut o0[1..n - 1],
                    &mut o1[1..n - 1],
                    &mut o2[1..n - 1],
                    &mut o3[1..n - 1],
                ),
                [o0, o1, o2, o3, o4, o5] => column_half5(
                    prev,
                    cur,
                    next,
                    &mut o0[1..n - 1],
                    &mut o1[1..n - 1],
                    &mut o2[1..n - 1],
                    &mut o3[1..n - 1],
                    &mut o4[1..n - 1],
                    &mut o5[1..n - 1],
                ),
                _ => unreachable!("tiles of 4 or 6 columns"),
            }
        }
        // Each row's first and last tile columns have the padding as neighbours. The flat
        // pass gave them the neighbouring rows' pixels, except at the image's two ends,
        // which it did not reach.
        let full = |out: &mut [&mut [f32]], k: usize| {
            let prev = if k.is_multiple_of(tw) { [0.0; 2] } else { pairs[k - 1] };
            let next = if k % tw == tw - 1 { [0.0; 2] } else { pairs[k + 1] };
            let values = column_tile(shape.columns, prev, pairs[k], next);
            for (plane, value) in out.iter_mut().zip(values) {
                plane[k] = value;
            }
        };
        full(&mut out, 0);
        full(&mut out, n - 1);
        match shape.columns {
            // Only the first output reads the pixel before the tile, and only the last the
            // one after it: two stores per row instead of two whole tiles.
            Taps::Three => {
                for row in 1..n / tw {
                    out[0][row * tw] = -pairs[row * tw][1];
                    out[3][row * tw - 1] = pairs[row * tw - 1][0];
                }
            }
            // Every output reads both neighbouring pairs.
            Taps::Five => {
                for row in 0..n / tw {
                    full(&mut out, row * tw);
                    full(&mut out, row * tw + tw - 1);
                }
            }
        }
    }
}

/// B_wᵀ applied to one tile's columns, given as the pixel pairs before, at and after it.
fn column_tile(taps: Taps, [p0, p1]: [f32; 2], [c0, c1]: [f32; 2], [n0, n1]: [f32; 2]) -> [f32; 6] {
    match taps {
        Taps::Three => [p1 - c1, c0 + c1, c1 - c0, c0 - n0, 0.0, 0.0],
        Taps::Five => five([p0, p1, c0, c1, n0, n1]),
    }
}

/// B ᵀ of F(2, 5) applied to six inputs.
#[inline(always)]
fn five([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * (d1 + d2) + d3 + d4,
        4.0 * (d1 - d2) - d3 + d4,
        2.0 * (d3 - d1) - d2 + d4,
        2.0 * (d1 - d3) - d2 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// B_wᵀ of F(2, 3) applied to the pixel pairs of image rows: output k reads columns
/// 2k−1 … 2k+2, i.e. `prev[k][1]`, `cur[k][0]`, `cur[k][1]` and `next[k][0]`. Each slice is
/// an argument of its own, so that the compiler knows them apart (references passed as
/// arguments do not alias; references inside an array argument do not count) and vectorises
/// the loop; in an array, or inline in the caller, it stayed scalar.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_half3(
    prev: &[[f32; 2]],
    cur: &[[f32; 2]],
    next: &[[f32; 2]],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
) {
    let n = o0.len();
    let (prev, cur, next) = (&prev[..n], &cur[..n], &next[..n]);
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for k in 0..n {
        let (c0, c1) = (cur[k][0], cur[k][1]);
        o0[k] = prev[k][1] - c1;
        o1[k] = c0 + c1;
        o2[k] = c1 - c0;
        o3[k] = c0 - next[k][0];
    }
}

/// B_wᵀ of F(2, 5): output k reads columns 2k−2 … 2k+3, the pairs `prev[k]`, `cur[k]` and
/// `next[k]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn column_half5(
    prev: &[[f32; 2]],
    cur: &[[f32; 2]],
    next: &[[f32; 2]],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    o4: &mut [f32],
    o5: &mut [f32],
) {
    let n = o0.len();
    let (prev, cur, next) = (&prev[..n], &cur[..n], &next[..n]);
    five_into(
        |k| {
            let ([p0, p1], [c0, c1], [n0, n1]) = (prev[k], cur[k], next[k]);
            [p0, p1, c0, c1, n0, n1]
        },
        o0,
        o1,
        o2,
        o3,
        o4,
        o5,
    );
}

/// Bᵀ of F(2, 5) at `o0.len()` positions, position k's six inputs from `inputs(k)`: the loop
/// of [`column_half5`] and [`row_half5`]. The outputs are separate arguments, as in
/// [`column_half3`]: in an array, these loops compiled to scalar code.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn five_into(
    inputs: impl Fn(usize) -> [f32; 6],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    o4: &mut [f32],
    o5: &mut [f32],
) {
    let n = o0.len();
    let (o1, o2, o3, o4, o5) = (
        &mut o1[..n],
        &mut o2[..n],
        &mut o3[..n],
        &mut o4[..n],
        &mut o5[..n],
    );
    for k in 0..n {
        let [a, b, c, d, e, f] = five(inputs(k));
        o0[k] = a;
        o1[k] = b;
        o2[k] = c;
        o3[k] = d;
        o4[k] = e;
        o5[k] = f;
    }
}

vectorised! {
    /// The row half of the input transform for tile rows `tys`: V [ξ][inputs][tiles of the
    /// band] from [`column_transform`]'s rows. Tile row ty reads image rows 2ty − pad …
    /// 2ty − pad + r_h; those outside the image are `zeros`.
    pub(super) fn row_transform(
        d: &[f32],
        shape: &Winograd,
        tys: std::ops::Range<usize>,
        v: &mut [f32],
        zeros: &[f32],
    ) {
        let (h, tw) = (shape.h, shape.tiles().1);
        let n = shape.inputs * h * tw;
        let (nh, nw) = (shape.rows.tile(), shape.columns.tile());
        let pad = shape.rows.pad();
        let tiles = tys.len() * tw;
        let first = tys.start;
        let mut planes: Vec<&mut [f32]> = v.chunks_exact_mut(shape.inputs * tiles + PLANE_GAP).collect();
        for (j, dj) in d[..nw * n].chunks_exact(n).enumerate() {
            // The planes of tile positions (i, j) for every i.
            let mut column: Vec<&mut [f32]> = planes
                .iter_mut()
                .skip(j)
                .step_by(nw)
                .map(|plane| &mut **plane)
                .collect();
            for c in 0..shape.inputs {
                let plane = &dj[c * h * tw..][..h * tw];
                let row = |r: usize| {
                    if (pad..h + pad).contains(&r) {
                        &plane[(r - pad) * tw..][..tw]
                    } else {
                        &zeros[..tw]
                    }
                };
                for ty in tys.clone() {
                    let at = c * tiles + (ty - first) * tw;
                    match &mut column[..nh] {
                        [o0, o1, o2, o3] => row_half3(
                            row(2 * ty),
                            row(2 * ty + 1),
                            row(2 * ty + 2),
                            row(2 * ty + 3),
                            &mut o0[at..at + tw],
                            &mut o1[at..at + tw],
                            &mut o2[at..at + tw],
                            &mut o3[at..at + tw],
                        ),
                        [o0, o1, o2, o3, o4, o5] => row_half5(
                            std::array::from_fn(|s| row(2 * ty + s)),
                            &mut o0[at..at + tw],
                            &mut o1[at..at + tw],
                            &mut o2[at..at + tw],
                            &mut o3[at..at + tw],
                            &mut o4[at..at + tw],
                            &mut o5[at..at + tw],
                        ),
                        _ => unreachable!("tiles of 4 or 6 rows"),
                    }
                }
            }
        }
    }
}

/// B_hᵀ of F(2, 3) applied to four rows (tile rows 2ty−1 … 2ty+2). Separate arguments, as in
/// [`column_half3`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_half3(
    above: &[f32],
    even: &[f32],
    odd: &[f32],
    below: &[f32],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
) {
    let n = o0.len();
    let (above, even, odd, below) = (&above[..n], &even[..n], &odd[..n], &below[..n]);
    let (o1, o2, o3) = (&mut o1[..n], &mut o2[..n], &mut o3[..n]);
    for t in 0..n {
        o0[t] = above[t] - odd[t];
        o1[t] = even[t] + odd[t];
        o2[t] = odd[t] - even[t];
        o3[t] = even[t] - below[t];
    }
}

/// B_hᵀ of F(2, 5) applied to six rows (tile rows 2ty−2 … 2ty+3).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn row_half5(
    rows: [&[f32]; 6],
    o0: &mut [f32],
    o1: &mut [f32],
    o2: &mut [f32],
    o3: &mut [f32],
    o4: &mut [f32],
    o5: &mut [f32],
) {
    let [r0, r1, r2, r3, r4, r5] = rows.map(|r| &r[..o0.len()]);
    five_into(
        |t| [r0[t], r1[t], r2[t], r3[t], r4[t], r5[t]],
        o0,
        o1,
        o2,
        o3,
        o4,
        o5,
    );
}

vectorised! {
    /// y = A_hᵀ M A_w (+ bias) for the tiles of tile rows `tys`: the row half over whole
    /// planes of tiles into `rows` [2][r_w+1][tiles], then each tile's two columns, written
    /// interleaved. A_ᵀ is [1 1 1 0; 0 1 −1 −1] for 3 taps, [1 1 1 1 1 0; 0 1 −1 2 −2 1]
    /// for 5.
    pub(super) fn output_transform(
        m: &[f32],
        shape: &Winograd,
        tys: std::ops::Range<usize>,
        bias: &[f32],
        rows: &mut [f32],
        y: &mut [MaybeUninit<f32>],
    ) {
        let (w, tw) = (shape.w, shape.tiles().1);
        let (nh, nw) = (shape.rows.tile(), shape.columns.tile());
        let tiles = tys.len() * tw;
        let plane_stride = shape.outputs * tiles + PLANE_GAP;
        let (r0, r1) = rows[..2 * nw * tiles].split_at_mut(nw * tiles);
        for o in 0..shape.outputs {
            let b = bias.get(o).copied().unwrap_or(0.0);
            for s in 0..nw {
                let plane = |i: usize| &m[(i * nw + s) * plane_stride + o * tiles..][..tiles];
                let (a0, a1) = (&mut r0[s * tiles..][..tiles], &mut r1[s * tiles..][..tiles]);
                if nh == 4 {
                    output_rows3([plane(0), plane(1), plane(2), plane(3)], a0, a1);
                } else {
                    output_rows5(
                        plane(0),
                        plane(1),
                        plane(2),
                        plane(3),
                        plane(4),
                        plane(5),
                        a0,
                        a1,
                    );
                }
            }
            let out = &mut y[o * shape.h * w..][..shape.h * w];
            let band = &mut out[tys.start * 2 * w..tys.end * 2 * w];
            for (ty, pair) in band.chunks_exact_mut(2 * w).enumerate() {
                for (line, r) in pair.chunks_exact_mut(w).zip([&*r0, &*r1]) {
                    let part = |s: usize| &r[s * tiles + ty * tw..][..tw];
                    if nw == 4 {
                        output_columns3(part(0), part(1), part(2), part(3), b, line);
                    } else {
                        output_columns5(
                            part(0),
                            part(1),
                            part(2),
                            part(3),
                            part(4),
                            part(5),
                            b,
                            line,
                        );
                    }
                }
            }
        }
    }
}

/// A_hᵀ of F(2, 3) over four planes of products.
#[inline(always)]
fn output_rows3(m: [&[f32]; 4], a0: &mut [f32], a1: &mut [f32]) {
    let n = a0.len();
    let [m0, m1, m2, m3] = m.map(|p| &p[..n]);
    let a1 = &mut a1[..n];
    for t in 0..n {
        a0[t] = m0[t] + m1[t] + m2[t];
        a1[t] = m1[t] - m2[t] - m3[t];
    }
}

/// A_hᵀ of F(2, 5) over six planes of products. Separate arguments, as in
/// [`output_columns5`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_rows5(
    m0: &[f32],
    m1: &[f32],
    m2: &[f32],
    m3: &[f32],
    m4: &[f32],
    m5: &[f32],
    a0: &mut [f32],
    a1: &mut [f32],
) {
    let n = a0.len();
    let (m0, m1, m2, m3, m4, m5) = (&m0[..n], &m1[..n], &m2[..n], &m3[..n], &m4[..n], &m5[..n]);
    let a1 = &mut a1[..n];
    for t in 0..n {
        a0[t] = m0[t] + m1[t] + m2[t] + m3[t] + m4[t];
        a1[t] = m1[t] - m2[t] + 2.0 * (m3[t] - m4[t]) + m5[t];
    }
}

/// A_wᵀ of F(2, 3) applied to one output row's tiles, plus the bias: pixels 2t and 2t+1 of
/// `line` from `a0` … `a3` [t]. Separate arguments, as in [`column_half3`]; as a loop in
/// [`output_transform`] it stayed scalar.
#[inline(always)]
fn output_columns3(
    a0: &[f32],
    a1: &[f32],
    a2: &[f32],
    a3: &[f32],
    bias: f32,
    line: &mut [MaybeUninit<f32>],
) {
    let pixels = line.as_chunks_mut::<2>().0;
    let n = pixels.len();
    let (a0, a1, a2, a3) = (&a0[..n], &a1[..n], &a2[..n], &a3[..n]);
    for t in 0..n {
        pixels[t][0].write(a0[t] + a1[t] + a2[t] + bias);
        pixels[t][1].write(a1[t] - a2[t] - a3[t] + bias);
    }
}

/// A_wᵀ of F(2, 5), as [`output_columns3`]. With the six inputs in an array this loop
/// compiled to scalar code.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_columns5(
    a0: &[f32],
    a1: &[f32],
    a2: &[f32],
    a3: &[f32],
    a4: &[f32],
    a5: &[f32],
    bias: f32,
    line: &mut [MaybeUninit<f32>],
) {
    let pixels = line.as_chunks_mut::<2>().0;
    let n = pixels.len();
    let (a0, a1, a2, a3, a4, a5) = (&a0[..n], &a1[..n], &a2[..n], &a3[..n], &a4[..n], &a5[..n]);
    for t in 0..n {
        pixels[t][0].write(a0[t] + a1[t] + a2[t] + a3[t] + a4[t] + bias);
        pixels[t][1].write(a1[t] - a2[t] + 2.0 * (a3[t] - a4[t]) + a5[t] + bias);
    }
}
