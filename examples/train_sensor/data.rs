//! A synthetic machine: temperature (°C), vibration (mm/s RMS) and motor current (A) read
//! once a step, and three faults. Deterministic from its seed (SplitMix64 and Box-Muller), so
//! the training run and the tests see the same machines.
//!
//! Normal: the load swings slowly (a sine of period 60..180 steps); the current follows the
//! load, the temperature follows the load a little behind it, the vibration rises with the
//! load; each machine has its own baseline, and every reading its sensor noise.
//!
//! Faults start at some step and grow with their age (readings since the onset):
//! - overheating: the temperature climbs about 1 °C a reading, the load does not explain it;
//! - bearing wear: the vibration grows and gets rough (50 % more, then 10 % more a reading);
//! - electrical: the current surges 25 % above what the load draws, the temperature does not
//!   follow.

/// SplitMix64: small, fast, and the same on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-12);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Overheating,
    BearingWear,
    Electrical,
}

impl Fault {
    pub const ALL: [Fault; 3] = [Fault::Overheating, Fault::BearingWear, Fault::Electrical];
    pub fn name(self) -> &'static str {
        match self {
            Fault::Overheating => "overheating",
            Fault::BearingWear => "bearing_wear",
            Fault::Electrical => "electrical",
        }
    }
}

pub const FIELDS: [&str; 3] = ["temperature", "vibration", "current"];

/// One machine's readings, step by step.
pub struct Machine {
    rng: Rng,
    temp0: f64,
    vib0: f64,
    amps0: f64,
    period: f64,
    phase: f64,
    step: u64,
    /// The temperature lags the load: its smoothed value.
    heat: f64,
}

impl Machine {
    pub fn new(seed: u64) -> Machine {
        let mut rng = Rng::new(seed);
        let phase = rng.range(0.0, std::f64::consts::TAU);
        let period = rng.range(60.0, 180.0);
        let load = 0.7 + 0.25 * phase.sin();
        Machine {
            temp0: rng.range(55.0, 65.0),
            vib0: rng.range(1.6, 2.4),
            amps0: rng.range(9.0, 11.0),
            period,
            phase,
            step: 0,
            heat: load,
            rng,
        }
    }

    /// The next reading; `fault` is the fault in progress and its age in readings.
    pub fn reading(&mut self, fault: Option<(Fault, usize)>) -> [f32; 3] {
        self.step += 1;
        let t = self.step as f64;
        let load = 0.7 + 0.25 * (std::f64::consts::TAU * t / self.period + self.phase).sin();
        self.heat += 0.3 * (load - self.heat);
        let r = &mut self.rng;
        let mut amps = self.amps0 * load + 0.15 * r.normal();
        let mut temp = self.temp0 + 12.0 * (self.heat - 0.7) + 0.3 * r.normal();
        let mut vib = self.vib0 * (0.8 + 0.4 * load) + 0.08 * r.normal();
        match fault {
            Some((Fault::Overheating, age)) => temp += (1.0 + age as f64).min(10.0),
            Some((Fault::BearingWear, age)) => {
                vib *= 1.5 + 0.1 * (age as f64).min(10.0);
                vib += 0.3 * r.normal().abs();
            }
            Some((Fault::Electrical, _)) => amps *= 1.25 + 0.05 * r.normal(),
            None => {}
        }
        [temp as f32, vib as f32, amps as f32]
    }
}

/// A window of `window` consecutive readings of a fresh machine (seeded by `seed`), after a
/// warm-up of a random length; with a fault, it starts inside the window so that at least
/// `min_faulty` of its readings carry it.
pub fn window(seed: u64, window: usize, fault: Option<Fault>, min_faulty: usize) -> Vec<[f32; 3]> {
    let mut m = Machine::new(seed);
    let mut r = Rng::new(seed ^ 0xA5A5_5A5A_0F0F_F0F0);
    for _ in 0..(r.uniform() * 200.0) as usize {
        m.reading(None);
    }
    let onset = match fault {
        Some(_) => (r.uniform() * (window - min_faulty + 1) as f64) as usize,
        None => window,
    };
    (0..window)
        .map(|i| m.reading(fault.filter(|_| i >= onset).map(|f| (f, i - onset))))
        .collect()
}
