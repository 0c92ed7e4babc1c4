//! A test hook for the chaos test (`crates/mixlm-cli/tests/resume.rs`): stops the
//! process at a named point of the run so that the test can kill it there with
//! SIGKILL, including in windows too short to hit from outside (between a checkpoint
//! folder's rename and the rewrite of `latest`).
//!
//! `MIXLM_TEST_PAUSE=<point>:<n>:<marker file>`: the `n`-th time this process reaches
//! `point` it writes the marker file and sleeps until killed. Without the variable,
//! [`pause_at`] costs one atomic load. Points: `step` (an optimizer update applied,
//! its record not written), `eval` (validation losses measured, not logged),
//! `metrics-line` (half of a record's line written and flushed), `checkpoint-files`
//! (some files of a checkpoint written in its `.tmp` folder), `checkpoint-renamed`
//! (the folder renamed into place, `latest` not rewritten), `checkpoint-latest`
//! (`latest` rewritten, older checkpoints not pruned).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Pause {
    point: String,
    nth: u64,
    marker: std::path::PathBuf,
    arrivals: AtomicU64,
}

fn pause() -> Option<&'static Pause> {
    static PAUSE: OnceLock<Option<Pause>> = OnceLock::new();
    PAUSE
        .get_or_init(|| {
            let spec = std::env::var("MIXLM_TEST_PAUSE").ok()?;
            let mut parts = spec.splitn(3, ':');
            Some(Pause {
                point: parts.next()?.to_string(),
                nth: parts.next()?.parse().ok()?,
                marker: parts.next()?.into(),
                arrivals: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Whether this arrival at `point` is the one to stop at (counted per process).
pub fn is_pause(point: &str) -> bool {
    pause()
        .is_some_and(|p| p.point == point && p.arrivals.fetch_add(1, Ordering::SeqCst) + 1 == p.nth)
}

/// Marks the pause and waits to be killed.
pub fn wait_to_be_killed() -> ! {
    if let Some(p) = pause() {
        let _ = std::fs::write(&p.marker, &p.point);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Stops here if this is the arrival [`MIXLM_TEST_PAUSE`](self) names.
pub fn pause_at(point: &str) {
    if is_pause(point) {
        wait_to_be_killed();
    }
}
