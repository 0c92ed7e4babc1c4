//! Skill-It (Chen et al. 2023, "Skill-it! A Data-Driven Skills Framework for
//! Understanding and Training Language Models"), online mixing over a skills graph.
//!
//! `graph[i][j]` is how much training on group `i` lowers group `j`'s loss (built from
//! `K` short single-group runs as the relative loss decrease
//! `(L_j(0) - L_j(T)) / L_j(0)`, which `mixlm mix-search` will produce). The mixture
//! starts at `p_i ∝ exp(eta * sum_j graph[i][j])` and, every `update_steps` steps,
//! after measuring the per-group validation losses `L`, becomes
//! `p_i ∝ exp(eta * sum_j graph[i][j] * sum_{last window rounds} L_j)`: groups that
//! help the groups whose loss is still high get more weight.
//!
//! As in the paper's algorithm, the window counts rounds (one validation per round);
//! the authors' code appends a loss vector at every checkpoint evaluation instead.

use crate::config::{check_eta, MixingConfigError};
use crate::proportions::softmax;
use crate::{restore_state, DomainInfo, DomainLosses, Proportions, Scheduler};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `method = "skill_it"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkillItConfig {
    pub eta: f64,
    /// Steps per round; the mixture changes at each round boundary.
    pub update_steps: u64,
    /// Rounds of validation losses summed in the update.
    #[serde(default = "default_window")]
    pub window: usize,
    /// `graph.<trained>.<evaluated>`: the skills graph, every domain as a row and a
    /// column. `mixlm mix-search --method skill_it` builds it.
    #[serde(default)]
    pub graph: BTreeMap<String, BTreeMap<String, f64>>,
}

fn default_window() -> usize {
    3
}

impl SkillItConfig {
    pub fn validate(&self, domains: &[String]) -> Result<(), MixingConfigError> {
        check_eta(self.eta)?;
        if self.update_steps == 0 || self.window == 0 {
            return Err(MixingConfigError::Invalid {
                field: "update_steps",
                message: "update_steps and window must be >= 1".into(),
            });
        }
        if self.graph.is_empty() {
            return Err(MixingConfigError::Invalid {
                field: "graph",
                message: "is missing: give the skills graph, or build it with \
                          `mixlm mix-search --method skill_it`"
                    .into(),
            });
        }
        let known = || domains.join(", ");
        for (row, cols) in &self.graph {
            if !domains.contains(row) {
                return Err(MixingConfigError::UnknownDomain {
                    field: "mixing.graph",
                    name: row.clone(),
                    known: known(),
                });
            }
            for (col, &v) in cols {
                if !domains.contains(col) {
                    return Err(MixingConfigError::UnknownDomain {
                        field: "mixing.graph",
                        name: format!("{row}.{col}"),
                        known: known(),
                    });
                }
                if !v.is_finite() {
                    return Err(MixingConfigError::Invalid {
                        field: "graph",
                        message: format!(".{row}.{col} = {v}: entries must be finite"),
                    });
                }
            }
        }
        for row in domains {
            for col in domains {
                if self.graph.get(row).and_then(|c| c.get(col)).is_none() {
                    return Err(MixingConfigError::MissingDomain {
                        field: "mixing.graph",
                        name: format!("{row}.{col}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// The graph as a matrix in domain order (validated first).
    fn matrix(&self, domains: &[String]) -> Vec<Vec<f64>> {
        domains
            .iter()
            .map(|r| domains.iter().map(|c| self.graph[r][c]).collect())
            .collect()
    }
}

/// `p_i ∝ exp(eta * sum_j graph[i][j] * loss_j)` (max-shifted, so no overflow).
pub fn skill_weights(graph: &[Vec<f64>], loss: &[f64], eta: f64) -> Vec<f64> {
    let logits: Vec<f64> = graph
        .iter()
        .map(|row| eta * row.iter().zip(loss).map(|(a, l)| a * l).sum::<f64>())
        .collect();
    softmax(&logits)
}

/// What Skill-It carries between steps (checkpointed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkillItState {
    pub p: Vec<f64>,
    /// Validation losses of the last `window` rounds, oldest first.
    pub history: Vec<Vec<f64>>,
}

/// Skill-It as a [`Scheduler`].
#[derive(Debug, Clone)]
pub struct SkillItScheduler {
    config: SkillItConfig,
    graph: Vec<Vec<f64>>,
    state: SkillItState,
}

impl SkillItScheduler {
    pub fn new(config: &SkillItConfig, domains: &DomainInfo) -> Result<Self, MixingConfigError> {
        config.validate(&domains.names)?;
        let graph = config.matrix(&domains.names);
        let ones = vec![1.0; graph.len()];
        Ok(Self {
            state: SkillItState {
                p: skill_weights(&graph, &ones, config.eta),
                history: Vec::new(),
            },
            graph,
            config: config.clone(),
        })
    }

    pub fn state_ref(&self) -> &SkillItState {
        &self.state
    }
}

impl Scheduler for SkillItScheduler {
    fn name(&self) -> &str {
        "skill_it"
    }

    fn wants_validation(&self, step: u64) -> bool {
        step > 0 && step.is_multiple_of(self.config.update_steps)
    }

    fn observe_validation(&mut self, step: u64, losses: &DomainLosses) {
        if !self.wants_validation(step) {
            return;
        }
        // A group without a validation loss contributes nothing this round.
        self.state
            .history
            .push(losses.0.iter().map(|l| l.unwrap_or(0.0)).collect());
        let excess = self.state.history.len().saturating_sub(self.config.window);
        self.state.history.drain(..excess);
        let k = self.graph.len();
        let summed: Vec<f64> = (0..k)
            .map(|j| self.state.history.iter().map(|l| l[j]).sum())
            .collect();
        self.state.p = skill_weights(&self.graph, &summed, self.config.eta);
    }

    fn proportions(&mut self, _step: u64) -> Proportions {
        Proportions::from_weights(self.state.p.clone()).expect("Skill-It weights are valid")
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(&self.state).expect("Skill-It state serialises")
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let k = self.graph.len();
        self.state = restore_state("Skill-It", state, k, |s: &SkillItState| s.p.len())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DomainInfo {
        DomainInfo {
            names: vec!["a".into(), "b".into()],
            natural_weights: vec![1.0, 1.0],
            seed: 0,
        }
    }

    fn config() -> SkillItConfig {
        toml::from_str(
            "eta = 0.5\nupdate_steps = 10\nwindow = 2\n\
             graph = { a = { a = 0.4, b = 0.2 }, b = { a = 0.0, b = 0.6 } }",
        )
        .unwrap()
    }

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    /// softmax of two logits.
    fn soft(x: f64, y: f64) -> [f64; 2] {
        let (ex, ey) = (x.exp(), y.exp());
        [ex / (ex + ey), ey / (ex + ey)]
    }

    #[test]
    fn updates_match_hand_computation() {
        let mut s = SkillItScheduler::new(&config(), &info()).unwrap();
        // Start: exp(0.5 * row sums) = exp([0.3, 0.3]) -> uniform.
        close(s.proportions(0).as_slice(), &[0.5, 0.5]);
        assert!(!s.wants_validation(0) && !s.wants_validation(5) && s.wants_validation(10));
        // Round 1: L = [2, 4]: logits 0.5 * [0.4*2 + 0.2*4, 0.6*4] = [0.8, 1.2].
        s.observe_validation(10, &DomainLosses(vec![Some(2.0), Some(4.0)]));
        close(s.proportions(10).as_slice(), &soft(0.8, 1.2));
        // Round 2: window sums [2+1, 4+1] = [3, 5]: logits 0.5 * [2.2, 3.0].
        s.observe_validation(20, &DomainLosses(vec![Some(1.0), Some(1.0)]));
        close(s.proportions(20).as_slice(), &soft(1.1, 1.5));
        // Round 3: window of 2 drops round 1: [1+1, 1+3] = [2, 4]: logits 0.5*[1.6, 2.4].
        s.observe_validation(30, &DomainLosses(vec![Some(1.0), Some(3.0)]));
        close(s.proportions(30).as_slice(), &soft(0.8, 1.2));
        assert_eq!(s.state_ref().history.len(), 2);
    }

    #[test]
    fn graph_must_cover_every_pair_of_domains() {
        let mut c = config();
        c.graph.get_mut("b").unwrap().remove("a");
        assert_eq!(
            c.validate(&info().names).unwrap_err().to_string(),
            "mixing.graph has no weight for domain `b.a`: give every domain a weight (0 to \
             leave it out)"
        );
        let mut c = config();
        c.graph.get_mut("a").unwrap().insert("zz".into(), 1.0);
        assert!(c
            .validate(&info().names)
            .unwrap_err()
            .to_string()
            .contains("`a.zz`"));
        let mut c = config();
        c.graph.clear();
        let e = c.validate(&info().names).unwrap_err().to_string();
        assert!(
            e.starts_with("mixing.graph is missing") && e.contains("mix-search"),
            "{e}"
        );
    }

    #[test]
    fn state_round_trips() {
        let mut s = SkillItScheduler::new(&config(), &info()).unwrap();
        s.observe_validation(10, &DomainLosses(vec![Some(2.0), Some(4.0)]));
        let mut t = SkillItScheduler::new(&config(), &info()).unwrap();
        t.restore(&s.state()).unwrap();
        assert_eq!(t.state_ref(), s.state_ref());
    }
}
