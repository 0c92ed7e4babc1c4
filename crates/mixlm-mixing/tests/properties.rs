//! Properties every scheduler keeps whatever it is fed: proportions (and loss or
//! gradient weights) finite and non-negative, and the same decisions under the same
//! seed. The feedback mixes ordinary losses with 0, 1e-300, 1e300, NaN, infinity and
//! missing domains; gradient statistics overflow or are NaN too.
//!
//! `Proportions` sum to 1 by construction (`Proportions::from_weights` normalises), so
//! summing them checks nothing; the second property checks the weights the update
//! rules compute before any `Proportions` is made (Skill-It's, DoReMi's, DoGE's and
//! Aioli's pub update functions): finite, non-negative and, where the formula is a
//! mixture, summing to 1, for arbitrary inputs of the kind the schedulers pass them.

use mixlm_mixing::{
    aioli, build_scheduler, doge, doremi, skillit, AlignmentTarget, DogeConfig, DomainInfo,
    DomainLosses, GradientAlignment, MixingConfig, Proportions, StepFeedback,
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
        "method = \"odm\"\nvariant = \"exp3\"\nwarmup_steps = 2".to_string(),
        "method = \"odm\"\nbatches = \"mixed\"".to_string(),
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

/// Finite and non-negative (a `Proportions`' sum is 1 by construction; the raw
/// weights' sums are checked by [`mixture`]).
fn check(what: &str, p: &[f64]) -> Result<(), TestCaseError> {
    prop_assert!(
        p.iter().all(|x| x.is_finite() && *x >= 0.0),
        "{what}: {p:?}"
    );
    Ok(())
}

/// Raw weights that the formula makes a mixture: finite, non-negative, of length `k`
/// and summing to 1.
fn mixture(what: &str, k: usize, p: &[f64]) -> Result<(), TestCaseError> {
    prop_assert!(p.len() == k, "{what}: {} weights for {k} domains", p.len());
    check(what, p)?;
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
        steps: 1000,
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
            micro_batches: 1,
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

    #[test]
    fn update_rules_compute_valid_raw_weights(
        k in 2usize..=MAX_K,
        weights in proptest::collection::vec(weight(), MAX_K),
        losses in proptest::collection::vec(big_non_negative(), MAX_K),
        matrix in proptest::collection::vec(entry(), MAX_K * MAX_K),
        vectors in proptest::collection::vec(
            proptest::collection::vec(gradient_component(), 3),
            MAX_K + 1,
        ),
        present in proptest::collection::vec(any::<bool>(), MAX_K),
        with_target in any::<bool>(),
        eta in prop_oneof![Just(0.0), 1e-3f64..10.0],
        smoothing in prop_oneof![Just(0.0), Just(1.0), 0.0f64..1.0],
        mu in 1e-3f64..1.0,
        lr in 1e-5f64..1.0,
        factor in 0.0f64..=1.0,
    ) {
        let alpha = distribution(&weights[..k]);
        let losses = &losses[..k];
        let a: Vec<Vec<f64>> = matrix.chunks(MAX_K).take(k).map(|r| r[..k].to_vec()).collect();

        // Skill-It: the graph it uses has no negative entry, and
        // softmax(eta * A L) over window sums of losses is a mixture.
        let graph = skillit::effective_graph(&a);
        prop_assert!(
            graph.iter().flatten().all(|x| x.is_finite() && *x >= 0.0),
            "Skill-It graph {graph:?} from {a:?}"
        );
        let w = skillit::skill_weights(&graph, losses, eta);
        mixture(&format!("Skill-It weights for {losses:?}, eta {eta}"), k, &w)?;
        let w = skillit::skill_weights(&graph, &vec![1.0; k], eta);
        mixture("Skill-It initial weights", k, &w)?;

        // DoReMi: normalize(alpha * exp(eta * excess)) smoothed towards uniform.
        let w = doremi::doremi_update(&alpha, losses, eta, smoothing);
        mixture(
            &format!("DoReMi update of {alpha:?} by {losses:?}, eta {eta}, smoothing {smoothing}"),
            k,
            &w,
        )?;

        // DoGE: new domain weights are a mixture; the gradient coefficients
        // alpha_i * clip_i are finite and non-negative, the scores finite.
        let mut present = present[..k].to_vec();
        present[0] = true;
        let g = alignment(k, &vectors, &present);
        let g = GradientAlignment {
            target: if with_target { g.target } else { None },
            ..g
        };
        let config = DogeConfig { mu, smoothing, ..DogeConfig::default() };
        let u = doge::doge_update(&alpha, &g, lr, &config);
        let what = format!("DoGE update of {alpha:?} (mu {mu}, lr {lr}) by {g:?}");
        mixture(&format!("{what}: alpha"), k, &u.alpha)?;
        check(&format!("{what}: coefficients"), &u.coefficients)?;
        prop_assert!(u.scores.iter().all(|x| x.is_finite()), "{what}: scores {:?}", u.scores);

        // Aioli: p * exp(eta * colsum(A)) is a mixture, for a normalised A (the
        // default) and for a raw one (`normalize_a = false`).
        let normalized = aioli::normalize(&a);
        let flat: Vec<f64> = normalized.iter().flatten().copied().collect();
        check(&format!("Aioli normalize({a:?})"), &flat)?;
        let sum: f64 = flat.iter().sum();
        prop_assert!(
            (sum - 1.0).abs() < 1e-9 || flat.iter().all(|x| *x == 0.0),
            "Aioli normalize({a:?}) sums to {sum}: {flat:?}"
        );
        for (name, m) in [("normalised", &normalized), ("raw", &a)] {
            let w = aioli::exponentiated_update(&alpha, m, eta);
            mixture(&format!("Aioli update of {alpha:?} by {name} {m:?}, eta {eta}"), k, &w)?;
        }
        for j in 0..k {
            let w = aioli::smoothed_one_hot(k, j, factor);
            mixture(&format!("Aioli LearnParams mixture {j} of {k}, factor {factor}"), k, &w)?;
        }
    }
}

/// A weight for [`distribution`]: 0, subnormal-small, ordinary or large.
fn weight() -> impl Strategy<Value = f64> {
    prop_oneof![
        1 => Just(0.0),
        1 => Just(1e-300),
        6 => 0.0f64..1.0,
        1 => Just(1e300),
    ]
}

/// Normalised weights, as a scheduler's state holds them (one entry at least is
/// positive: the first is made 1 where all are 0).
fn distribution(w: &[f64]) -> Vec<f64> {
    let mut w = w.to_vec();
    if w.iter().all(|x| *x == 0.0) {
        w[0] = 1.0;
    }
    let sum: f64 = w.iter().sum();
    w.iter().map(|x| x / sum).collect()
}

/// Finite non-negative losses, excess losses or window sums of them.
fn big_non_negative() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => 0.0f64..40.0,
        1 => Just(0.0),
        1 => Just(1e-300),
        1 => Just(1e300),
    ]
}

/// A finite matrix entry of either sign: a skills graph or an Aioli `A`.
fn entry() -> impl Strategy<Value = f64> {
    prop_oneof![
        6 => -3.0f64..3.0,
        1 => Just(0.0),
        1 => Just(1.0),
        1 => Just(-1e300),
        1 => Just(1e300),
    ]
}

/// A finite gradient component (what reaches DoGE once the scheduler boundary has
/// dropped non-finite statistics).
fn gradient_component() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => -3.0f64..3.0,
        1 => Just(0.0),
        1 => Just(1e100),
    ]
}
