//! Golden test of DoReMi `variant = "aioli"` against the Aioli repository's own code.
//!
//! `tests/golden/doremi-aioli-<case>.json` were recorded by running
//! HazyResearch/aioli (commit a2361123335cb91d68f5ad86a6c85de7a79e6d5e),
//! `trainer/doremi_trainer.py`: `DoremiTrainer.train` -> `train_step` ->
//! `update_domain_weights`, in float64, with only the model forward stubbed (recorded
//! per-token proxy and reference losses), over a few hundred optimizer steps with
//! domains absent from micro-batches and gradient accumulation 1, 2 and 3. Each file
//! holds the per-micro-batch stream as mixlm's trainer reports it (per-domain mean
//! proxy loss, mean reference loss, mean per-token clipped excess, sequence counts)
//! and Aioli's domain weights (`train_dw`) and running average (`avg_dw /
//! dw_update_steps`) after every update. The stream is replayed through mixlm's
//! scheduler as the trainer drives it: `loss_weights` per micro-batch, then
//! `observe_train` per step.

use mixlm_mixing::{build_scheduler, DomainInfo, DomainLosses, MixingConfig, StepFeedback};
use serde::Deserialize;

const TOLERANCE: f64 = 1e-12;

#[derive(Deserialize)]
struct Golden {
    hyperparameters: Hyper,
    stream: Vec<Micro>,
    expected: Expected,
}

#[derive(Deserialize)]
struct Hyper {
    k: usize,
    gradient_accumulation_steps: usize,
    steps: usize,
    doremi_mu: f64,
    reweight_eps: f64,
}

#[derive(Deserialize, Clone)]
struct Micro {
    train: Vec<Option<f64>>,
    reference: Vec<Option<f64>>,
    excess: Vec<Option<f64>>,
    sequences: Vec<usize>,
}

#[derive(Deserialize)]
struct Expected {
    domain_weights: Vec<Vec<f64>>,
    average_weights: Vec<Vec<f64>>,
    final_average: Vec<f64>,
}

fn load(case: &str) -> Golden {
    let path = format!(
        "{}/tests/golden/doremi-aioli-{case}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn feedback(m: &Micro, micro_batches: usize) -> StepFeedback {
    StepFeedback {
        train: DomainLosses(m.train.clone()),
        sequences: m.sequences.clone(),
        micro_batches,
        reference: Some(DomainLosses(m.reference.clone())),
        excess: Some(DomainLosses(m.excess.clone())),
    }
}

fn close(what: &str, step: usize, got: &[f64], want: &[f64]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what} at step {step}: {got:?} vs {want:?}"));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > TOLERANCE || g.is_nan() {
            return Err(format!(
                "{what} of domain {i} at step {step}: mixlm {g}, Aioli {w} (|diff| {:e})",
                (g - w).abs()
            ));
        }
    }
    Ok(())
}

/// Replays a case through `variant`. With `check`, the first disagreement with
/// Aioli beyond [`TOLERANCE`] is the error; returns the largest deviation of the
/// domain weights from Aioli's.
fn replay(g: &Golden, variant: &str, check: bool) -> Result<f64, String> {
    let h = &g.hyperparameters;
    let ga = h.gradient_accumulation_steps;
    assert_eq!(g.stream.len(), h.steps * ga);
    assert_eq!(g.expected.domain_weights.len(), h.steps);
    let config: MixingConfig = toml::from_str(&format!(
        "method = \"doremi\"\nreference = \"runs/golden-reference\"\n\
         variant = \"{variant}\"\neta = {:e}\nsmoothing = {:e}",
        h.doremi_mu, h.reweight_eps
    ))
    .unwrap();
    let domains = DomainInfo {
        names: (0..h.k).map(|i| format!("d{i}")).collect(),
        natural_weights: vec![1.0; h.k],
        seed: 0,
        steps: h.steps as u64,
    };
    let mut s = build_scheduler(&config, &domains).unwrap();
    let mut worst = 0f64;
    for step in 0..h.steps {
        let micro = &g.stream[step * ga..(step + 1) * ga];
        let want = &g.expected.domain_weights[step];
        for (m, mb) in micro.iter().enumerate() {
            let w = s.loss_weights(step as u64, &feedback(mb, 1)).unwrap();
            if !check {
                continue;
            }
            if m + 1 == ga {
                // Aioli trains the last micro-batch on the weights just updated from it.
                close("loss weights", step, &w, want)?;
            } else if step > 0 && w.iter().any(|x| *x != 0.0) {
                // ... and never backpropagates the others.
                return Err(format!(
                    "step {step}, micro-batch {m}: weights {w:?}, not 0"
                ));
            }
        }
        // The step's feedback (only its micro-batch count matters to this variant).
        let last = micro.last().unwrap();
        s.observe_train(step as u64, &feedback(last, ga));
        let got = s.domain_weights().unwrap().as_slice().to_vec();
        for (a, b) in got.iter().zip(want) {
            worst = worst.max((a - b).abs());
        }
        if check {
            close("domain weights", step, &got, want)?;
            let avg = s.learned_proportions().unwrap();
            let want_avg = &g.expected.average_weights[step];
            close("average weights", step, avg.as_slice(), want_avg)?;
        }
    }
    if check {
        let avg = s.learned_proportions().unwrap();
        let want = &g.expected.final_average;
        close("learned proportions", h.steps, avg.as_slice(), want)?;
    }
    Ok(worst)
}

fn matches(case: &str) {
    let worst = replay(&load(case), "aioli", true).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert!(worst <= TOLERANCE);
}

#[test]
fn aioli_variant_matches_aioli_k3_grad_accum_2() {
    matches("k3-ga2");
}

#[test]
fn aioli_variant_matches_aioli_k7_grad_accum_1() {
    matches("k7-ga1");
}

#[test]
fn aioli_variant_matches_aioli_k7_grad_accum_3() {
    matches("k7-ga3");
}

/// The comparison can fail: an expected number moved by 1e-11, or an input loss
/// moved by 1e-9, is caught.
#[test]
fn a_perturbed_golden_number_fails() {
    let mut g = load("k3-ga2");
    g.expected.domain_weights[150][1] += 1e-11;
    let e = replay(&g, "aioli", true).unwrap_err();
    assert!(e.starts_with("loss weights of domain 1 at step 150"), "{e}");
    let mut g = load("k7-ga3");
    g.expected.final_average[4] -= 2e-12;
    let e = replay(&g, "aioli", true).unwrap_err();
    assert!(e.starts_with("learned proportions of domain 4"), "{e}");
    let mut g = load("k7-ga3");
    g.expected.average_weights[100][6] += 1e-11;
    let e = replay(&g, "aioli", true).unwrap_err();
    assert!(
        e.starts_with("average weights of domain 6 at step 100"),
        "{e}"
    );
    // The last micro-batch of step 40 is the one read (a domain with a positive
    // difference of means, else clipping hides the change); moving the first does
    // nothing.
    let positive = |m: &Micro| {
        (0..m.train.len())
            .find(|&d| matches!((m.train[d], m.reference[d]), (Some(t), Some(r)) if t > r))
            .unwrap()
    };
    let mut g = load("k3-ga2");
    let d = positive(&g.stream[81]);
    *g.stream[81].train[d].as_mut().unwrap() += 1e-9;
    let e = replay(&g, "aioli", true).unwrap_err();
    assert!(e.contains("at step 40"), "{e}");
    let mut g = load("k3-ga2");
    let d = positive(&g.stream[80]);
    *g.stream[80].train[d].as_mut().unwrap() += 1e-3;
    replay(&g, "aioli", true).unwrap();
}

/// The streams tell the variants apart: the paper's rule ends far from Aioli's.
#[test]
fn paper_variant_does_not_match_aioli() {
    for case in ["k3-ga2", "k7-ga1", "k7-ga3"] {
        let worst = replay(&load(case), "paper", false).unwrap();
        assert!(
            worst > 1e-3,
            "{case}: paper variant within {worst} of Aioli"
        );
    }
}
