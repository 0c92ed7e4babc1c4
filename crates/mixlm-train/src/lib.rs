//! mixlm's trainer: one training run. Its config, the loop and the components it
//! asks for each part of a step (see `ARCHITECTURE.md`), checkpoints, metrics, and
//! the data-parallel peers. What is built on runs (comparisons, searches, the
//! SampleMix pipeline) is in `mixlm-experiments`; the commands that inspect
//! checkpoints, run folders and devices are in `mixlm-inspect`.

pub mod alignment;
pub mod backend;
pub mod chaos;
pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod engine;
pub mod faults;
pub mod laps;
pub mod loader;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod progress;
pub mod report;
pub mod resume;
pub mod run_report;
pub mod state;
pub mod tensorboard;
pub mod trainer;
pub mod validation;

pub use backend::{train_on, BackendKind};
pub use config::RunConfig;
pub use trainer::{train, Start, TrainOptions, TrainOutcome};
