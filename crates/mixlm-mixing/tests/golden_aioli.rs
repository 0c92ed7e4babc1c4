//! Golden tests: mixlm's Aioli scheduler against the authors' code.
//!
//! `tests/golden/aioli-*.json` were recorded by running HazyResearch/aioli's own
//! `AioliTrainer.train` / `learn_params_subroutine` (`trainer/aioli_trainer.py`, commit
//! a2361123335cb91d68f5ad86a6c85de7a79e6d5e) and its dataset code
//! (`dataset/slimpj_dataset.py`) unmodified, with the model, optimizer and evaluator
//! replaced by a synthetic loss model (see `tests/golden/README.md`). Each file holds
//! the validation losses in the order the authors' code consumed them (keyed by the
//! number of batches trained before the measurement), the LearnParams group orders
//! numpy drew, the `A` of every round, and the proportions of every trained batch.
//! Their arithmetic is numpy float64, so agreement is required to 1e-12.
//!
//! mixlm draws its group orders from its own seed, so the replays supply the recorded
//! orders through [`AioliScheduler::with_group_orders`]; a second replay keeps mixlm's
//! own orders (through `build_scheduler`) and feeds it losses rebuilt from the recorded
//! per-(sweep, group) drops, which makes `A` independent of the order.

use mixlm_mixing::aioli::{smoothed_one_hot, AioliScheduler};
use mixlm_mixing::{
    build_scheduler, AioliConfig, DomainInfo, DomainLosses, FiniteFeedback, MixingConfig,
    Scheduler, StepFeedback,
};
use serde::Deserialize;
use std::path::PathBuf;

const TOL: f64 = 1e-12;

#[derive(Debug, Clone, Deserialize)]
struct Golden {
    mixlm_toml: String,
    domains: Vec<String>,
    seed: u64,
    validation: Vec<Validation>,
    rounds: Vec<Round>,
    steps: Vec<Step>,
    total_trained_steps: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct Validation {
    step: u64,
    losses: Vec<f64>,
}

#[derive(Debug, Clone, Deserialize)]
struct Round {
    order: Vec<usize>,
    #[serde(rename = "A")]
    a: Vec<Vec<f64>>,
    p: Vec<f64>,
    segment_steps: Vec<u64>,
    lp_trained_steps: u64,
}

#[derive(Debug, Clone, Deserialize)]
struct Step {
    step: u64,
    phase: String,
    proportions: Vec<f64>,
}

fn load(case: &str) -> Golden {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("aioli-{case}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn config(g: &Golden) -> (MixingConfig, AioliConfig) {
    let mixing: MixingConfig = toml::from_str(&g.mixlm_toml).expect("mixlm_toml parses");
    let MixingConfig::Aioli(c) = mixing.clone() else {
        panic!("mixlm_toml is not method = \"aioli\"")
    };
    (mixing, c)
}

fn info(g: &Golden, c: &AioliConfig) -> DomainInfo {
    let k = g.domains.len();
    let rounds = g.rounds.len() as u64;
    DomainInfo {
        names: g.domains.clone(),
        natural_weights: vec![1.0; k],
        seed: g.seed,
        steps: c.init_steps + rounds * c.update_steps,
    }
}

fn losses(v: &[f64]) -> DomainLosses {
    DomainLosses(v.iter().map(|l| Some(*l)).collect())
}

fn feedback(k: usize) -> StepFeedback {
    StepFeedback::train_only(losses(&vec![2.0; k]), vec![1; k])
}

fn check(what: &str, got: &[f64], want: &[f64], tol: f64) -> Result<(), String> {
    if got.len() != want.len() || got.iter().zip(want).any(|(x, y)| (x - y).abs() > tol) {
        return Err(format!("{what}: mixlm {got:?}, authors {want:?}"));
    }
    Ok(())
}

/// Replays a case whose LearnParams batches have exact counts (so the authors' code
/// trains exactly mixlm's steps) with the recorded group orders: every step's
/// proportions, every validation step and every round's `A` must agree.
fn replay_exact(g: &Golden) -> Result<(), String> {
    let (mixing, c) = config(g);
    let info = info(g, &c);
    let k = g.domains.len();
    build_scheduler(&mixing, &info).map_err(|e| e.to_string())?;
    let orders = g.rounds.iter().map(|r| r.order.clone()).collect();
    let mut s = AioliScheduler::new(&c, &info)
        .and_then(|s| s.with_group_orders(orders))
        .map_err(|e| e.to_string())?;
    if info.steps != g.total_trained_steps || g.steps.len() as u64 != info.steps {
        return Err(format!(
            "mixlm runs {} steps, the authors' code trained {} ({} recorded)",
            info.steps,
            g.total_trained_steps,
            g.steps.len()
        ));
    }
    let mut stream = g.validation.iter();
    for (step, want) in (0..info.steps).zip(&g.steps) {
        assert_eq!(want.step, step);
        if s.wants_validation(step) {
            let v = stream.next().ok_or(format!(
                "mixlm wants a validation at step {step}; none left"
            ))?;
            if v.step != step {
                return Err(format!(
                    "mixlm validates at step {step}, the authors' code next at step {}",
                    v.step
                ));
            }
            let done = s.state_ref().rounds_done;
            s.observe_validation(step, &losses(&v.losses));
            if s.state_ref().rounds_done == done + 1 {
                let a = s.state_ref().last_a.as_ref().expect("A after a round");
                let r = &g.rounds[done as usize];
                for (i, (row, want_row)) in a.iter().zip(&r.a).enumerate() {
                    check(&format!("round {done}: A row {i}"), row, want_row, TOL)?;
                }
            }
        }
        let p = s.proportions(step);
        check(
            &format!("step {step} ({})", want.phase),
            p.as_slice(),
            &want.proportions,
            TOL,
        )?;
        s.observe_train(step, &feedback(k));
    }
    if let Some(v) = stream.next() {
        return Err(format!(
            "the authors' code consumed a validation at step {} that mixlm never asked for",
            v.step
        ));
    }
    if s.state_ref().rounds_done != g.rounds.len() as u64 {
        return Err(format!(
            "{} rounds, authors {}",
            s.state_ref().rounds_done,
            g.rounds.len()
        ));
    }
    Ok(())
}

/// Replays a case with mixlm's own (seeded) group orders through `build_scheduler`:
/// the losses fed after each segment are the previous ones minus the drop the authors'
/// code measured for that (sweep, group), so `G`, `A` and the learned mixtures do not
/// depend on the order; the prior and exploit steps must match the authors' code.
fn replay_own_order(g: &Golden) -> Result<(), String> {
    let (mixing, c) = config(g);
    let info = info(g, &c);
    let k = g.domains.len();
    let mut s = build_scheduler(&mixing, &info).map_err(|e| e.to_string())?;
    let per_round = 1 + k * c.lp_rounds as usize;
    // drops[round][sweep][group] = the loss drop over that segment, per domain.
    let drops: Vec<Vec<Vec<Vec<f64>>>> = g
        .rounds
        .iter()
        .enumerate()
        .map(|(r, round)| {
            let ev = &g.validation[r * per_round..(r + 1) * per_round];
            let mut d = vec![vec![vec![0.0; k]; k]; c.lp_rounds as usize];
            for (seg, &j) in round.order.iter().enumerate() {
                d[seg / k][j] = (0..k)
                    .map(|i| ev[seg].losses[i] - ev[seg + 1].losses[i])
                    .collect();
            }
            d
        })
        .collect();
    let lp = c.learn_params_steps(k);
    let mut current = vec![0.0; k];
    let mut groups: Vec<usize> = Vec::new();
    let mut own_orders_differ = false;
    for (step, want) in (0..info.steps).zip(&g.steps) {
        let in_dynamic = step >= c.init_steps;
        let (r, pos) = (
            (step.saturating_sub(c.init_steps)) / c.update_steps,
            (step.saturating_sub(c.init_steps)) % c.update_steps,
        );
        if s.wants_validation(step) {
            if pos == 0 {
                current = g.validation[r as usize * per_round].losses.clone();
                groups.clear();
            } else {
                let seg = groups.len() - 1;
                let d = &drops[r as usize][seg / k][groups[seg]];
                for (l, x) in current.iter_mut().zip(d) {
                    *l -= x;
                }
            }
            s.observe_validation(step, &losses(&current));
        }
        let p = s.proportions(step);
        if in_dynamic && pos < lp {
            if pos % c.lp_steps == 0 {
                let j = (0..k)
                    .max_by(|&a, &b| p.as_slice()[a].total_cmp(&p.as_slice()[b]))
                    .unwrap();
                groups.push(j);
                if pos + c.lp_steps == lp {
                    for sweep in groups.chunks(k) {
                        let mut sorted = sweep.to_vec();
                        sorted.sort_unstable();
                        if !sorted.iter().copied().eq(0..k) {
                            return Err(format!("round {r}: sweep {sweep:?} is no permutation"));
                        }
                    }
                    own_orders_differ |= groups != g.rounds[r as usize].order;
                }
            }
            let j = *groups.last().unwrap();
            let want_p = smoothed_one_hot(k, j, c.one_hot_factor);
            check(&format!("step {step} (lp)"), p.as_slice(), &want_p, TOL)?;
        } else {
            check(
                &format!("step {step} ({}, own order)", want.phase),
                p.as_slice(),
                &want.proportions,
                TOL,
            )?;
        }
        s.observe_train(step, &feedback(k));
    }
    assert!(
        own_orders_differ || k == 2,
        "mixlm's own orders equal the recorded ones everywhere: the replay proves nothing"
    );
    Ok(())
}

fn golden_case(case: &str) {
    let g = load(case);
    replay_exact(&g).unwrap_or_else(|e| panic!("aioli-{case} (recorded orders): {e}"));
    replay_own_order(&g).unwrap_or_else(|e| panic!("aioli-{case} (mixlm's orders): {e}"));
}

#[test]
fn k2_ema_matches_authors() {
    golden_case("k2-ema");
}

#[test]
fn k2_no_ema_matches_authors() {
    golden_case("k2-noema");
}

#[test]
fn k3_ema_matches_authors() {
    golden_case("k3-ema");
}

#[test]
fn k3_no_ema_matches_authors() {
    golden_case("k3-noema");
}

#[test]
fn k3_prior_matches_authors() {
    golden_case("k3-prior");
}

#[test]
fn k3_prior_no_ema_matches_authors() {
    golden_case("k3-prior-noema");
}

#[test]
fn k7_ema_matches_authors() {
    golden_case("k7-ema");
}

#[test]
fn k7_no_ema_matches_authors() {
    golden_case("k7-noema");
}

/// The authors' full-setting script (K = 7, `one_hot_factor` 0.75, batch size 8,
/// `lp_rounds` 2, `lp_steps` 10): its LearnParams segments train 5 steps (3 for the
/// last group), 66 per LearnParams instead of 140, while its step counter advances
/// 140, so a round trains 126 batches where mixlm trains 200. mixlm keeps the nominal
/// schedule (see the module docs of `aioli.rs`), so this compares round by round: the
/// same validation losses consumed in the same order give the same `A` and learned
/// mixture every round, and every segment uses the authors' nominal mixture.
#[test]
fn k7_full_script_matches_authors_round_by_round() {
    let g = load("k7-full-script");
    let (mixing, c) = config(&g);
    let info = info(&g, &c);
    let k = g.domains.len();
    build_scheduler(&mixing, &info).unwrap();
    let per_round = 1 + k * c.lp_rounds as usize;
    // The recorded shortfall, as documented.
    for r in &g.rounds {
        let want: Vec<u64> = r
            .order
            .iter()
            .map(|&j| if j == k - 1 { 3 } else { 5 })
            .collect();
        assert_eq!(r.segment_steps, want);
        assert_eq!(r.lp_trained_steps, 66);
    }
    assert_eq!(g.total_trained_steps, 3 * 126);
    assert_eq!(c.learn_params_steps(k), 140);

    let orders = g.rounds.iter().map(|r| r.order.clone()).collect();
    let mut s = AioliScheduler::new(&c, &info)
        .unwrap()
        .with_group_orders(orders)
        .unwrap();
    let mut stream = g.validation.iter().enumerate();
    for step in 0..info.steps {
        let (r, pos) = (step / c.update_steps, step % c.update_steps);
        let round = &g.rounds[r as usize];
        if s.wants_validation(step) {
            let (n, v) = stream.next().expect("a recorded validation");
            assert_eq!(n / per_round, r as usize, "step {step}");
            let done = s.state_ref().rounds_done;
            s.observe_validation(step, &losses(&v.losses));
            if s.state_ref().rounds_done == done + 1 {
                let a = s.state_ref().last_a.clone().unwrap();
                for (i, (row, want)) in a.iter().zip(&round.a).enumerate() {
                    check(&format!("round {r}: A row {i}"), row, want, TOL).unwrap();
                }
            }
        }
        let p = s.proportions(step);
        if pos < c.learn_params_steps(k) {
            // The authors' mixture of this segment: at its first recorded batch.
            let seg = (pos / c.lp_steps) as usize;
            let first = g.validation[r as usize * per_round + seg].step;
            let want = &g.steps[first as usize];
            assert_eq!(want.phase, "lp");
            check(
                &format!("step {step} (lp)"),
                p.as_slice(),
                &want.proportions,
                TOL,
            )
            .unwrap();
        } else {
            check(&format!("step {step}"), p.as_slice(), &round.p, TOL).unwrap();
        }
        s.observe_train(step, &feedback(k));
    }
    assert!(stream.next().is_none());
    // Every exploit batch of the authors' round trained on that round's p.
    for (n, r) in g.rounds.iter().enumerate() {
        let exploit: Vec<&Step> = g
            .steps
            .iter()
            .filter(|s| s.phase == "exploit" && s.step / 126 == n as u64)
            .collect();
        assert_eq!(
            exploit.len() as u64,
            c.update_steps - c.learn_params_steps(k)
        );
        for s in exploit {
            check("authors' exploit batch", &s.proportions, &r.p, 0.0).unwrap();
        }
    }
}

/// The comparison can fail: one expected proportion moved by 1e-9 is caught.
#[test]
fn a_perturbed_golden_number_fails() {
    let mut g = load("k3-noema");
    replay_exact(&g).unwrap();
    g.steps[380].proportions[1] += 1e-9;
    let e = replay_exact(&g).unwrap_err();
    assert!(e.starts_with("step 380 (exploit)"), "{e}");
    let mut g = load("k3-noema");
    g.validation[20].losses[2] += 1e-6;
    assert!(replay_exact(&g).is_err());
    let mut g = load("k7-ema");
    g.rounds[1].a[3][4] += 1e-9;
    let e = replay_exact(&g).unwrap_err();
    assert!(e.starts_with("round 1: A row 3"), "{e}");
}

/// The scheduler boxed as the trainer holds it (`FiniteFeedback`) replays identically.
#[test]
fn boxed_with_recorded_orders_matches() {
    let g = load("k3-prior");
    let (_, c) = config(&g);
    let info = info(&g, &c);
    let orders = g.rounds.iter().map(|r| r.order.clone()).collect();
    let inner = AioliScheduler::new(&c, &info)
        .unwrap()
        .with_group_orders(orders)
        .unwrap();
    let mut s = FiniteFeedback(Box::new(inner));
    let mut stream = g.validation.iter();
    for want in &g.steps {
        if s.wants_validation(want.step) {
            let v = stream.next().unwrap();
            assert_eq!(v.step, want.step);
            s.observe_validation(want.step, &losses(&v.losses));
        }
        let p = s.proportions(want.step);
        check(
            &format!("step {}", want.step),
            p.as_slice(),
            &want.proportions,
            TOL,
        )
        .unwrap();
        s.observe_train(want.step, &feedback(g.domains.len()));
    }
}
