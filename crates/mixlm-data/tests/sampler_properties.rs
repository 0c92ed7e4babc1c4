//! The sampler under any valid proportions: every batch has its size, no sequence of a
//! zero-weight domain, fixed composition gives the apportioned counts, each domain's
//! windows are read in order without repeats, the same seed gives the same batches,
//! and a sampler restored from a saved state continues the identical sequence.

use mixlm_data::{MixtureSampler, SamplerState};
use mixlm_mixing::{Composition, Proportions};
use proptest::prelude::*;

fn weights() -> impl Strategy<Value = Vec<f64>> {
    proptest::collection::vec(prop_oneof![2 => Just(0.0), 8 => 0.0f64..10.0], 1..6)
        .prop_filter("one positive weight", |w| w.iter().any(|x| *x > 0.0))
}

fn composition() -> impl Strategy<Value = Composition> {
    prop_oneof![
        Just(Composition::Sample),
        Just(Composition::Fixed),
        Just(Composition::Single)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn batches_follow_the_proportions_and_resume_identically(
        w in weights(),
        comp in composition(),
        seed in any::<u64>(),
        batch in 1usize..40,
        batches in 1usize..12,
        cut in 0usize..12,
    ) {
        let k = w.len();
        let p = Proportions::from_weights(w.clone()).unwrap();
        let mut a = MixtureSampler::new(k, seed, comp);
        let mut b = MixtureSampler::new(k, seed, comp);
        let mut saved: Option<SamplerState> = None;
        let mut drawn = Vec::new();
        let mut next_window = vec![0u64; k];
        for i in 0..batches {
            if i == cut.min(batches - 1) {
                saved = Some(a.state());
            }
            let picks = a.next_batch(&p, batch);
            prop_assert_eq!(&picks, &b.next_batch(&p, batch), "same seed, same batch");
            prop_assert_eq!(picks.len(), batch);
            for &(d, window) in &picks {
                prop_assert!(w[d.0] > 0.0, "domain {} has weight 0", d.0);
                prop_assert_eq!(window, next_window[d.0], "windows in order, none repeated");
                next_window[d.0] += 1;
            }
            if comp == Composition::Fixed {
                let mut counts = vec![0usize; k];
                for (d, _) in &picks {
                    counts[d.0] += 1;
                }
                prop_assert_eq!(counts, p.apportion(batch));
            }
            if comp == Composition::Single {
                prop_assert!(picks.iter().all(|(d, _)| *d == picks[0].0));
            }
            drawn.push(picks);
        }
        let at = cut.min(batches - 1);
        let mut restored = MixtureSampler::from_state(saved.unwrap(), comp);
        for picks in &drawn[at..] {
            prop_assert_eq!(&restored.next_batch(&p, batch), picks);
        }
        prop_assert_eq!(restored.state(), a.state());
    }
}
