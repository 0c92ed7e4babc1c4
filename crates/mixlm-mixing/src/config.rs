//! `[mixing]` section of the run config: which method, with its parameters.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `[mixing]` TOML section. `method` selects the variant; each method's
/// parameters are its own struct so unknown keys are reported per method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum MixingConfig {
    /// Equal proportions for every domain.
    Stratified(NoParams),
    /// Proportional to each domain's size in the training data.
    Natural(NoParams),
    /// Fixed weights given by the user.
    Manual(ManualConfig),
}

impl Default for MixingConfig {
    fn default() -> Self {
        Self::Stratified(NoParams {})
    }
}

/// Methods without parameters; a struct (not a unit variant) so that stray keys
/// under `[mixing]` are reported instead of ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `method = "manual"`: one weight per domain, normalised to sum to 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualConfig {
    /// Domain name -> non-negative weight. Every domain must be named.
    pub weights: BTreeMap<String, f64>,
}

/// A `[mixing]` section that does not fit the run's domains.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MixingConfigError {
    #[error(
        "mixing.weights names domain `{name}`, which is not in the data; known domains: {known}"
    )]
    UnknownDomain { name: String, known: String },
    #[error("mixing.weights has no weight for domain `{0}`: give every domain a weight (0 to leave it out)")]
    MissingDomain(String),
    #[error("mixing.weights.{name} = {value}: weights must be finite and >= 0")]
    BadWeight { name: String, value: f64 },
    #[error("mixing.weights are all 0: at least one domain needs a positive weight")]
    AllZero,
}

impl MixingConfig {
    /// The method's name as written in TOML.
    pub fn method_name(&self) -> &'static str {
        match self {
            Self::Stratified(_) => "stratified",
            Self::Natural(_) => "natural",
            Self::Manual(_) => "manual",
        }
    }

    /// Checks the config against the run's domain names.
    pub fn validate(&self, domains: &[String]) -> Result<(), MixingConfigError> {
        if let Self::Manual(m) = self {
            for (name, &value) in &m.weights {
                if !domains.contains(name) {
                    return Err(MixingConfigError::UnknownDomain {
                        name: name.clone(),
                        known: domains.join(", "),
                    });
                }
                if !value.is_finite() || value < 0.0 {
                    return Err(MixingConfigError::BadWeight {
                        name: name.clone(),
                        value,
                    });
                }
            }
            if let Some(missing) = domains.iter().find(|d| !m.weights.contains_key(*d)) {
                return Err(MixingConfigError::MissingDomain(missing.clone()));
            }
            if m.weights.values().all(|&w| w == 0.0) {
                return Err(MixingConfigError::AllZero);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domains() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    #[test]
    fn parses_methods_from_toml() {
        let c: MixingConfig = toml::from_str("method = \"natural\"").unwrap();
        assert_eq!(c, MixingConfig::Natural(NoParams {}));
        let c: MixingConfig =
            toml::from_str("method = \"manual\"\nweights = { a = 1.0, b = 3.0 }").unwrap();
        c.validate(&domains()).unwrap();
    }

    #[test]
    fn unknown_method_and_key_are_named() {
        let e = toml::from_str::<MixingConfig>("method = \"odmx\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("odmx"), "{e}");
        let e = toml::from_str::<MixingConfig>("method = \"manual\"\nweights = {}\nwieghts = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("wieghts"), "{e}");
    }

    #[test]
    fn parameterless_methods_reject_extra_keys() {
        let e = toml::from_str::<MixingConfig>("method = \"stratified\"\nweights = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `weights`"), "{e}");
    }

    #[test]
    fn manual_weights_are_checked_against_domains() {
        let manual = |pairs: &[(&str, f64)]| {
            MixingConfig::Manual(ManualConfig {
                weights: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            })
        };
        assert_eq!(
            manual(&[("a", 1.0), ("c", 1.0)])
                .validate(&domains())
                .unwrap_err(),
            MixingConfigError::UnknownDomain {
                name: "c".into(),
                known: "a, b".into()
            }
        );
        assert_eq!(
            manual(&[("a", 1.0)]).validate(&domains()).unwrap_err(),
            MixingConfigError::MissingDomain("b".into())
        );
        assert_eq!(
            manual(&[("a", -1.0), ("b", 1.0)])
                .validate(&domains())
                .unwrap_err()
                .to_string(),
            "mixing.weights.a = -1: weights must be finite and >= 0"
        );
        assert_eq!(
            manual(&[("a", 0.0), ("b", 0.0)])
                .validate(&domains())
                .unwrap_err(),
            MixingConfigError::AllZero
        );
    }
}
