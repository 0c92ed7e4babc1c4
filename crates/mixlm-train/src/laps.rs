//! A step's wall-clock, split by part as it goes ([`StepTimes`]).

use std::time::Instant;

use crate::metrics::StepTimes;

/// Adds the time since the previous lap to the part named by each call.
pub struct Laps {
    clock: Instant,
    pub times: StepTimes,
}

impl Laps {
    /// Starts a step; `other`: the bookkeeping since the previous step's record.
    pub fn start(other: f64) -> Self {
        Self {
            clock: Instant::now(),
            times: StepTimes {
                other,
                ..StepTimes::default()
            },
        }
    }

    fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let lap = (now - self.clock).as_secs_f64();
        self.clock = now;
        lap
    }

    /// Waiting for a batch.
    pub fn data(&mut self) {
        self.times.data += self.lap();
    }

    /// Forward, backward, optimizer.
    pub fn model(&mut self) {
        self.times.model += self.lap();
    }

    /// The scheduler.
    pub fn mixing(&mut self) {
        self.times.mixing += self.lap();
    }
}
