//! The direct engine's threads are libtorch's own: the OpenMP team its parallel ops run on,
//! entered through `GOMP_parallel` (what `#pragma omp parallel` compiles to), looked up in
//! the running process, where libtorch has loaded its OpenMP runtime.
//!
//! A pool of the engine's own competed with that team: after each of libtorch's parallel ops
//! its idle workers spin for milliseconds before they sleep. In a notebook's loop, where the
//! loss and the optimizer run in libtorch between the engine's passes, that took a core from
//! the engine and halved its speed on two cores. On the team, the spinning worker is the one
//! that takes the engine's next share.
//!
//! A forked child inherits the team's bookkeeping but not its threads, and waits forever on
//! them (stock PyTorch's ops hang there too, which is why DataLoader workers run one thread).
//! After a fork the shares run one after another on the calling thread.

use std::any::Any;
use std::ffi::{c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{ensure, Result};

/// `GOMP_parallel(fn, data, num_threads, flags)`: `fn(data)` on every thread of a team.
type Parallel = unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
/// `omp_get_thread_num()` and `omp_get_num_threads()`.
type Query = unsafe extern "C" fn() -> c_int;

/// The three entry points of the OpenMP runtime the engine uses.
struct OpenMp {
    parallel: Parallel,
    thread_num: Query,
    num_threads: Query,
}

/// Set in a child process by the fork handler [`OpenMp::find`] registers.
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn after_fork_in_child() {
    FORKED.store(true, Ordering::Relaxed);
}

impl OpenMp {
    /// libtorch's OpenMP runtime (GNU libgomp on Linux; LLVM's libomp exports the same
    /// names), or None where the process has none.
    fn get() -> Option<&'static OpenMp> {
        static FOUND: OnceLock<Option<OpenMp>> = OnceLock::new();
        FOUND.get_or_init(OpenMp::find).as_ref()
    }

    fn find() -> Option<OpenMp> {
        let symbol = |name: &CStr| {
            // SAFETY: dlsym only reads the loaded objects' symbol tables.
            let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            (!address.is_null()).then_some(address)
        };
        let (parallel, thread_num, num_threads) =
            (symbol(c"GOMP_parallel")?, symbol(c"omp_get_thread_num")?, symbol(c"omp_get_num_threads")?);
        // SAFETY: registering a handler that only stores to an atomic.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
        // SAFETY: these are the OpenMP ABI's signatures of the three functions.
        unsafe {
            Some(OpenMp {
                parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
                thread_num: std::mem::transmute::<*mut c_void, Query>(thread_num),
                num_threads: std::mem::transmute::<*mut c_void, Query>(num_threads),
            })
        }
    }
}

/// Checks that a batch can be split across `threads` threads: more than one needs OpenMP.
pub fn check(threads: usize) -> Result<()> {
    ensure!(
        threads <= 1 || OpenMp::get().is_some(),
        "the direct engine runs its {threads} threads on libtorch's OpenMP team, and this process has no OpenMP runtime: use 1 thread"
    );
    Ok(())
}

/// `work` on every share, as many threads as shares, this thread taking the first; returns
/// the results in the shares' order once all are done. A panic in any share is raised again
/// here, after the team has finished.
pub fn run<S: Send, R: Send>(shares: Vec<S>, work: impl Fn(S) -> R + Sync) -> Vec<R> {
    let openmp = OpenMp::get().filter(|_| shares.len() > 1 && !FORKED.load(Ordering::Relaxed));
    let Some(openmp) = openmp else { return shares.into_iter().map(work).collect() };
    let results = std::iter::repeat_with(|| Mutex::new(None)).take(shares.len()).collect();
    let team = Team {
        openmp,
        shares: shares.into_iter().map(|s| Mutex::new(Some(s))).collect(),
        results,
        work: &work,
        panic: Mutex::new(None),
    };
    let threads = team.shares.len() as c_uint;
    // SAFETY: `member` gets `&team` back, which outlives the call: GOMP_parallel returns
    // when every thread of the team has returned from `member`.
    unsafe { (openmp.parallel)(member::<S, R>, &team as *const Team<S, R> as *mut c_void, threads, 0) };
    if let Some(panic) = team.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(panic);
    }
    team.results
        .into_iter()
        .map(|r| r.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every share was computed"))
        .collect()
}

/// What every thread of the team reads: its shares, where their results go, and the first panic.
struct Team<'a, S, R> {
    openmp: &'static OpenMp,
    shares: Vec<Mutex<Option<S>>>,
    results: Vec<Mutex<Option<R>>>,
    work: &'a (dyn Fn(S) -> R + Sync),
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// One thread of the team: shares `thread_num`, `thread_num + team size`, ... (all of them
/// if OpenMP gave a smaller team than asked for). No panic unwinds into OpenMP's C frames.
unsafe extern "C" fn member<S: Send, R: Send>(team: *mut c_void) {
    // SAFETY: `run` passes a `Team<S, R>` that lives until every member has returned.
    let team = unsafe { &*(team as *const Team<S, R>) };
    // SAFETY: called inside the parallel region.
    let (first, step) = unsafe { ((team.openmp.thread_num)() as usize, ((team.openmp.num_threads)() as usize).max(1)) };
    for i in (first..team.shares.len()).step_by(step) {
        let share = team.shares[i].lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(share) = share else { continue };
        match catch_unwind(AssertUnwindSafe(|| (team.work)(share))) {
            Ok(result) => *team.results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(result),
            Err(panic) => {
                team.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(panic);
            }
        }
    }
}

/// libtorch's intra-op threads, lent to the direct engine while any holder lives and given
/// back when the last one is dropped. The engine's passes run on OpenMP's team all the same;
/// libtorch's own ops between them (a training step's loss bookkeeping, the optimizer's square
/// root) are small, and on one thread they skip the team's start and barriers. Counted, so that
/// two models lending at once, dropped in either order, give back the count from before the
/// first, and an engine made while they are lent still gets every thread ([`Self::available`]).
pub struct LentThreads(());

/// How many holders there are, and libtorch's thread count before the first.
static LENT: Mutex<(usize, i32)> = Mutex::new((0, 0));

impl LentThreads {
    pub fn lend() -> LentThreads {
        let mut lent = LENT.lock().unwrap_or_else(|e| e.into_inner());
        if lent.0 == 0 {
            lent.1 = tch::get_num_threads();
            tch::set_num_threads(1);
        }
        lent.0 += 1;
        LentThreads(())
    }

    /// The threads the direct engine may split a batch across: libtorch's count, or what it
    /// was before it was lent.
    pub fn available() -> usize {
        let lent = LENT.lock().unwrap_or_else(|e| e.into_inner());
        (if lent.0 > 0 { lent.1 } else { tch::get_num_threads() }).max(1) as usize
    }
}

impl Drop for LentThreads {
    fn drop(&mut self) {
        let mut lent = LENT.lock().unwrap_or_else(|e| e.into_inner());
        lent.0 -= 1;
        if lent.0 == 0 {
            tch::set_num_threads(lent.1);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::panic::catch_unwind;

    use super::run;

    #[test]
    fn every_share_runs_once_on_a_thread_of_its_own_and_the_results_keep_their_order() {
        let results = run((0..4).collect(), |i| (i * 10, std::thread::current().id()));
        assert_eq!(results.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 10, 20, 30]);
        assert_eq!(results[0].1, std::thread::current().id(), "the first share runs on the calling thread");
        assert_eq!(results.iter().map(|r| r.1).collect::<HashSet<_>>().len(), 4, "four shares, four threads");
    }

    #[test]
    fn a_panic_in_a_share_is_raised_again_on_the_calling_thread_after_the_others_finish() {
        let finished = std::sync::atomic::AtomicUsize::new(0);
        let panic = catch_unwind(|| {
            run(vec![0, 1, 2], |i| {
                assert_ne!(i, 1, "share 1 fails");
                finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
        })
        .expect_err("share 1 panicked");
        let message = panic.downcast_ref::<String>().expect("assert_ne! panics with a String");
        assert!(message.contains("share 1 fails"), "{message}");
        assert_eq!(finished.into_inner(), 2);
    }
}
