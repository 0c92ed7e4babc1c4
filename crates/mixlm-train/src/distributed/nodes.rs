//! Multi-node runs: the collective joined to the other machines through the
//! orchestrator, and the orchestrator itself (`mixlm orchestrator`).

use anyhow::{anyhow, Result};
use burn_collective::CollectiveConfig;

use crate::config::{port_of, DistributedSection};

/// `config` joined to the other nodes of a multi-node run, as `[distributed]` says
/// (`nodes`, `orchestrator`, `node_address`, `all_reduce`).
pub(super) fn with_nodes(
    d: &DistributedSection,
    config: CollectiveConfig,
) -> Result<CollectiveConfig> {
    let ws = |a: &str| -> Result<burn_communication::Address> {
        format!("ws://{a}")
            .parse()
            .map_err(|e| anyhow!("address {a}: {e}"))
    };
    let port = port_of(&d.node_address)
        .ok_or_else(|| anyhow!("distributed.node_address = {:?}: no port", d.node_address))?;
    Ok(config
        .with_global_all_reduce_strategy(d.all_reduce.strategy())
        .with_num_nodes(d.nodes as u32)
        .with_global_address(ws(&d.orchestrator)?)
        .with_node_address(ws(&d.node_address)?)
        .with_data_service_port(port))
}

/// Serves the meeting point of a multi-node run on `port` until the process is
/// stopped (`mixlm orchestrator`).
pub fn run_orchestrator(port: u16) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the orchestrator's runtime: {e}"))?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}
