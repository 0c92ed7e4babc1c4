//! Properties every scheduler keeps whatever it is fed: proportions (and loss or
//! gradient weights) finite, non-negative and summing to 1, and the same decisions
//! under the same seed. The feedback mixes ordinary losses with 0, 1e-300, 1e300,
//! NaN, infinity and missing domains; gradient statistics overflow or are NaN too.

use mixlm_mixing::{
    build_scheduler, AlignmentTarget, DomainInfo, DomainLosses, GradientAlignment, MixingConfig,
    Proportions, StepFeedback,
};
use proptest::prelude::*;

const STEPS: usize = 30;
const MAX_K: usize = 5;

fn loss() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        6 => (0.0f64..12.0).prop_map(Some),
        1 => Just(Some(0.0)),
        1 => Just(Some(1e-300)),
        1 => Just(Some(1e300)),
        1 => Just(Some(f64::NAN)),
        1 => Just(Some(f64::INFINITY)),
        1 => Just(None),
    ]
}

fn component() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => -3.0f64..3.0,
        1 => Just(0.0),
        1 => Just(1e200),
        1 => Just(f64::NAN),
    ]
}

/// Per step: train, validation, reference losses, and a gradient vector per domain.
type Step = (
    Vec<Option<f64>>,
    Vec<Option<f64>>,
    Vec<Option<f64>>,
    Vec<Vec<f64>>,
);

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = (
        proptest::collection::vec(loss(), MAX_K),
        proptest::collection::vec(loss(), MAX_K),
        proptest::collection::vec(loss(), MAX_K),
        proptest::collection::vec(proptest::collection::vec(component(), 3), MAX_K + 1),
    );
    proptest::collection::vec(step, STEPS)
}

fn methods(k: usize) -> Vec<MixingConfig> {
    let manual: String = (0..k)
        .map(|i| format!("d{i} = {}", if i == 0 { 0.0 } else { i as f64 }))
        .collect::<Vec<_>>()
        .join(", ");
    // A skills graph: each domain helps itself and the next one.
    let graph: String = (0..k)
        .map(|i| {
            let row: Vec<String> = (0..k)
                .map(|j| {
                    let w = match j {
                        _ if j == i => 1.0,
                        _ if j == (i + 1) % k => 0.5,
                        _ => 0.0,
                    };
                    format!("d{j} = {w:?}")
                })
                .collect();
            format!("d{i} = {{ {} }}", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let texts = [
        "method = \"stratified\"".to_string(),
        "method = \"natural\"".to_string(),
        format!("method = \"manual\"\nweights = {{ {manual} }}"),
        "method = \"odm\"".to_string(),
        "method = \"odm\"\nvariant = \"official\"".to_string(),
        format!(
            "method = \"aioli\"\neta = 1.0\nupdate_steps = {}\nlp_rounds = 1\nlp_steps = 1\nema = 0.5",
            2 * k + 1
        ),
        "method = \"aioli\"\neta = 1.0\nupdate_steps = 12\nlp_rounds = 1\nlp_steps = 1\ninit_steps = 3\nnormalize_a = false".to_string(),
        format!("method = \"skill_it\"\neta = 0.5\nupdate_steps = 3\ngraph = {{ {graph} }}"),
        "method = \"doremi\"\nreference = \"ref\"".to_string(),
        "method = \"doge\"".to_string(),
    ];
    texts
        .iter()
        .map(|t| toml::from_str(t).unwrap_or_else(|e| panic!("{t}: {e}")))
        .collect()
}

fn check(what: &str, p: &[f64]) -> Result<(), TestCaseError> {
    prop_assert!(
        p.iter().all(|x| x.is_finite() && *x >= 0.0),
        "{what}: {p:?}"
    );
    let sum: f64 = p.iter().sum();
    prop_assert!((sum - 1.0).abs() < 1e-9, "{what} sum to {sum}: {p:?}");
    Ok(())
}

fn alignment(k: usize, vectors: &[Vec<f64>], present: &[bool]) -> GradientAlignment {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let target = &vectors[k];
    GradientAlignment {
        present: present.to_vec(),
        gram: (0..k)
            .map(|i| (0..k).map(|j| dot(&vectors[i], &vectors[j])).collect())
            .collect(),
        target: Some(AlignmentTarget {
            dots: (0..k).map(|i| dot(&vectors[i], target)).collect(),
            norm_sq: dot(target, target),
        }),
    }
}

/// Runs one scheduler through the trainer's call order; returns every proportion
/// it chose, as bits.
fn drive(
    config: &MixingConfig,
    k: usize,
    seed: u64,
    steps: &[Step],
) -> Result<Vec<u64>, TestCaseError> {
    let info = DomainInfo {
        names: (0..k).map(|i| format!("d{i}")).collect(),
        natural_weights: (1..=k).map(|i| i as f64).collect(),
        seed,
    };
    let name = config.method_name();
    let mut s = build_scheduler(config, &info).unwrap();
    let mut chosen = Vec::new();
    for (step, (train, val, reference, vectors)) in steps.iter().enumerate() {
        let step = step as u64;
        let cut = |v: &[Option<f64>]| DomainLosses(v[..k].to_vec());
        if s.wants_validation(step) {
            s.observe_validation(step, &cut(val));
        }
        let p: Proportions = s.proportions(step);
        check(&format!("{name} proportions at step {step}"), p.as_slice())?;
        chosen.extend(p.as_slice().iter().map(|x| x.to_bits()));
        let present: Vec<bool> = train[..k].iter().map(Option::is_some).collect();
        let excess = DomainLosses(
            (0..k)
                .map(|i| match (train[i], reference[i]) {
                    (Some(a), Some(b)) => Some((a - b).max(0.0)),
                    _ => None,
                })
                .collect(),
        );
        let feedback = StepFeedback {
            train: cut(train),
            sequences: present.iter().map(|&p| if p { 4 } else { 0 }).collect(),
            reference: Some(cut(reference)),
            excess: Some(excess),
        };
        if let Some(w) = s.loss_weights(step, &feedback) {
            prop_assert!(
                w.len() == k && w.iter().all(|x| x.is_finite() && *x >= 0.0),
                "{name} loss weights at step {step}: {w:?}"
            );
        }
        if s.requirements().gradients.is_some() {
            let a = alignment(k, vectors, &present);
            if let Some(w) = s.gradient_weights(step, 1e-3, &a) {
                prop_assert!(
                    w.len() == k && w.iter().all(|x| x.is_finite()),
                    "{name} gradient weights at step {step}: {w:?}"
                );
            }
        }
        s.observe_train(step, &feedback);
        if let Some(w) = s.domain_weights() {
            check(
                &format!("{name} domain weights at step {step}"),
                w.as_slice(),
            )?;
        }
    }
    if let Some(p) = s.learned_proportions() {
        check(&format!("{name} learned mixture"), p.as_slice())?;
    }
    Ok(chosen)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn schedulers_keep_proportions_valid_and_deterministic(
        k in 2usize..=MAX_K,
        seed in any::<u64>(),
        steps in steps(),
    ) {
        for config in methods(k) {
            let first = drive(&config, k, seed, &steps)?;
            let again = drive(&config, k, seed, &steps)?;
            prop_assert!(first == again, "{}: not deterministic", config.method_name());
        }
    }
}
