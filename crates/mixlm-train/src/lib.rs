//! mixlm's trainer: config, optimizer, training loop, checkpoints and metrics.

pub mod alignment;
pub mod backend;
pub mod chaos;
pub mod check;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod distributed;
pub mod doctor;
pub mod evaluate;
pub mod faults;
pub mod figures;
pub mod laps;
pub mod loader;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod progress;
pub mod report;
pub mod resume;
pub mod samplemix;
pub mod search;
pub mod state;
pub mod trainer;
pub mod validation;

pub use backend::{train_on, BackendKind};
pub use config::RunConfig;
pub use trainer::{train, Start, TrainOptions, TrainOutcome};
