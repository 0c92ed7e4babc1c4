//! `[mixing]` section of the run config: which method, with its parameters.

use crate::aioli::AioliConfig;
use crate::doge::DogeConfig;
use crate::doremi::DoReMiConfig;
use crate::odm::OdmConfig;
use crate::samplemix::SampleMixConfig;
use crate::skillit::SkillItConfig;
use crate::{DomainInfo, Proportions};
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
    /// Online Data Mixing (Albalak et al. 2023): an Exp3-style bandit rewarded by
    /// per-domain training loss.
    Odm(OdmConfig),
    /// Aioli (Chen et al. 2024): online estimation of the linear dynamic mixing law
    /// and exponentiated-gradient updates of the proportions.
    Aioli(AioliConfig),
    /// Skill-It (Chen et al. 2023): online mixing over a given skills graph.
    SkillIt(SkillItConfig),
    /// DoReMi (Xie et al. 2023): the proxy run, reweighting the objective by excess
    /// loss over a reference model; it learns a static mixture for the final run.
    Doremi(DoReMiConfig),
    /// DoGE (Fan et al. 2024): the proxy run, reweighting domains by how well their
    /// gradients align with a target gradient; it learns a static mixture.
    Doge(DogeConfig),
    /// SampleMix (Xi et al. 2025): train on a per-document sampling plan written by
    /// `mixlm samplemix`; the domain proportions are the tokens the plan keeps.
    #[serde(rename = "samplemix")]
    SampleMix(SampleMixConfig),
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
    #[error("{field} names domain `{name}`, which is not in the data; known domains: {known}")]
    UnknownDomain {
        field: &'static str,
        name: String,
        known: String,
    },
    #[error(
        "{field} has no weight for domain `{name}`: give every domain a weight (0 to leave it out)"
    )]
    MissingDomain { field: &'static str, name: String },
    #[error("{field}.{name} = {value}: weights must be finite and >= 0")]
    BadWeight {
        field: &'static str,
        name: String,
        value: f64,
    },
    #[error("{field} are all 0: at least one domain needs a positive weight")]
    AllZero { field: &'static str },
    #[error("mixing.{field} {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("mixing.{field} = {value}: {expected}")]
    OutOfRange {
        field: &'static str,
        value: f64,
        expected: &'static str,
    },
}

impl ManualConfig {
    /// What a run says about its weights when they do not sum to 1: it trains on them
    /// normalised, and shows to what.
    pub fn normalisation_note(&self) -> Option<String> {
        let sum: f64 = self.weights.values().sum();
        if (sum - 1.0).abs() <= 1e-9 || !(sum > 0.0 && sum.is_finite()) {
            return None;
        }
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(name, w)| format!("{name} {:.4}", w / sum))
            .collect();
        // Rounded to 6 decimals: 2.3, not the 2.3000000000000003 of the float sum.
        Some(format!(
            "mixing.weights sum to {}, normalised to {}",
            (sum * 1e6).round() / 1e6,
            parts.join(", ")
        ))
    }
}

impl MixingConfig {
    /// What the run's header line says about the section beyond the method's name
    /// (manual weights that are normalised).
    pub fn note(&self) -> Option<String> {
        match self {
            Self::Manual(m) => m.normalisation_note(),
            _ => None,
        }
    }

    /// The method's name as written in TOML.
    pub fn method_name(&self) -> &'static str {
        match self {
            Self::Stratified(_) => "stratified",
            Self::Natural(_) => "natural",
            Self::Manual(_) => "manual",
            Self::Odm(_) => "odm",
            Self::Aioli(_) => "aioli",
            Self::SkillIt(_) => "skill_it",
            Self::Doremi(_) => "doremi",
            Self::Doge(_) => "doge",
            Self::SampleMix(_) => "samplemix",
        }
    }

    /// Checks the config against the run's domain names.
    pub fn validate(&self, domains: &[String]) -> Result<(), MixingConfigError> {
        match self {
            Self::Stratified(_) | Self::Natural(_) => Ok(()),
            Self::Manual(m) => check_weights("mixing.weights", &m.weights, domains),
            Self::Odm(c) => c.validate(domains),
            Self::Aioli(c) => c.validate(domains),
            Self::SkillIt(c) => c.validate(domains),
            Self::Doremi(c) => c.validate(),
            Self::Doge(c) => c.validate(domains),
            Self::SampleMix(c) => c.validate(),
        }
    }
}

/// Every domain named once with a finite weight >= 0, not all 0.
fn check_weights(
    field: &'static str,
    weights: &BTreeMap<String, f64>,
    domains: &[String],
) -> Result<(), MixingConfigError> {
    for (name, &value) in weights {
        if !domains.contains(name) {
            return Err(MixingConfigError::UnknownDomain {
                field,
                name: name.clone(),
                known: domains.join(", "),
            });
        }
        if !value.is_finite() || value < 0.0 {
            return Err(MixingConfigError::BadWeight {
                field,
                name: name.clone(),
                value,
            });
        }
    }
    if let Some(missing) = domains.iter().find(|d| !weights.contains_key(*d)) {
        return Err(MixingConfigError::MissingDomain {
            field,
            name: missing.clone(),
        });
    }
    if weights.values().all(|&w| w == 0.0) {
        return Err(MixingConfigError::AllZero { field });
    }
    Ok(())
}

/// `value` within `[lo, hi]` (or `[lo, hi)` when `hi_open`), else an error naming the key.
pub(crate) fn check_range(
    field: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    hi_open: bool,
    expected: &'static str,
) -> Result<(), MixingConfigError> {
    let ok = value.is_finite() && value >= lo && if hi_open { value < hi } else { value <= hi };
    if ok {
        Ok(())
    } else {
        Err(MixingConfigError::OutOfRange {
            field,
            value,
            expected,
        })
    }
}

/// The step size of a multiplicative-weights update: finite and non-negative.
pub(crate) fn check_eta(eta: f64) -> Result<(), MixingConfigError> {
    check_range("eta", eta, 0.0, f64::MAX, false, "must be finite and >= 0")
}

/// Where an adaptive method starts: `"stratified"`, `"natural"`, or a table of
/// weights by domain name (normalised; every domain named), e.g. the proportions
/// another method found ("Aioli + X").
#[derive(Debug, Clone, PartialEq, Default)]
pub enum InitWeights {
    #[default]
    Stratified,
    Natural,
    Weights(BTreeMap<String, f64>),
}

impl InitWeights {
    /// Checks a weights table against the domains (`field` names it in errors).
    pub fn validate(
        &self,
        field: &'static str,
        domains: &[String],
    ) -> Result<(), MixingConfigError> {
        match self {
            Self::Weights(w) => check_weights(field, w, domains),
            _ => Ok(()),
        }
    }

    /// The proportions these weights give for the run's domains.
    pub fn resolve(
        &self,
        field: &'static str,
        domains: &DomainInfo,
    ) -> Result<Proportions, MixingConfigError> {
        let weights = match self {
            Self::Stratified => return Ok(Proportions::uniform(domains.names.len())),
            Self::Natural => domains.natural_weights.clone(),
            Self::Weights(w) => {
                check_weights(field, w, &domains.names)?;
                domains.names.iter().map(|n| w[n]).collect()
            }
        };
        Proportions::from_weights(weights).map_err(|_| MixingConfigError::AllZero { field })
    }
}

impl Serialize for InitWeights {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Stratified => s.serialize_str("stratified"),
            Self::Natural => s.serialize_str("natural"),
            Self::Weights(w) => w.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for InitWeights {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = InitWeights;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"stratified\", \"natural\" or a table of weights by domain name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<InitWeights, E> {
                match v {
                    "stratified" => Ok(InitWeights::Stratified),
                    "natural" => Ok(InitWeights::Natural),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                m: M,
            ) -> Result<InitWeights, M::Error> {
                BTreeMap::deserialize(serde::de::value::MapAccessDeserializer::new(m))
                    .map(InitWeights::Weights)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_weights_that_do_not_sum_to_one_are_said_to_be_normalised() {
        let manual = |w: &[(&str, f64)]| ManualConfig {
            weights: w.iter().map(|&(k, v)| (k.to_string(), v)).collect(),
        };
        assert_eq!(
            manual(&[("a", 2.0), ("b", 0.3)])
                .normalisation_note()
                .unwrap(),
            "mixing.weights sum to 2.3, normalised to a 0.8696, b 0.1304"
        );
        assert_eq!(manual(&[("a", 0.7), ("b", 0.3)]).normalisation_note(), None);
    }

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
                field: "mixing.weights",
                name: "c".into(),
                known: "a, b".into()
            }
        );
        assert_eq!(
            manual(&[("a", 1.0)]).validate(&domains()).unwrap_err(),
            MixingConfigError::MissingDomain {
                field: "mixing.weights",
                name: "b".into()
            }
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
            MixingConfigError::AllZero {
                field: "mixing.weights"
            }
        );
    }
}
