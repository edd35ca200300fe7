//! Where the kernels' floats live: outputs written in parallel without zeroing them first,
//! and per-thread scratch buffers kept between calls.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use rayon::prelude::*;

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
