//! Static schedulers: the same proportions at every step.

use crate::{DomainInfo, InitWeights, MixingConfig, MixingConfigError, Proportions, Scheduler};

/// Which static rule produced the proportions (kept for names in logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaticKind {
    Stratified,
    Natural,
    Manual,
    /// The domain shares of a SampleMix plan.
    SampleMix,
}

/// `stratified`, `natural` and `manual`: fixed proportions for the whole run.
#[derive(Debug, Clone)]
pub struct StaticScheduler {
    kind: StaticKind,
    proportions: Proportions,
}

impl StaticScheduler {
    pub fn new(kind: StaticKind, proportions: Proportions) -> Self {
        Self { kind, proportions }
    }

    /// Builds the static scheduler a (validated) config names.
    pub fn from_config(
        config: &MixingConfig,
        domains: &DomainInfo,
    ) -> Result<Self, MixingConfigError> {
        let k = domains.names.len();
        Ok(match config {
            MixingConfig::Stratified(_) => {
                Self::new(StaticKind::Stratified, Proportions::uniform(k))
            }
            MixingConfig::Natural(_) => Self::new(
                StaticKind::Natural,
                InitWeights::Natural.resolve("natural proportions", domains)?,
            ),
            // The source is the plan's resampled corpus: its natural weights are the
            // tokens the plan keeps per domain.
            MixingConfig::SampleMix(_) => Self::new(
                StaticKind::SampleMix,
                InitWeights::Natural.resolve("SampleMix proportions", domains)?,
            ),
            MixingConfig::Manual(m) => Self::new(
                StaticKind::Manual,
                InitWeights::Weights(m.weights.clone()).resolve("mixing.weights", domains)?,
            ),
            other => unreachable!("{} is not a static method", other.method_name()),
        })
    }
}

impl Scheduler for StaticScheduler {
    fn name(&self) -> &str {
        match self.kind {
            StaticKind::Stratified => "stratified",
            StaticKind::Natural => "natural",
            StaticKind::Manual => "manual",
            StaticKind::SampleMix => "samplemix",
        }
    }

    fn proportions(&mut self, _step: u64) -> Proportions {
        self.proportions.clone()
    }

    fn fixed_in_advance(&self) -> bool {
        true
    }

    /// Static schedulers have no state beyond their config.
    fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }

    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{build_scheduler, ManualConfig};

    fn info() -> DomainInfo {
        DomainInfo {
            names: vec!["web".into(), "code".into(), "books".into()],
            natural_weights: vec![600.0, 300.0, 100.0],
            seed: 0,
            steps: 1000,
        }
    }

    #[test]
    fn stratified_is_uniform() {
        let mut s = build_scheduler(&MixingConfig::default(), &info()).unwrap();
        assert_eq!(s.proportions(0).as_slice(), &[1.0 / 3.0; 3]);
        assert_eq!(s.name(), "stratified");
    }

    #[test]
    fn natural_follows_token_counts() {
        let mut s = build_scheduler(&MixingConfig::Natural(Default::default()), &info()).unwrap();
        assert_eq!(s.proportions(5).as_slice(), &[0.6, 0.3, 0.1]);
    }

    #[test]
    fn manual_orders_weights_by_domain_list() {
        let cfg = MixingConfig::Manual(ManualConfig {
            weights: [("books", 2.0), ("web", 1.0), ("code", 1.0)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        });
        let mut s = build_scheduler(&cfg, &info()).unwrap();
        assert_eq!(s.proportions(0).as_slice(), &[0.25, 0.25, 0.5]);
        assert_eq!(s.proportions(1000).as_slice(), &[0.25, 0.25, 0.5]);
    }
}
