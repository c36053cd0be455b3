//! The machine's float32 peak in the direct engine's vectors: a kernel of nothing but
//! independent fused multiply-adds in the widest registers the CPU has ([`Lanes`]), on the
//! threads a run uses, each pinned to a core of its own; and the theoretical figure from what
//! the CPU and the kernel report. `lenet5 bench --what peak` prints both, and `scripts/bench`
//! states every row's GFLOP/s as a share of the measured one.

use serde::Serialize;
use std::collections::HashSet;
use std::sync::Barrier;
use std::time::Instant;

use super::lanes::*;

/// Independent accumulators each thread keeps in flight. An FMA's result is ready about four
/// cycles after it starts and a core with two FMA units starts two a cycle, so it takes at
/// least eight chains to keep both busy; twelve leave a margin and, with the two constants,
/// fit in AVX2's sixteen registers.
pub const CHAINS: usize = 12;
/// Seconds of one timed trial; the best of the trials is the peak.
const TRIAL_SECONDS: f64 = 0.1;

/// What [`measure`] found.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Float32 operations per second of all threads together, in 1e9 (an FMA is 2).
    pub gflops: f64,
    pub threads: usize,
    /// Floats in one register of the kernel.
    pub lanes: usize,
    pub chains: usize,
    pub instructions: &'static str,
    /// The CPU each thread was pinned to; empty where pinning is not available.
    pub cpus: Vec<usize>,
    /// The best trial's seconds.
    pub seconds: f64,
}

/// The float32 peak of `threads` threads, each running [`CHAINS`] chains of FMAs on a core of
/// its own while there are cores: the best of `trials` trials of about 0.1 s.
pub fn measure(threads: usize, trials: usize) -> Measured {
    let threads = threads.max(1);
    let order = core_order();
    let cpus: Vec<usize> = order.iter().copied().cycle().take(if order.is_empty() { 0 } else { threads }).collect();
    let rounds = calibrate();
    let mut best = f64::INFINITY;
    let mut pinned = true;
    for _ in 0..trials.max(1) {
        let start = Barrier::new(threads + 1);
        let seconds = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|i| {
                    let (start, cpu) = (&start, cpus.get(i).copied());
                    s.spawn(move || {
                        let pinned = cpu.is_some_and(pin_to);
                        start.wait();
                        std::hint::black_box(run(rounds));
                        pinned
                    })
                })
                .collect();
            start.wait();
            let clock = Instant::now();
            for worker in workers {
                pinned &= worker.join().expect("the kernel does not panic");
            }
            clock.elapsed().as_secs_f64()
        });
        best = best.min(seconds);
    }
    let (lanes, instructions) = kernel();
    let flop = (threads * CHAINS * lanes * 2) as f64 * rounds as f64;
    Measured {
        gflops: flop / best / 1e9,
        threads,
        lanes,
        chains: CHAINS,
        instructions,
        cpus: if pinned { cpus } else { Vec::new() },
        seconds: best,
    }
}

/// cores x clock x lanes x 2 x FMA units, as far as the machine reports them.
#[derive(Debug, Clone, Serialize)]
pub struct Theoretical {
    /// Distinct cores among the first `threads` CPUs [`measure`] pins to.
    pub cores: usize,
    pub lanes: usize,
    pub mhz: Option<f64>,
    /// Where `mhz` came from, and how far to trust it.
    pub clock: &'static str,
    /// No CPU reports how many FMA units a core has: this is an assumption (two on Intel's
    /// server cores since Skylake-SP Gold, and on AVX2 cores since Haswell; one 512-bit FMA a
    /// cycle on Xeon Silver and on AMD Zen 4).
    pub fma_units_assumed: usize,
    /// None where the clock is not reported, or the CPU has no FMA.
    pub gflops: Option<f64>,
}

impl Theoretical {
    /// FMAs each core completed per cycle in `measured`, at the reported clock: the FMA units
    /// the measurement implies.
    pub fn fma_per_cycle(&self, measured: &Measured) -> Option<f64> {
        self.mhz.map(|mhz| measured.gflops * 1e3 / (self.cores as f64 * mhz * self.lanes as f64 * 2.0))
    }
}

/// The theoretical peak of `threads` threads placed as [`measure`] places them.
pub fn theoretical(threads: usize) -> Theoretical {
    let (lanes, _) = kernel();
    let order = core_order();
    let cores = if order.is_empty() { threads.max(1) } else { distinct_cores(&order[..threads.clamp(1, order.len())]) };
    let (mhz, clock) = clock_mhz();
    let fma_units_assumed = 2;
    let gflops =
        mhz.filter(|_| has_avx2()).map(|mhz| cores as f64 * mhz * 1e-3 * lanes as f64 * 2.0 * fma_units_assumed as f64);
    Theoretical { cores, lanes, mhz, clock, fma_units_assumed, gflops }
}

/// `rounds` rounds of one FMA on each of [`CHAINS`] accumulators, `acc = acc * m + c`, which
/// tends to 1 (no subnormals, no overflow); their sum, so no round can be left out. The
/// constants pass through `black_box`: the compiler saw that the chain starting at 1 stays
/// there, and dropped it.
#[inline(always)]
fn chains<L: Lanes>(rounds: u64) -> f32 {
    let (m, c, starts) = std::hint::black_box((0.999f32, 1e-3f32, [1.0f32; CHAINS]));
    let (m, c) = (L::splat(m), L::splat(c));
    let mut acc: [L; CHAINS] = array_of(|i| L::splat(starts[i] + i as f32));
    for _ in 0..rounds {
        for a in &mut acc {
            *a = c.mul_add(*a, m);
        }
    }
    acc.iter().map(|a| a.sum()).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn chains_avx512(rounds: u64) -> f32 {
    chains::<avx512::Avx512>(rounds)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_avx2(rounds: u64) -> f32 {
    chains::<avx2::Avx2>(rounds)
}

/// The kernel in the widest registers the CPU has.
fn run(rounds: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the features `chains_avx512` is compiled for.
        return unsafe { chains_avx512(rounds) };
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { chains_avx2(rounds) };
    }
    chains::<Portable>(rounds)
}

/// [`run`]'s register width in floats, and its instructions.
fn kernel() -> (usize, &'static str) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        return (avx512::Avx512::WIDTH, "AVX-512 FMA (vfmadd on zmm)");
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        return (avx2::Avx2::WIDTH, "AVX2 FMA (vfmadd on ymm)");
    }
    (Portable::WIDTH, "portable multiply and add (no FMA)")
}

/// Rounds of [`run`] that take about [`TRIAL_SECONDS`] on one thread; the doubling runs also
/// bring the core to the clock it keeps under wide FMAs.
fn calibrate() -> u64 {
    let mut rounds = 1 << 14;
    loop {
        let clock = Instant::now();
        std::hint::black_box(run(std::hint::black_box(rounds)));
        let seconds = clock.elapsed().as_secs_f64();
        if seconds >= TRIAL_SECONDS / 4.0 {
            return ((rounds as f64 * TRIAL_SECONDS / seconds) as u64).max(1);
        }
        rounds *= 2;
    }
}

/// The clock in MHz and where it came from: cpufreq's highest, else /proc/cpuinfo's
/// `cpu MHz` (on a VM the host's nominal clock; turbo can run above it, wide vectors below).
fn clock_mhz() -> (Option<f64>, &'static str) {
    let max_khz = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq");
    if let Some(khz) = max_khz.ok().and_then(|s| s.trim().parse::<f64>().ok()) {
        return (Some(khz / 1e3), "cpufreq's cpuinfo_max_freq (the highest clock the kernel knows)");
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok());
    match mhz {
        Some(mhz) => {
            (Some(mhz), "/proc/cpuinfo's cpu MHz (on a VM the nominal clock: turbo may run above it, AVX-512 below)")
        }
        None => (None, "not reported (no cpufreq, no cpu MHz in /proc/cpuinfo)"),
    }
}

/// The CPUs this process may run on, one of each core first, then their SMT siblings, so that
/// thread i pinned to the i-th has a core of its own while there are cores. Empty where the
/// affinity cannot be read.
fn core_order() -> Vec<usize> {
    let allowed = allowed_cpus();
    let mut seen = HashSet::new();
    let (first, siblings): (Vec<usize>, Vec<usize>) = allowed.iter().partition(|&&cpu| seen.insert(core_of(cpu)));
    first.into_iter().chain(siblings).collect()
}

fn distinct_cores(cpus: &[usize]) -> usize {
    cpus.iter().map(|&cpu| core_of(cpu)).collect::<HashSet<_>>().len()
}

/// (package, core) of a CPU as sysfs reports it; the CPU itself where it does not.
fn core_of(cpu: usize) -> (i64, i64) {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{cpu}/topology/{what}"))
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
    };
    match (read("physical_package_id"), read("core_id")) {
        (Some(package), Some(core)) => (package, core),
        _ => (-1, cpu as i64),
    }
}

#[cfg(target_os = "linux")]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set, and sched_getaffinity writes at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect()
    }
}

/// Pins the calling thread to `cpu`; false where the kernel refuses.
#[cfg(target_os = "linux")]
fn pin_to(cpu: usize) -> bool {
    // SAFETY: as in allowed_cpus; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn allowed_cpus() -> Vec<usize> {
    Vec::new()
}

#[cfg(not(target_os = "linux"))]
fn pin_to(_cpu: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel computes what the recurrence gives, in every instruction set: 12 chains of
    /// `acc * 0.999 + 1e-3` from 1..=12, each summed over its lanes.
    #[test]
    fn the_kernel_computes_its_chains() {
        let rounds = 1000;
        let expected: f64 = (1..=CHAINS)
            .map(|i| {
                let mut acc = i as f64;
                for _ in 0..rounds {
                    acc = acc * 0.999 + 1e-3;
                }
                acc
            })
            .sum();
        let (lanes, _) = kernel();
        let got = run(rounds) as f64 / lanes as f64;
        assert!((got - expected).abs() < 1e-3 * expected, "{got} vs {expected}");
        let portable = chains::<Portable>(rounds) as f64 / Portable::WIDTH as f64;
        assert!((portable - expected).abs() < 1e-3 * expected, "{portable} vs {expected}");
    }

    #[test]
    fn threads_get_cores_of_their_own_first() {
        let order = core_order();
        let allowed = allowed_cpus();
        assert_eq!(order.iter().collect::<HashSet<_>>(), allowed.iter().collect::<HashSet<_>>());
        let cores = distinct_cores(&order);
        assert_eq!(distinct_cores(&order[..cores]), cores, "the first {cores} CPUs share a core: {order:?}");
    }
}
