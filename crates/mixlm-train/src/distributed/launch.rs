//! The peers of one process as threads, and the watchdog that stops them all when
//! one fails or stops answering, with an error that names it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use burn::tensor::backend::Backend;

use super::peer::CutOff;
use super::Rank;

/// What the watchdog of [`run_peers`] sees of one peer.
#[derive(Debug, Default)]
pub struct Heartbeat {
    /// The optimizer step it is in.
    step: AtomicU64,
    /// Set while it waits in a collective operation: which one, since when.
    waiting: Mutex<Option<(&'static str, Instant)>>,
    /// Its work returned `Ok` (a thread that ended without it failed).
    succeeded: AtomicBool,
    /// Its error, when its work returned one (for the report when the others cannot
    /// be stopped).
    failure: Mutex<Option<String>>,
}

impl Heartbeat {
    /// Records the step the peer works on (named in hang reports).
    pub fn at_step(&self, step: u64) {
        self.step.store(step, Ordering::Relaxed);
    }

    /// Runs `f` marked as waiting for the other peers in `what`, so the watchdog
    /// names a peer that never arrives.
    pub(super) fn waiting_in<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        *self.waiting.lock().expect("heartbeat lock") = Some((what, Instant::now()));
        let out = f();
        *self.waiting.lock().expect("heartbeat lock") = None;
        out
    }

    fn waiting_since(&self) -> Option<(&'static str, Instant)> {
        *self.waiting.lock().expect("heartbeat lock")
    }
}

/// A peer thread that panicked, kept as its own error so the caller can still tell
/// what the panic said (Burn reports exhausted device memory by panicking).
#[derive(Debug, thiserror::Error)]
#[error("peer {rank} panicked: {message}")]
pub struct PeerPanic {
    pub rank: usize,
    pub message: String,
}

/// Runs `body` on `world` peers, threads of this process, and returns peer 0's result.
///
/// A watchdog polls the peers: when one fails (an error or a panic), the collective
/// is reset so the others' waits end at once; when one has waited in a collective
/// operation for `timeout` while a peer has not arrived, the others are stopped the
/// same way and the error names the late peer and its step. The error returned is
/// the first peer's own (not the others' "another peer stopped").
pub fn run_peers<B, T, F>(world: usize, timeout: Duration, body: F) -> Result<T>
where
    B: Backend,
    T: Send,
    F: Fn(Rank, Arc<Heartbeat>) -> Result<T> + Sync,
{
    let beats: Vec<Arc<Heartbeat>> = (0..world).map(|_| Arc::default()).collect();
    // Set once the watchdog has stopped the peers (it then only waits for them).
    let mut failed = false;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let beat = beats[rank].clone();
                let body = &body;
                std::thread::Builder::new()
                    .name(format!("mixlm-peer-{rank}"))
                    .spawn_scoped(s, move || {
                        let result = body(Rank { rank, world }, beat.clone());
                        if let Err(e) = &result {
                            *beat.failure.lock().expect("heartbeat lock") = Some(format!("{e:#}"));
                        }
                        beat.succeeded.store(result.is_ok(), Ordering::SeqCst);
                        result
                    })
                    .expect("cannot start a peer thread")
            })
            .collect();
        let mut hang: Option<anyhow::Error> = None;
        // Once the peers were told to stop: what to say if some never return, and when.
        let mut gave_up: Option<(String, Instant)> = None;
        let grace = (2 * timeout).min(HANG_GRACE);
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
            if let Some((report, at)) = &gave_up {
                // A peer stuck in its own work (a hung kernel, a deadlock, an NCCL
                // all-reduce waiting for a peer that failed) never returns, and a
                // thread cannot be killed: after a grace period for the others to
                // wind down, the process ends with the report.
                if at.elapsed() > grace {
                    eprintln!("error: {report}");
                    std::process::exit(1);
                }
            }
            if failed {
                continue;
            }
            let ended_badly = handles
                .iter()
                .zip(&beats)
                .position(|(h, b)| h.is_finished() && !b.succeeded.load(Ordering::SeqCst));
            if let Some(rank) = ended_badly {
                // A peer failed: the others would wait for it forever.
                failed = true;
                reset::<B>();
                gave_up = Some((
                    stuck_after_failure(rank, &beats[rank], grace),
                    Instant::now(),
                ));
                continue;
            }
            if let Some(report) = hung_peer(&beats, timeout) {
                failed = true;
                gave_up = Some((report.clone(), Instant::now()));
                hang = Some(anyhow!(report));
                reset::<B>();
            }
        }
        let mut results: Vec<Result<T>> = handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().unwrap_or_else(|panic| {
                    let message = match panic_message(&panic) {
                        "" => "(no message)",
                        msg => msg,
                    };
                    Err(PeerPanic {
                        rank,
                        message: message.to_string(),
                    }
                    .into())
                })
            })
            .collect();
        reset::<B>();
        if let Some(hang) = hang {
            return Err(hang);
        }
        // The root cause: an error that is not a consequence of another peer's.
        let first = results.iter().position(|r| {
            r.as_ref()
                .is_err_and(|e| e.downcast_ref::<CutOff>().is_none())
        });
        if let Some(i) = first {
            let e = results.swap_remove(i).err().expect("an error");
            return Err(e.context(format!("data-parallel training stopped: peer {i} failed")));
        }
        if let Some(i) = results.iter().position(Result::is_err) {
            let e = results.swap_remove(i).err().expect("an error");
            return Err(e.context("data-parallel training stopped"));
        }
        results.swap_remove(0)
    })
}

/// Ends every pending collective operation of this process (its waiters get an
/// error). Tolerates a collective server that has already stopped.
fn reset<B: Backend>() {
    let _ = std::panic::catch_unwind(burn_collective::reset_collective::<B>);
}

/// How long a hung peer may take to return once the others have given up on it (at
/// most twice `distributed.timeout_s`).
const HANG_GRACE: Duration = Duration::from_secs(30);

/// The report when peer `rank` failed and some others did not return after `grace`.
fn stuck_after_failure(rank: usize, beat: &Heartbeat, grace: Duration) -> String {
    let cause = beat
        .failure
        .lock()
        .expect("heartbeat lock")
        .clone()
        .unwrap_or_else(|| "it panicked (the message is above)".into());
    format!(
        "data-parallel training stopped: peer {rank} failed: {cause}; the other peers did \
         not stop within {:.1}s (stuck in a device operation, such as a gradient all-reduce \
         waiting for the failed peer); resume from the last checkpoint with `mixlm train \
         --resume`",
        grace.as_secs_f64()
    )
}

/// A report when some peer has waited in a collective operation for longer than
/// `timeout`: which peers never arrived, and where each one was.
fn hung_peer(beats: &[Arc<Heartbeat>], timeout: Duration) -> Option<String> {
    let (what, since) = beats
        .iter()
        .filter_map(|b| b.waiting_since())
        .min_by_key(|(_, since)| *since)?;
    if since.elapsed() < timeout {
        return None;
    }
    let late: Vec<String> = beats
        .iter()
        .enumerate()
        .filter(|(_, b)| b.waiting_since().is_none())
        .map(|(rank, b)| {
            format!(
                "peer {rank} (at step {})",
                b.step.load(Ordering::Relaxed) + 1
            )
        })
        .collect();
    let late = if late.is_empty() {
        "a peer on another node (every peer of this one is waiting)".to_string()
    } else {
        late.join(", ")
    };
    Some(format!(
        "data-parallel training stopped: peers waited {:.1}s in the {what} for {late}, \
         which stopped answering (distributed.timeout_s = {}); resume from the last \
         checkpoint with `mixlm train --resume`",
        since.elapsed().as_secs_f64(),
        timeout.as_secs()
    ))
}

/// The text a panic was raised with ("" when it carries none).
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("")
}
