//! The CPU plan's buffers: every intermediate laid out at load in one arena,
//! so that a frame allocates no tensors.
//!
//! The first frame of a size runs over candle tensors and records every
//! value's dims (`Plan::run_slice`); from those, [`Arena::build`] gives each
//! value a place: a region of the arena for what a kernel writes, a view of
//! another value's region for what needs no copy (Reshape and Flatten, a
//! Split along an axis with nothing outside it, a Transpose only MatMuls
//! read), or a slice of a Concat's output, which its producer writes in place
//! (where the Concat's leading axes are all 1). Regions are packed first-fit
//! by liveness: a region is free again after the last step that reads it or
//! any view of it. Then each frame runs the steps as slice kernels
//! (`kernels/`) writing into their regions; a Split along an inner axis and a
//! Slice are strided copies. An op with no slice kernel here runs on candle
//! over copies of its inputs (counted in `Arena::fallbacks`), so every plan
//! that compiles runs.
//!
//! Owns: the places (regions, views), their packing and the per-frame loop.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::super::cpu::Act;
use super::kernels::{self, SharedOut};
use super::{Bin, Op, Plan, Src};

/// Where a view's data lies.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Base {
    /// The frame's input tensor, as the caller passed it.
    Input,
    /// The arena.
    Arena,
}

/// A value: where its first element lies, its dims and its strides (in elements).
#[derive(Clone, Debug)]
struct View {
    base: Base,
    off: usize,
    dims: Vec<usize>,
    strides: Vec<usize>,
    /// The region this view lies in (an index into `regions`), or `None` for the input.
    region: Option<usize>,
}

fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

impl View {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    fn is_contiguous(&self) -> bool {
        // The contiguous stride of each axis, innermost first (no allocation: this runs per frame).
        let mut c = 1;
        self.dims.iter().zip(&self.strides).rev().all(|(d, s)| {
            let ok = *d <= 1 || *s == c;
            c *= d;
            ok
        })
    }

    /// One past the farthest element the view reaches, from `off`.
    fn reach(&self) -> usize {
        if self.len() == 0 {
            return 0;
        }
        1 + self
            .dims
            .iter()
            .zip(&self.strides)
            .map(|(d, s)| (d - 1) * s)
            .sum::<usize>()
    }
}

/// `x` split along axis `d` into parts of `sizes`: views at offsets along it, or `None`
/// where the sizes overrun the axis.
fn split_views(x: &View, d: usize, sizes: &[usize]) -> Option<Vec<View>> {
    let mut start = 0;
    let parts = sizes
        .iter()
        .map(|s| {
            let mut v = x.clone();
            v.off += start * x.strides[d];
            v.dims[d] = *s;
            start += s;
            v
        })
        .collect();
    (start <= x.dims[d]).then_some(parts)
}

/// The strides of `dims` (strided by `strides`) reshaped to `new` without a copy, where
/// they exist: each run of axes the reshape merges or splits must be contiguous within
/// itself (the rule of PyTorch's `view`).
fn reshaped_strides(dims: &[usize], strides: &[usize], new: &[usize]) -> Option<Vec<usize>> {
    let numel: usize = dims.iter().product();
    if numel == 0 || numel != new.iter().product::<usize>() {
        return (numel == 0 && new.iter().product::<usize>() == 0).then(|| contiguous_strides(new));
    }
    let mut out = vec![0usize; new.len()];
    let mut view_d = new.len() as isize - 1;
    let mut base = *strides.last().unwrap_or(&1);
    let (mut tensor_numel, mut view_numel) = (1usize, 1usize);
    for d in (0..dims.len()).rev() {
        tensor_numel *= dims[d];
        // The end of a chunk of axes contiguous within itself.
        if d == 0 || (dims[d - 1] != 1 && strides[d - 1] != tensor_numel * base) {
            while view_d >= 0 && (view_numel < tensor_numel || new[view_d as usize] == 1) {
                out[view_d as usize] = view_numel * base;
                view_numel *= new[view_d as usize];
                view_d -= 1;
            }
            if view_numel != tensor_numel {
                return None;
            }
            if d > 0 {
                base = strides[d - 1];
                tensor_numel = 1;
                view_numel = 1;
            }
        }
    }
    (view_d == -1).then_some(out)
}

/// How a step runs on the arena.
enum Exec {
    /// Nothing to do: its outputs are views of its input.
    Alias,
    /// Its slice kernel, writing its outputs' regions.
    Native,
    /// Each output copied from a strided view of the input (a Split along an inner axis,
    /// a Slice).
    Copy(Vec<View>),
    /// A Concat: the inputs not already written in place (`true`: its producer wrote it
    /// into its slice of the output) copied into the output.
    Concat(Vec<bool>),
    /// candle's op over copies of its inputs, the result copied into its region.
    Fallback,
}

struct ArenaStep {
    exec: Exec,
    /// The view of each input (`Src::Const` inputs have views of their own).
    args: Vec<usize>,
    /// The view of each output.
    outs: Vec<usize>,
}

pub(super) struct Arena {
    /// The input dims this layout is for.
    input_dims: Vec<usize>,
    buf: Vec<f32>,
    views: Vec<View>,
    steps: Vec<ArenaStep>,
    output: usize,
    /// Steps that run on candle (no slice kernel for their op or their inputs' layout).
    pub fallbacks: usize,
}

/// A region of the arena: the step that writes it (0 for constants), and the last step
/// that reads it or a view of it.
struct Region {
    off: usize,
    len: usize,
    first: usize,
    last: usize,
}

/// Regions are multiples of 16 elements (64 bytes: a cache line, an AVX-512 vector).
const ALIGN: usize = 16;

/// First-fit packing of regions whose lifetimes (first step written, last step read) overlap.
struct Packer {
    /// Live regions: (off, len, last step).
    live: Vec<(usize, usize, usize)>,
    end: usize,
}

impl Packer {
    /// A place for `len` elements at step `at`: regions last read before `at` are free.
    fn place(&mut self, len: usize, at: usize, last: usize) -> usize {
        self.live.retain(|r| r.2 >= at);
        self.live.sort_unstable();
        let len = len.next_multiple_of(ALIGN).max(ALIGN);
        let mut off = 0;
        for &(o, l, _) in &self.live {
            if o >= off + len {
                break;
            }
            off = off.max(o + l);
        }
        self.live.push((off, len, last));
        self.end = self.end.max(off + len);
        off
    }
}

impl Arena {
    /// The layout for `plan` at the dims `traced` recorded (each slot's dims, `None` where
    /// never computed), or why not.
    pub(super) fn build(plan: &Plan, input_dims: &[usize], traced: &[Option<Vec<usize>>]) -> Result<Arena, String> {
        let n = plan.steps.len();
        let mut views: Vec<Option<View>> = vec![None; plan.slots];
        views[plan.input] = Some(View {
            base: Base::Input,
            off: 0,
            dims: input_dims.to_vec(),
            strides: contiguous_strides(input_dims),
            region: None,
        });
        // Constants first: each gets a region of its own, live for the whole frame.
        let mut consts: Vec<Vec<f32>> = Vec::new();
        let mut steps = Vec::with_capacity(n);
        let mut const_views = Vec::new();
        let mut regions: Vec<Region> = Vec::new();
        for st in &plan.steps {
            let mut args = Vec::with_capacity(st.inputs.len());
            for src in &st.inputs {
                match src {
                    Src::Slot(k) => args.push(*k),
                    Src::Const(t) => {
                        let data: Vec<f32> = match t.dtype() {
                            candle_core::DType::F32 => {
                                t.flatten_all().and_then(|t| t.to_vec1()).map_err(|e| e.to_string())?
                            }
                            // Not an f32 operand: the step falls back and reads the tensor itself.
                            _ => Vec::new(),
                        };
                        // A non-f32 constant has no data here: an empty view.
                        let dims = if data.is_empty() { vec![0] } else { t.dims().to_vec() };
                        regions.push(Region {
                            off: 0,
                            len: data.len(),
                            first: 0,
                            last: n,
                        });
                        const_views.push(View {
                            base: Base::Arena,
                            off: 0,
                            strides: contiguous_strides(&dims),
                            dims,
                            region: Some(regions.len() - 1),
                        });
                        consts.push(data);
                        args.push(plan.slots + const_views.len() - 1);
                    }
                }
            }
            steps.push(ArenaStep {
                exec: Exec::Fallback,
                args,
                outs: st.outputs.clone(),
            });
        }
        let mut views: Vec<Option<View>> = views.into_iter().chain(const_views.into_iter().map(Some)).collect();
        let dims_of = |slot: usize| -> Result<Vec<usize>, String> {
            traced
                .get(slot)
                .cloned()
                .flatten()
                .ok_or_else(|| format!("value {slot} was not computed by the traced run"))
        };
        // Concat in place: where the output's leading axes are all 1, each input produced by a
        // step of its own (not a view, not the frame's input, in no other Concat) is written by
        // its producer straight into its slice of the output. `member[slot]`: (the Concat's
        // step, the element offset of the slot's slice).
        let mut member: Vec<Option<(usize, usize)>> = vec![None; views.len()];
        for (c, st) in plan.steps.iter().enumerate() {
            let Op::Concat { axis } = st.op else { continue };
            let Some(&o) = st.outputs.first() else { continue };
            let out = dims_of(o)?;
            let d = super::ops::axis(axis, out.len()).map_err(|e| e.to_string())?;
            if out[..d].iter().product::<usize>() != 1 {
                continue;
            }
            let mut at = 0;
            for src in &st.inputs {
                let len = match src {
                    Src::Slot(k) => {
                        let len = dims_of(*k)?.iter().product::<usize>();
                        if *k != plan.input && *k != plan.output && member[*k].is_none() {
                            member[*k] = Some((c, at));
                        }
                        len
                    }
                    Src::Const(t) => t.elem_count(),
                };
                at += len;
            }
        }
        // Which steps read each value, and whether all of them read strided views: then a
        // Transpose, Reshape or Split making it needs no copy (its readers gather, or copy
        // it out themselves).
        let mut readers: Vec<Vec<usize>> = vec![Vec::new(); views.len()];
        for (i, st) in steps.iter().enumerate() {
            for &a in &st.args {
                readers[a].push(i);
            }
        }
        let strided_ok = |slot: usize| {
            slot != plan.output
                && readers[slot].iter().all(|&r| {
                    matches!(
                        plan.steps[r].op,
                        Op::MatMul
                            | Op::Attention { .. }
                            | Op::Transpose { .. }
                            | Op::Reshape { .. }
                            | Op::Flatten { .. }
                            | Op::Split { .. }
                            | Op::Slice { .. }
                    )
                })
        };
        // The region of each in-place Concat's output, made by its first producer.
        let mut concat_region: Vec<Option<usize>> = vec![None; n];
        let mut in_place = vec![false; views.len()];
        // Each step: its outputs' places.
        let mut fallbacks = 0;
        for (i, st) in plan.steps.iter().enumerate() {
            let arg_views: Vec<View> = steps[i]
                .args
                .iter()
                .map(|&a| views[a].clone().ok_or_else(|| format!("{}: input not placed", st.name)))
                .collect::<Result<_, _>>()?;
            let all_f32 = st.inputs.iter().all(|s| match s {
                Src::Const(t) => t.dtype() == candle_core::DType::F32,
                Src::Slot(_) => true,
            });
            let x = &arg_views[0];
            let contiguous = arg_views.iter().all(View::is_contiguous);
            let out_dims: Vec<Vec<usize>> = st.outputs.iter().map(|&o| dims_of(o)).collect::<Result<_, _>>()?;
            // Views of the input, where the op needs no copy.
            let outs_strided_ok = st.outputs.iter().all(|&o| strided_ok(o));
            let alias: Option<Vec<View>> = match &st.op {
                Op::Reshape { .. } | Op::Flatten { .. } if x.is_contiguous() => Some(vec![View {
                    strides: contiguous_strides(&out_dims[0]),
                    dims: out_dims[0].clone(),
                    ..x.clone()
                }]),
                // A strided view reshaped, where its strides allow and its readers take one.
                Op::Reshape { .. } | Op::Flatten { .. } if outs_strided_ok => {
                    reshaped_strides(&x.dims, &x.strides, &out_dims[0]).map(|strides| {
                        vec![View {
                            strides,
                            dims: out_dims[0].clone(),
                            ..x.clone()
                        }]
                    })
                }
                Op::Split { axis, sizes } if x.is_contiguous() || outs_strided_ok => {
                    let d = super::ops::axis(*axis, x.dims.len()).map_err(|e| e.to_string())?;
                    let inner: usize = x.dims[d + 1..].iter().product();
                    if x.is_contiguous() && x.dims[..d].iter().product::<usize>() == 1 {
                        let mut start = 0;
                        Some(
                            sizes
                                .iter()
                                .zip(&out_dims)
                                .map(|(s, dims)| {
                                    let v = View {
                                        off: x.off + start * inner,
                                        strides: contiguous_strides(dims),
                                        dims: dims.clone(),
                                        ..x.clone()
                                    };
                                    start += s;
                                    v
                                })
                                .collect(),
                        )
                    } else if outs_strided_ok {
                        split_views(x, d, sizes).filter(|p| p.iter().zip(&out_dims).all(|(v, d)| v.dims == *d))
                    } else {
                        None
                    }
                }
                Op::Transpose { perm, view } if *view || outs_strided_ok => Some(vec![View {
                    dims: perm.iter().map(|&p| x.dims[p]).collect(),
                    strides: perm.iter().map(|&p| x.strides[p]).collect(),
                    ..x.clone()
                }]),
                _ => None,
            };
            if let Some(outs) = alias {
                steps[i].exec = Exec::Alias;
                for (o, v) in st.outputs.iter().zip(outs) {
                    views[*o] = Some(v);
                }
                continue;
            }
            // Strided views of the input, copied out.
            let copies: Option<Vec<View>> = match &st.op {
                Op::Split { axis, sizes } => {
                    let d = super::ops::axis(*axis, x.dims.len()).map_err(|e| e.to_string())?;
                    split_views(x, d, sizes)
                }
                // A strided view reshaped where no strides express it: copied out in its own
                // order, which is the reshaped value's contiguous layout.
                Op::Reshape { .. } | Op::Flatten { .. } => Some(vec![x.clone()]),
                Op::Slice { starts, ends, axes } => {
                    let mut v = x.clone();
                    for ((s, e), ax) in starts.iter().zip(ends).zip(axes) {
                        let d = super::ops::axis(*ax, v.dims.len()).map_err(|e| e.to_string())?;
                        let n = v.dims[d] as i64;
                        let clamp = |t: i64| if t < 0 { (t + n).max(0) } else { t.min(n) };
                        let (s, e) = (clamp(*s), clamp(*e));
                        v.off += s as usize * v.strides[d];
                        v.dims[d] = (e - s).max(0) as usize;
                    }
                    Some(vec![v])
                }
                _ => None,
            }
            .filter(|parts: &Vec<View>| {
                x.dims.len() <= kernels::MAX_RANK
                    && parts.len() == out_dims.len()
                    && parts.iter().zip(&out_dims).all(|(p, d)| {
                        p.dims == *d
                            || (matches!(st.op, Op::Reshape { .. } | Op::Flatten { .. })
                                && p.len() == d.iter().product::<usize>())
                    })
            });
            let native = all_f32
                && match &st.op {
                    Op::FastConv(_) | Op::FastDepthwise(_) | Op::Resize { .. } => contiguous && x.dims.len() == 4,
                    Op::Sigmoid | Op::Exp | Op::FastSoftmax { .. } | Op::Concat { .. } => contiguous,
                    Op::Binary(_) => contiguous && arg_views.len() == 2 && out_dims[0].len() <= 8,
                    Op::Transpose { view: false, .. } => x.dims.len() <= kernels::MAX_RANK,
                    Op::MatMul => {
                        let (a, b) = (&arg_views[0], &arg_views[1]);
                        let r = a.dims.len();
                        r >= 2 && b.dims.len() == r && a.dims[..r - 2] == b.dims[..r - 2]
                    }
                    // The kernel's softmax runs over the scores' last axis only.
                    Op::Attention { axis, .. } => {
                        let r = x.dims.len();
                        super::ops::axis(*axis, r).is_ok_and(|d| d + 1 == r)
                            && kernels::Attention::out_dims(&x.dims, &arg_views[1].dims, &arg_views[2].dims).is_ok()
                    }
                    _ => false,
                };
            steps[i].exec = if let Some(parts) = copies {
                Exec::Copy(parts)
            } else if native && matches!(st.op, Op::Concat { .. }) {
                Exec::Concat(steps[i].args.iter().map(|&a| in_place[a]).collect())
            } else if native {
                Exec::Native
            } else {
                fallbacks += 1;
                Exec::Fallback
            };
            let is_concat = matches!(steps[i].exec, Exec::Concat(_));
            for (o, dims) in st.outputs.iter().zip(out_dims) {
                let len: usize = dims.iter().product();
                // A slice of an in-place Concat's output, or (the Concat itself) all of it.
                let (region, off) = match (member[*o], is_concat) {
                    (Some((c, at)), false) => {
                        let r = match concat_region[c] {
                            Some(r) => r,
                            None => {
                                let total = dims_of(plan.steps[c].outputs[0])?.iter().product();
                                regions.push(Region {
                                    off: 0,
                                    len: total,
                                    first: i,
                                    last: i,
                                });
                                concat_region[c] = Some(regions.len() - 1);
                                regions.len() - 1
                            }
                        };
                        in_place[*o] = true;
                        (r, at)
                    }
                    _ if is_concat && concat_region[i].is_some() => (concat_region[i].unwrap_or_default(), 0),
                    _ => {
                        regions.push(Region {
                            off: 0,
                            len,
                            first: i,
                            last: i,
                        });
                        (regions.len() - 1, 0)
                    }
                };
                views[*o] = Some(View {
                    base: Base::Arena,
                    off,
                    strides: contiguous_strides(&dims),
                    dims,
                    region: Some(region),
                });
            }
        }
        // Lifetimes: a region lives until the last step that reads any view of it.
        let output = plan.output;
        for (i, st) in steps.iter().enumerate() {
            for &a in &st.args {
                if let Some(r) = views[a].as_ref().and_then(|v| v.region) {
                    regions[r].last = regions[r].last.max(i);
                }
            }
        }
        if let Some(r) = views[output].as_ref().and_then(|v| v.region) {
            regions[r].last = n;
        }
        // Pack: constants (first, live throughout), then each step's outputs when written.
        let mut packer = Packer {
            live: Vec::new(),
            end: 0,
        };
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&r| (regions[r].first, r));
        for r in order {
            regions[r].off = packer.place(regions[r].len, regions[r].first, regions[r].last);
        }
        let copy_views = steps.iter_mut().flat_map(|s| match &mut s.exec {
            Exec::Copy(parts) => parts.iter_mut(),
            _ => [].iter_mut(),
        });
        for v in views.iter_mut().flatten().chain(copy_views) {
            if let Some(r) = v.region {
                v.off += regions[r].off;
            }
        }
        // A slot no step computes (an output nothing reads is still computed): empty.
        let views: Vec<View> = views
            .into_iter()
            .map(|v| {
                v.unwrap_or(View {
                    base: Base::Arena,
                    off: 0,
                    dims: vec![0],
                    strides: vec![1],
                    region: None,
                })
            })
            .collect();
        let mut buf = vec![0f32; packer.end];
        for (k, data) in consts.iter().enumerate() {
            let v = &views[plan.slots + k];
            buf[v.off..v.off + data.len()].copy_from_slice(data);
        }
        let arena = Arena {
            input_dims: input_dims.to_vec(),
            buf,
            views,
            steps,
            output,
            fallbacks,
        };
        arena.check(&regions)?;
        Ok(arena)
    }

    /// Every view lies inside its data, and no region overlaps another live at the same time.
    fn check(&self, regions: &[Region]) -> Result<(), String> {
        for v in &self.views {
            if v.base == Base::Arena && v.off + v.reach() > self.buf.len() {
                return Err(format!("a view {v:?} reaches past the arena"));
            }
        }
        for (i, r) in regions.iter().enumerate() {
            for q in &regions[i + 1..] {
                let together = r.first <= q.last && q.first <= r.last;
                let overlap = r.len > 0 && q.len > 0 && r.off < q.off + q.len && q.off < r.off + r.len;
                if together && overlap {
                    return Err(format!(
                        "regions at {}+{} and {}+{} overlap while both are live",
                        r.off, r.len, q.off, q.len
                    ));
                }
            }
        }
        Ok(())
    }

    /// The arena's size in elements (for the log).
    pub(super) fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether this layout is for input dims `dims`.
    pub(super) fn fits(&self, dims: &[usize]) -> bool {
        self.input_dims == dims
    }
}

/// The arena and the frame's input, read and written through views.
struct Mem<'a> {
    arena: *mut f32,
    arena_len: usize,
    input: &'a [f32],
}

impl Mem<'_> {
    /// The elements `v` reaches, from its first.
    ///
    /// # Safety
    /// No step writes them while the slice lives (the packing: a region is written only by
    /// the step that owns it, and read after).
    unsafe fn read(&self, v: &View) -> &[f32] {
        match v.base {
            Base::Input => &self.input[v.off..v.off + v.reach()],
            Base::Arena => {
                assert!(v.off + v.reach() <= self.arena_len, "arena view out of bounds");
                // SAFETY: inside the arena (asserted); no writer meanwhile (the caller).
                unsafe { std::slice::from_raw_parts(self.arena.add(v.off), v.reach()) }
            }
        }
    }

    /// The region of an output view (contiguous, in the arena).
    ///
    /// # Safety
    /// No other slice of these elements lives meanwhile (the packing: a step's output region
    /// overlaps no region live at that step, `Arena::check`).
    #[allow(clippy::mut_from_ref)]
    unsafe fn write(&self, v: &View) -> &mut [f32] {
        assert!(
            v.base == Base::Arena && v.off + v.len() <= self.arena_len,
            "output view out of bounds"
        );
        // SAFETY: inside the arena (asserted); the caller's exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.arena.add(v.off), v.len()) }
    }
}

fn run_err(what: &str) -> candle_core::Error {
    candle_core::Error::Msg(what.to_owned())
}

impl Arena {
    /// Runs `plan` on `input` (of the dims this layout is for), appends the output to `out`
    /// and returns its dims. With `times`, records each step's duration.
    pub(super) fn run(
        &mut self,
        plan: &Plan,
        input: &[f32],
        out: &mut Vec<f32>,
        mut times: Option<&mut Vec<(String, std::time::Duration)>>,
    ) -> candle_core::Result<Vec<usize>> {
        if input.len() != self.input_dims.iter().product::<usize>() {
            return Err(run_err("input length does not match its dims"));
        }
        let mem = Mem {
            arena: self.buf.as_mut_ptr(),
            arena_len: self.buf.len(),
            input,
        };
        for (st, a) in plan.steps.iter().zip(&self.steps) {
            let t0 = std::time::Instant::now();
            match a.exec {
                Exec::Alias => {}
                // SAFETY: as for `Native` below; an input written in place is not copied.
                Exec::Concat(ref done) => unsafe { concat(&st.op, &self.views, a, done, &mem) }
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", st.name)))?,
                Exec::Copy(ref parts) => {
                    for (from, &o) in parts.iter().zip(&a.outs) {
                        // SAFETY: as for `Native` below.
                        let (src, dst) = unsafe { (mem.read(from), mem.write(&self.views[o])) };
                        kernels::Transpose::permute(ident(from.dims.len()), src, &from.dims, &from.strides, dst)
                            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", st.name)))?;
                    }
                }
                // SAFETY: the packing (see `Mem`): this step's outputs overlap none of its inputs
                // nor anything live.
                Exec::Native => unsafe { native(&st.op, &self.views, a, &mem) }
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", st.name)))?,
                // SAFETY: as above.
                Exec::Fallback => unsafe { fallback(st, &self.views, a, &mem) }
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", st.name)))?,
            }
            if let Some(times) = times.as_deref_mut() {
                let dims = a.outs.first().map(|&o| self.views[o].dims.clone()).unwrap_or_default();
                times.push((format!("{} -> {dims:?}", st.name), t0.elapsed()));
            }
        }
        let v = &self.views[self.output];
        // SAFETY: every step has run; nothing writes now.
        let data = unsafe { mem.read(v) };
        let start = out.len();
        out.resize(start + v.len(), 0.0);
        if v.is_contiguous() {
            out[start..].copy_from_slice(&data[..v.len()]);
        } else {
            kernels::Transpose::permute(ident(v.dims.len()), data, &v.dims, &v.strides, &mut out[start..])?;
        }
        Ok(v.dims.clone())
    }
}

/// The identity permutation of `rank` axes (a strided copy), with no allocation.
fn ident(rank: usize) -> &'static [usize] {
    const ID: [usize; kernels::MAX_RANK] = [0, 1, 2, 3, 4, 5, 6, 7];
    &ID[..rank.min(kernels::MAX_RANK)]
}

/// The dims as NCHW.
fn dims4(d: &[usize]) -> candle_core::Result<kernels::Dims4> {
    match *d {
        [n, c, h, w] => Ok((n, c, h, w)),
        _ => Err(run_err("a 4-D input expected")),
    }
}

/// One step's slice kernel.
///
/// # Safety
/// See [`Mem::write`]: the step's outputs overlap nothing else live.
unsafe fn native(op: &Op, views: &[View], a: &ArenaStep, mem: &Mem) -> candle_core::Result<()> {
    let xv = &views[a.args[0]];
    let ov = &views[a.outs[0]];
    // SAFETY: the caller's (above) for every read and write below.
    let (x, o) = unsafe { (mem.read(xv), mem.write(ov)) };
    let x_len = xv.len();
    match op {
        Op::FastConv(k) => {
            let d = dims4(&xv.dims)?;
            let (oh, ow) = k.out_hw(d)?;
            if o.len() != d.0 * k.filters() * oh * ow {
                return Err(run_err("conv output size"));
            }
            k.forward(&x[..x_len], d, (oh, ow), &SharedOut::of(o));
        }
        Op::FastDepthwise(k) => {
            let d = dims4(&xv.dims)?;
            let (oh, ow) = k.out_hw(d)?;
            if o.len() != d.0 * d.1 * oh * ow {
                return Err(run_err("depthwise output size"));
            }
            k.forward(&x[..x_len], d, (oh, ow), o);
        }
        Op::Sigmoid => kernels::Activation(Act::Sigmoid).forward(&x[..x_len], o),
        Op::Exp => kernels::Activation(Act::Exp).forward(&x[..x_len], o),
        Op::FastSoftmax { axis, scale } => kernels::Softmax {
            axis: *axis,
            scale: *scale,
        }
        .forward(&x[..x_len], &xv.dims, o)?,
        Op::Resize { scale_h, scale_w } => {
            let d = dims4(&xv.dims)?;
            if o.len() != x_len * scale_h * scale_w {
                return Err(run_err("resize output size"));
            }
            kernels::Upsample {
                sh: *scale_h,
                sw: *scale_w,
            }
            .forward(&x[..x_len], d, o)
        }
        Op::Transpose { perm, .. } => kernels::Transpose::permute(perm, x, &xv.dims, &xv.strides, o)?,
        Op::MatMul => {
            let bv = &views[a.args[1]];
            // SAFETY: the caller's.
            let b = unsafe { mem.read(bv) };
            kernels::MatMul::forward(
                (x, &xv.dims, &xv.strides),
                (b, &bv.dims, &bv.strides),
                &SharedOut::of(o),
            )?
        }
        Op::Attention { scale, .. } => {
            let (kv, vv) = (&views[a.args[1]], &views[a.args[2]]);
            // SAFETY: the caller's.
            let (k, v) = unsafe { (mem.read(kv), mem.read(vv)) };
            kernels::Attention { scale: *scale }.forward(
                (x, &xv.dims, &xv.strides),
                (k, &kv.dims, &kv.strides),
                (v, &vv.dims, &vv.strides),
                &SharedOut::of(o),
            )?
        }
        Op::Binary(op) => {
            let bv = &views[a.args[1]];
            // SAFETY: the caller's.
            let b = unsafe { mem.read(bv) };
            binary(*op, (&x[..x_len], &xv.dims), (&b[..bv.len()], &bv.dims), (o, &ov.dims))?
        }
        _ => return Err(run_err("no slice kernel for this op")),
    }
    Ok(())
}

/// A Concat: every input not already in place (`done`) copied into its slice of the output.
///
/// # Safety
/// See [`Mem::write`].
unsafe fn concat(op: &Op, views: &[View], a: &ArenaStep, done: &[bool], mem: &Mem) -> candle_core::Result<()> {
    let Op::Concat { axis } = op else {
        return Err(run_err("not a concat"));
    };
    let ov = &views[a.outs[0]];
    let d = super::ops::axis(*axis, ov.dims.len())?;
    let inner: usize = ov.dims[d + 1..].iter().product();
    let outer: usize = ov.dims[..d].iter().product();
    let row = ov.dims[d] * inner;
    let mut at = 0;
    for (&i, &in_place) in a.args.iter().zip(done) {
        let v = &views[i];
        if v.dims.len() != ov.dims.len() || at + v.dims[d] * inner > row {
            return Err(run_err("concat input shapes"));
        }
        let block = v.dims[d] * inner;
        if !in_place {
            // SAFETY: the caller's; the output's other slices are not `v`'s elements.
            let (src, o) = unsafe { (mem.read(v), mem.write(ov)) };
            let dst = SharedOut::of(o);
            // Large blocks in pieces, so both cores copy.
            let piece = block.clamp(1, 1 << 15);
            let pieces = block.div_ceil(piece);
            (0..outer * pieces).into_par_iter().for_each(|t| {
                let (r, p) = (t / pieces, t % pieces);
                let (s0, s1) = (p * piece, ((p + 1) * piece).min(block));
                // SAFETY: each task copies its own piece of row r's block for this input:
                // disjoint from every other task's, inside `o` (checked above).
                unsafe { dst.copy_from(r * row + at + s0, &src[r * block + s0..r * block + s1]) };
            });
        }
        at += block;
    }
    if at != row {
        return Err(run_err("concat inputs do not fill the output"));
    }
    Ok(())
}

/// Broadcast strides of an operand of dims `d` against output dims `out` (0 where broadcast).
fn bstrides(d: &[usize], out: &[usize]) -> [usize; kernels::MAX_RANK] {
    let mut s = [0usize; kernels::MAX_RANK];
    let lead = out.len() - d.len();
    // The contiguous strides, innermost first, worked out on the stack (this runs per frame).
    let mut st = 1;
    for (j, dim) in d.iter().enumerate().rev() {
        if *dim != 1 {
            s[lead + j] = st;
        }
        st *= dim;
    }
    s
}

/// `o = a op b`, broadcasting: a row (the output's last axis) at a time, each operand either
/// walking it or repeating one element along it.
fn binary(
    op: Bin,
    (a, da): (&[f32], &[usize]),
    (b, db): (&[f32], &[usize]),
    (o, dout): (&mut [f32], &[usize]),
) -> candle_core::Result<()> {
    let r = dout.len();
    let fits = |d: &[usize]| d.len() <= r && d.iter().rev().zip(dout.iter().rev()).all(|(x, y)| *x == *y || *x == 1);
    if r == 0 || r > kernels::MAX_RANK || !fits(da) || !fits(db) || o.len() != dout.iter().product::<usize>() {
        return Err(run_err("binary: shapes do not broadcast"));
    }
    if o.is_empty() {
        return Ok(());
    }
    match op {
        Bin::Add => bin_rows(|x, y| x + y, (a, da), (b, db), (o, dout)),
        Bin::Sub => bin_rows(|x, y| x - y, (a, da), (b, db), (o, dout)),
        Bin::Mul => bin_rows(|x, y| x * y, (a, da), (b, db), (o, dout)),
        Bin::Div => bin_rows(|x, y| x / y, (a, da), (b, db), (o, dout)),
    }
    Ok(())
}

fn bin_rows(
    f: impl Fn(f32, f32) -> f32 + Sync,
    (a, da): (&[f32], &[usize]),
    (b, db): (&[f32], &[usize]),
    (o, dout): (&mut [f32], &[usize]),
) {
    let r = dout.len();
    let (sa, sb) = (bstrides(da, dout), bstrides(db, dout));
    let n = dout[r - 1];
    // Same shape on both sides: one flat pass.
    if a.len() == o.len() && b.len() == o.len() {
        o.par_chunks_mut(1 << 14)
            .zip(a.par_chunks(1 << 14).zip(b.par_chunks(1 << 14)))
            .for_each(|(o, (a, b))| o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (x, y))| *o = f(*x, *y)));
        return;
    }
    let rows_per = (1usize << 14).div_ceil(n.max(1)).max(1);
    o.par_chunks_mut(rows_per * n).enumerate().for_each(|(c, chunk)| {
        for (i, orow) in chunk.chunks_exact_mut(n).enumerate() {
            // The row's offsets in a and b: the output row index over the leading axes.
            let mut row = c * rows_per + i;
            let (mut oa, mut ob) = (0, 0);
            for j in (0..r - 1).rev() {
                let k = row % dout[j];
                row /= dout[j];
                oa += k * sa[j];
                ob += k * sb[j];
            }
            match (sa[r - 1] == 1, sb[r - 1] == 1) {
                (true, true) => orow
                    .iter_mut()
                    .zip(&a[oa..oa + n])
                    .zip(&b[ob..ob + n])
                    .for_each(|((o, x), y)| *o = f(*x, *y)),
                (true, false) => {
                    let y = b[ob];
                    orow.iter_mut().zip(&a[oa..oa + n]).for_each(|(o, x)| *o = f(*x, y))
                }
                (false, true) => {
                    let x = a[oa];
                    orow.iter_mut().zip(&b[ob..ob + n]).for_each(|(o, y)| *o = f(x, *y))
                }
                (false, false) => orow.fill(f(a[oa], b[ob])),
            }
        }
    });
}

/// A step on candle: its inputs copied into tensors, its outputs copied into their regions.
///
/// # Safety
/// See [`Mem::write`].
unsafe fn fallback(st: &super::Step, views: &[View], a: &ArenaStep, mem: &Mem) -> candle_core::Result<()> {
    let mut args = Vec::with_capacity(a.args.len());
    for (src, &i) in st.inputs.iter().zip(&a.args) {
        args.push(match src {
            Src::Const(t) => t.clone(),
            Src::Slot(_) => {
                let v = &views[i];
                // SAFETY: the caller's.
                let data = unsafe { mem.read(v) };
                let mut c = vec![0f32; v.len()];
                if v.is_contiguous() {
                    c.copy_from_slice(&data[..v.len()]);
                } else {
                    kernels::Transpose::permute(ident(v.dims.len()), data, &v.dims, &v.strides, &mut c)?;
                }
                Tensor::from_vec(c, v.dims.as_slice(), &Device::Cpu)?
            }
        });
    }
    let refs: Vec<&Tensor> = args.iter().collect();
    let outs = super::ops::apply(&st.op, &refs)?;
    for (t, &o) in outs.iter().zip(&a.outs) {
        let v = &views[o];
        if t.dims() != v.dims.as_slice() {
            return Err(candle_core::Error::Msg(format!(
                "gave {:?} where the traced run gave {:?}",
                t.dims(),
                v.dims
            )));
        }
        let data: Vec<f32> = t.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1()?;
        // SAFETY: the caller's.
        unsafe { mem.write(v) }.copy_from_slice(&data);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Plan;
    use super::*;

    /// Packing: a region is reused once its last reader has run, never while it is live.
    /// Reshaped strides, where they exist, read what the permuted tensor copied out and
    /// reshaped holds; where they do not (axes merged across a transpose), none.
    #[test]
    fn reshaped_strides_read_what_a_copy_would() {
        /// (dims, permutation, new dims, whether strides exist)
        type Case<'a> = (&'a [usize], &'a [usize], &'a [usize], bool);
        let cases: &[Case] = &[
            (&[2, 3, 4], &[0, 1, 2], &[6, 4], true),
            (&[2, 3, 4], &[0, 2, 1], &[2, 12], false),
            (&[2, 3, 4], &[0, 2, 1], &[2, 2, 2, 3], true),
            (&[4, 6, 5], &[1, 0, 2], &[6, 4, 5, 1], true),
            (&[4, 6, 5], &[1, 0, 2], &[6, 20], false),
            (&[4, 6, 5], &[2, 0, 1], &[5, 24], true),
            (&[4, 6, 5], &[1, 0, 2], &[24, 5], false),
            (&[1, 6, 10], &[0, 2, 1], &[1, 2, 5, 3, 2], true),
            (&[3, 1, 4], &[2, 1, 0], &[1, 4, 3], true),
        ];
        for &(dims, perm, new, exists) in cases {
            let st = contiguous_strides(dims);
            let (pd, ps): (Vec<usize>, Vec<usize>) = perm.iter().map(|&p| (dims[p], st[p])).unzip();
            // The permuted tensor copied out: element i is at offset `gather(pd, ps, i)`.
            let gather = |d: &[usize], s: &[usize], mut i: usize| {
                let mut off = 0;
                for (d, s) in d.iter().zip(s).rev() {
                    off += i % d * s;
                    i /= d;
                }
                off
            };
            let got = reshaped_strides(&pd, &ps, new);
            assert_eq!(got.is_some(), exists, "{dims:?} {perm:?} -> {new:?}: {got:?}");
            if let Some(ns) = got {
                for i in 0..dims.iter().product() {
                    assert_eq!(
                        gather(new, &ns, i),
                        gather(&pd, &ps, i),
                        "{dims:?} {perm:?} -> {new:?} at {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn regions_are_reused_only_after_their_last_reader() {
        let mut p = Packer {
            live: Vec::new(),
            end: 0,
        };
        let a = p.place(100, 0, 2); // written at 0, read until 2
        let b = p.place(100, 1, 1); // written at 1, read at 1
        assert_ne!(a, b);
        let c = p.place(50, 2, 3); // b is free at 2, a is not
        assert_eq!(c, b);
        let d = p.place(200, 3, 4); // a is free at 3; c is live
        assert!(d >= c + 64 || d + 208 <= c, "{d} overlaps {c}");
        assert_eq!(p.end % ALIGN, 0);
    }

    /// The broadcasting binary kernel against candle's, on the shapes graphs use: same shape,
    /// a per-channel operand, a scalar, a row, leading 1s, and both sides broadcast.
    #[test]
    fn binary_ops_broadcast_like_candle() {
        let dev = Device::Cpu;
        let cases: [(&[usize], &[usize]); 6] = [
            (&[2, 3, 4, 5], &[2, 3, 4, 5]),
            (&[2, 3, 4, 5], &[1, 3, 1, 1]),
            (&[2, 3, 4, 5], &[1]),
            (&[2, 3, 4, 5], &[5]),
            (&[3, 1, 5], &[2, 1, 4, 1]),
            (&[1, 7], &[6, 1]),
        ];
        for (da, db) in cases {
            let a = Tensor::randn(0f32, 1.0, da, &dev).unwrap();
            let b = Tensor::rand(0.5f32, 2.0, db, &dev).unwrap();
            for op in [Bin::Add, Bin::Sub, Bin::Mul, Bin::Div] {
                let want = match op {
                    Bin::Add => a.broadcast_add(&b),
                    Bin::Sub => a.broadcast_sub(&b),
                    Bin::Mul => a.broadcast_mul(&b),
                    Bin::Div => a.broadcast_div(&b),
                }
                .unwrap();
                let want_v: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                let bv: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                let mut o = vec![0f32; want_v.len()];
                binary(op, (&av, da), (&bv, db), (&mut o, want.dims())).unwrap();
                assert_eq!(o, want_v, "{da:?} x {db:?}");
            }
        }
        let mut o = vec![0f32; 6];
        assert!(binary(Bin::Add, (&[0.0; 6], &[2, 3]), (&[0.0; 2], &[2]), (&mut o, &[2, 3])).is_err());
    }

    /// A plan's frames on the arena against the same plan over candle tensors, and the arena
    /// laid out once: the second and third frames reuse it.
    fn arena_matches_candle(bytes: &[u8], dims: &[usize], tol: f32) -> Plan {
        let mut plan = Plan::from_onnx(bytes).unwrap();
        for round in 0..3 {
            let x = Tensor::rand(0f32, 1.0, dims, &Device::Cpu).unwrap();
            let input: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut got = Vec::new();
            let shape = plan.run_slice(&input, dims, &Device::Cpu, &mut got, None).unwrap();
            assert!(
                plan.arena.as_ref().is_some_and(|a| a.fits(dims)),
                "round {round}: no arena"
            );
            let want = plan.run(x).unwrap();
            assert_eq!(shape, want.dims());
            let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            let mut worst = 0f32;
            for (a, b) in got.iter().zip(&want) {
                worst = worst.max((a - b).abs() / b.abs().max(1.0));
            }
            assert!(worst <= tol, "round {round}: largest relative difference {worst}");
        }
        plan
    }

    #[test]
    fn the_arena_matches_candle_on_the_fusions_fixture() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fusions.onnx")).unwrap();
        let plan = arena_matches_candle(&bytes, &[1, 4, 6, 6], 1e-6);
        // Conv (a kernel), Reshape (a view), the fused softmax (a kernel): nothing on candle.
        assert_eq!(plan.arena.as_ref().unwrap().fallbacks, 0);
    }

    /// An op with no slice kernel (GlobalAveragePool) runs on candle over copies, and the
    /// Flatten after it is a view of its region; a new input size lays out a new arena.
    #[test]
    fn an_op_without_a_slice_kernel_runs_on_candle_and_a_new_size_gets_a_new_arena() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dynamic-gap.onnx")).unwrap();
        for dims in [[1, 3, 32, 48], [2, 3, 20, 20]] {
            let plan = arena_matches_candle(&bytes, &dims, 1e-6);
            let a = plan.arena.as_ref().unwrap();
            assert_eq!(a.fallbacks, 1);
            assert!(matches!(a.steps[1].exec, Exec::Alias));
        }
        let mut plan = Plan::from_onnx(&bytes).unwrap();
        let mut out = Vec::new();
        plan.run_slice(&[0.5; 3 * 8 * 8], &[1, 3, 8, 8], &Device::Cpu, &mut out, None)
            .unwrap();
        plan.run_slice(&[0.25; 2 * 3 * 4 * 4], &[2, 3, 4, 4], &Device::Cpu, &mut out, None)
            .unwrap();
        assert!(plan.arena.as_ref().is_some_and(|a| a.fits(&[2, 3, 4, 4])));
        assert_eq!(out, [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]);
    }

    /// YOLOv12n (`models/fetch`): every op it uses runs on a slice kernel or as a view, and
    /// the arena is a fraction of what the tensors per step allocate.
    #[test]
    fn the_arena_matches_candle_on_yolov12n() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/.cache/yolov12n.onnx");
        let bytes = std::fs::read(path).expect("run `bash models/fetch` for yolov12n.onnx");
        // The arena runs attention fused (`kernels::Attention`), which sums the scores and
        // the softmax in another order than the plan's candle ops: 0.85-1.3e-5 apart on an
        // AVX-512 CPU, bit-identical with the fusion off. A step wired wrong is off by far more.
        let plan = arena_matches_candle(&bytes, &[1, 3, 640, 640], 5e-5);
        let a = plan.arena.as_ref().unwrap();
        let aliases = a.steps.iter().filter(|s| matches!(s.exec, Exec::Alias)).count();
        assert!(aliases > 30, "{aliases} steps as views");
        let on_candle: Vec<&str> = plan
            .steps
            .iter()
            .zip(&a.steps)
            .filter(|(_, s)| matches!(s.exec, Exec::Fallback))
            .map(|(s, _)| s.name.as_str())
            .collect();
        assert_eq!(a.fallbacks, 0, "steps on candle: {on_candle:?}");
        // Concats whose inputs were all written in place by their producers: no copy at all.
        let concats = plan.steps.iter().filter(|s| matches!(s.op, Op::Concat { .. })).count();
        let in_place = a
            .steps
            .iter()
            .filter(|s| matches!(&s.exec, Exec::Concat(done) if done.iter().all(|d| *d)))
            .count();
        assert!(in_place * 2 > concats, "{in_place} of {concats} concats in place");
        // The sum of every step's output is about 70 M elements; the packed arena far less.
        assert!(a.len() < 16 << 20, "arena of {} elements", a.len());
        println!(
            "arena: {} elements, {aliases} views, {in_place} of {concats} concats in place",
            a.len()
        );
    }
}
