//! Per-step overhead of each scheduler: `proportions` + `observe_train` (and, for
//! Aioli, its share of validation bookkeeping and the round update; for DoGE, its
//! update from the gradient Gram matrix), excluding the
//! training and evaluation the method asks the trainer for.
//!
//! `cargo bench -p mixlm-mixing --bench schedulers`. Results go to benches/RESULTS.md,
//! next to the time of a 160M training step they must be negligible against.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use mixlm_mixing::{
    build_scheduler, AioliConfig, AlignmentTarget, DogeConfig, DomainInfo, DomainLosses,
    GradientAlignment, InitWeights, MixingConfig, OdmConfig, OdmVariant, StepFeedback,
};

fn info(k: usize) -> DomainInfo {
    DomainInfo {
        names: (0..k).map(|i| format!("d{i}")).collect(),
        natural_weights: (1..=k).map(|i| i as f64).collect(),
        seed: 0,
        steps: 1000,
    }
}

fn feedback(k: usize, step: u64) -> StepFeedback {
    StepFeedback {
        train: DomainLosses(
            (0..k)
                .map(|i| Some(2.0 + ((step as usize + i) % 7) as f64 * 0.1))
                .collect(),
        ),
        sequences: vec![4; k],
        micro_batches: 1,
        reference: None,
        excess: None,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler step");
    for k in [7usize, 22] {
        let methods = [
            ("stratified", MixingConfig::default()),
            ("odm paper", MixingConfig::Odm(OdmConfig::default())),
            (
                "odm official",
                MixingConfig::Odm(OdmConfig {
                    variant: OdmVariant::Official,
                    ..OdmConfig::default()
                }),
            ),
            (
                "aioli",
                MixingConfig::Aioli(AioliConfig {
                    eta: 1.0,
                    update_steps: 2 * 10 * k as u64 + 60,
                    lp_rounds: 2,
                    lp_steps: 10,
                    one_hot_factor: 0.75,
                    ema: Some(0.1),
                    normalize_a: true,
                    init_steps: 0,
                    init_proportions: InitWeights::Stratified,
                    start_from_init: false,
                }),
            ),
        ];
        for (name, config) in methods {
            let mut s = build_scheduler(&config, &info(k)).unwrap();
            let mut step = 0u64;
            group.bench_function(BenchmarkId::new(name, format!("K={k}")), |b| {
                b.iter(|| {
                    if s.wants_validation(step) {
                        let fb = feedback(k, step);
                        s.observe_validation(step, &fb.train);
                    }
                    let p = s.proportions(step);
                    s.observe_train(step, &feedback(k, step));
                    step += 1;
                    p
                })
            });
        }
        // DoGE's scheduler work per step: one update from the Gram matrix of the
        // domain gradients (computing the gradients is training work, not counted).
        let mut doge =
            build_scheduler(&MixingConfig::Doge(DogeConfig::default()), &info(k)).unwrap();
        let alignment = GradientAlignment {
            present: vec![true; k],
            gram: (0..k)
                .map(|i| (0..k).map(|j| if i == j { 1.0 } else { 0.1 }).collect())
                .collect(),
            target: Some(AlignmentTarget {
                dots: (0..k).map(|i| 0.01 * i as f64).collect(),
                norm_sq: 1.0,
            }),
        };
        let mut step = 0u64;
        group.bench_function(BenchmarkId::new("doge", format!("K={k}")), |b| {
            b.iter(|| {
                let p = doge.proportions(step);
                let w = doge.gradient_weights(step, 3e-4, &alignment);
                doge.observe_train(step, &feedback(k, step));
                step += 1;
                (p, w)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
