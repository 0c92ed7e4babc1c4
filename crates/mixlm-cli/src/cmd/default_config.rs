//! `mixlm default-config`: the embedded default config, as a starting point.

use anyhow::Result;
pub fn run() -> Result<()> {
    print!("{}", mixlm_train::config::DEFAULT_CONFIG);
    Ok(())
}
