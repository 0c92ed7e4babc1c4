//! One module per subcommand: its flags (`Args`) and what it does (`run`).

pub mod check_backend;
pub mod compare;
pub mod default_config;
pub mod doctor;
pub mod eval;
pub mod export;
pub mod mix_search;
pub mod model_info;
pub mod orchestrator;
pub mod prepare;
pub mod report;
pub mod samplemix;
pub mod score;
pub mod train;
