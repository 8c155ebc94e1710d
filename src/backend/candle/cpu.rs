//! What the CPU kernels share: the instruction set chosen at run time, the
//! thread pool, and the fused activations.
//!
//! Kernels are written once, as plain loops the compiler vectorises, and
//! compiled three times by [`multiversion!`]: for AVX-512 (x86-64-v4), for
//! AVX2+FMA (x86-64-v3), and for the build's baseline, which stays correct
//! everywhere. [`Isa::detect`] picks one per process (`CANDLE_ISA` caps it);
//! a kernel can be handed another so that tests check every path this
//! machine can run. The GEMM crate dispatches on its own, to the best it has.

use std::sync::OnceLock;

static ISA: OnceLock<Isa> = OnceLock::new();
static CAP: OnceLock<Level> = OnceLock::new();

/// Caps the instruction set ("auto", "v4", "v3", "base"); before the first kernel runs.
pub fn set_isa_cap(cap: &str) {
    let cap = match cap {
        "base" => Level::Base,
        "v3" => Level::V3,
        _ => Level::V4,
    };
    if CAP.set(cap).is_err() && CAP.get() != Some(&cap) {
        log::warn!(
            "CANDLE_ISA={cap:?} ignored: the kernels have already chosen {:?}",
            Isa::detect()
        );
    }
}

/// An instruction-set level a kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The build target's baseline (SSE2 on x86-64; NEON on aarch64).
    Base,
    /// AVX2 and FMA.
    V3,
    /// AVX-512 (F, VL) with AVX2 and FMA.
    V4,
}

/// A [`Level`] this CPU runs: made only by [`Isa::detect`] and
/// [`Isa::supported`], which check the CPU, so a kernel handed an `Isa` may
/// use its instructions (the field is private to this module).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Isa(Level);

impl std::fmt::Debug for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Isa {
    /// The best this CPU runs under the cap (`CANDLE_ISA`), chosen once.
    pub fn detect() -> Isa {
        *ISA.get_or_init(|| {
            let supported = Isa::supported();
            let best = supported.last().copied().unwrap_or(Isa(Level::Base));
            let cap = *CAP.get_or_init(|| Level::V4);
            // The best supported level at or below the cap.
            let isa = supported
                .iter()
                .rev()
                .find(|i| i.0 <= cap)
                .copied()
                .unwrap_or(Isa(Level::Base));
            log::info!("Candle CPU kernels: {isa:?} (this CPU: up to {best:?})");
            isa
        })
    }

    /// Every instruction set this CPU runs, the baseline first.
    pub fn supported() -> Vec<Isa> {
        let mut v = vec![Isa(Level::Base)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa(Level::V3));
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                    v.push(Isa(Level::V4));
                }
            }
        }
        v
    }

    pub fn level(self) -> Level {
        self.0
    }
}

/// Defines `fn NAME(isa: Isa, args...)` from one body, compiled for each [`Isa`].
/// The body sees `const FMA: bool`: whether fused multiply-add is an instruction.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::backend::candle::cpu::Isa, $($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<const FMA: bool>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) { body::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) { body::<true>($($arg),*) }
                use $crate::backend::candle::cpu::Level;
                match isa.level() {
                    // SAFETY: an `Isa` of level V4 exists only where `Isa::supported`
                    // found AVX-512 F and VL, AVX2 and FMA on this CPU.
                    Level::V4 => return unsafe { v4($($arg),*) },
                    // SAFETY: likewise, level V3 only where AVX2 and FMA were found.
                    Level::V3 => return unsafe { v3($($arg),*) },
                    Level::Base => {}
                }
            }
            let _ = isa;
            body::<false>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// Sets the kernels' thread count (0: one per CPU) for the whole process. The
/// first call wins; later calls with another count are logged and ignored.
pub fn set_threads(n: usize) {
    let pool = POOL.get_or_init(|| build(n));
    if n != 0 && pool.current_num_threads() != n {
        log::warn!(
            "CANDLE_THREADS={n} ignored: the CPU pool already runs {} threads",
            pool.current_num_threads()
        );
    }
}

fn build(n: usize) -> rayon::ThreadPool {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("aei-cpu-{i}"))
        .build()
        .unwrap_or_else(|e| {
            log::warn!("CPU pool of {n} threads: {e}; running on one");
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .expect("a one-thread pool")
        });
    log::info!("Candle CPU pool: {} threads", pool.current_num_threads());
    pool
}

/// Runs `f` on a thread of the CPU pool, so that every parallel step inside
/// it runs on the pool with the calling worker taking part, instead of
/// waking the caller and the pool once per layer.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    POOL.get_or_init(|| build(0)).install(f)
}

/// Threads the kernels split work across (the pool's, when called inside [`run`]).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// An activation fused into a kernel's last pass. EfficientNet uses ReLU6;
/// the others serve ONNX graphs, which builds without `candle-graph` leave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "candle-graph"), allow(dead_code))]
pub enum Act {
    None,
    Relu,
    Relu6,
    Silu,
    Sigmoid,
    /// Not an activation, but an element-wise function the kernels vectorise all the same.
    Exp,
}

impl Act {
    /// Applies to every element (the match outside the loop, so each loop vectorises).
    #[inline(always)]
    pub fn apply_all(self, s: &mut [f32]) {
        match self {
            Act::None => {}
            Act::Relu => s.iter_mut().for_each(|v| *v = v.max(0.0)),
            Act::Relu6 => s.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0)),
            Act::Silu => s.iter_mut().for_each(|v| *v /= 1.0 + (-*v).exp()),
            Act::Sigmoid => s.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
            Act::Exp => s.iter_mut().for_each(|v| *v = v.exp()),
        }
    }
}

/// Splits `n` items into runs of at most `most` (at least one item each), as
/// many runs as it takes rounded up to a multiple of the pool's threads, so
/// that no thread is left with one run more than the others: `(runs, items per run)`.
pub fn split(n: usize, most: usize) -> (usize, usize) {
    let t = threads().max(1);
    let runs = n.div_ceil(most.max(1)).div_ceil(t) * t;
    let per = n.div_ceil(runs.clamp(1, n.max(1))).max(1);
    (n.div_ceil(per), per)
}

/// `o = x`, sixteen lanes at a time, inline: the rows the kernels copy are short (16
/// to 320 floats), and a call to `memmove` per row cost more than the copy (7 % of
/// YOLOv12n's time in the graph's rows, 3.7 % in `pack_b`'s panel rows).
#[inline(always)]
pub fn copy_short(x: &[f32], o: &mut [f32]) {
    assert_eq!(x.len(), o.len(), "copy_short: lengths");
    let mut oc = o.chunks_exact_mut(16);
    let mut xc = x.chunks_exact(16);
    for (o, x) in (&mut oc).zip(&mut xc) {
        let (o, x): (&mut [f32; 16], &[f32; 16]) = (o.try_into().unwrap(), x.try_into().unwrap());
        *o = *x;
    }
    for (o, x) in oc.into_remainder().iter_mut().zip(xc.remainder()) {
        *o = *x;
    }
}
