//! `mixlm orchestrator`: the meeting point of a multi-node run.

use anyhow::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Port to listen on.
    #[arg(long, default_value_t = 29500)]
    pub port: u16,
}

pub fn run(args: Args) -> Result<()> {
    let Args { port } = args;
    eprintln!("mixlm orchestrator: listening on port {port} (Ctrl-C to stop)");
    mixlm_train::distributed::run_orchestrator(port)
}
