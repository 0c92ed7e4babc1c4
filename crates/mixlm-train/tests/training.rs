//! End-to-end behaviour of the trainer on the CPU backend.

use burn::backend::{Autodiff, NdArray};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use mixlm_data::{Composition, MixtureSampler, Proportions, SamplerState};
use mixlm_eval::inputs_and_targets;
use mixlm_model::ModelConfig;
use mixlm_train::checkpoint::{latest_checkpoint, load_model};
use mixlm_train::config::OptimizerSection;
use mixlm_train::optim::AdamW;
use mixlm_train::{train, RunConfig, TrainOptions};

mod common;
use common::{metrics, short_run};

type B = Autodiff<NdArray<f32>>;

/// Repeatedly training on one batch must drive its loss far down (the model can memorise it).
#[test]
fn overfitting_one_batch_reduces_loss() {
    let device = Default::default();
    B::seed(&device, 7);
    let config = ModelConfig::preset("tiny").unwrap();
    let mut model = config.init::<B>(&device);
    let windows: Vec<u32> = (0..4 * 17).map(|i| ((i * 7919) % 97 + 1) as u32).collect();
    let (x, y) = inputs_and_targets::<B>(&windows, 4, 16, &device);
    let mut opt = AdamW::new(OptimizerSection {
        lr: 3e-3,
        weight_decay: 0.0,
        ..Default::default()
    });
    let mut losses = Vec::new();
    for _ in 0..60 {
        let loss = model.token_losses(x.clone(), y.clone()).mean();
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(3e-3, model, grads).0;
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    // Random init: loss ~ ln(128) = 4.85. Memorising 64 tokens must cut it by far more than half.
    assert!((first - 128f32.ln()).abs() < 0.3, "initial loss {first}");
    assert!(last < 0.3 * first, "loss went from {first} to {last}");
}

/// A short run writes one metrics line per step with per-domain losses and proportions,
/// evaluations, and checkpoints whose model reloads with identical outputs.
#[test]
fn short_run_writes_metrics_and_reloadable_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let config = short_run(tmp.path(), "short", &["run.grad_accum=2"]);
    let device = Default::default();
    let outcome = train::<B>(&config, &device, &TrainOptions::quiet()).unwrap();
    let lines = metrics(&outcome.run_dir);
    let steps: Vec<_> = lines.iter().filter(|l| l["kind"] == "train").collect();
    let evals: Vec<_> = lines.iter().filter(|l| l["kind"] == "eval").collect();
    assert_eq!(steps.len(), 6);
    assert_eq!(evals.len(), 3, "initial, step 3, final");
    let domains = outcome.rows.len();
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["step"], (i + 1) as u64);
        assert_eq!(s["tokens"], ((i + 1) * 2 * 4 * 16) as u64);
        let p = s["proportions"].as_object().unwrap();
        assert_eq!(p.len(), domains);
        let total: f64 = p.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        let seqs: u64 = s["sequences"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(seqs, 8, "2 micro-batches of 4 sequences");
        // Step loss = sequence-weighted mean of the per-domain losses.
        let mut weighted = 0.0;
        for (name, loss) in s["domain_loss"].as_object().unwrap() {
            let n = s["sequences"][name].as_u64().unwrap() as f64;
            match loss.as_f64() {
                Some(l) => weighted += l * n,
                None => assert_eq!(n, 0.0),
            }
        }
        assert!((weighted / 8.0 - s["loss"].as_f64().unwrap()).abs() < 1e-6);
        // The step's time by part: each measured, together within the wall-clock
        // since the previous step's record.
        let t = &s["time_s"];
        let parts: Vec<f64> = ["data", "model", "mixing", "other"]
            .iter()
            .map(|p| t[p].as_f64().unwrap())
            .collect();
        assert!(parts.iter().all(|&x| x >= 0.0) && parts[1] > 0.0, "{t}");
        let since = s["elapsed_s"].as_f64().unwrap()
            - if i == 0 {
                0.0
            } else {
                steps[i - 1]["elapsed_s"].as_f64().unwrap()
            };
        assert!(parts.iter().sum::<f64>() <= since + 1e-3, "{t} in {since}");
    }

    let ckpt = latest_checkpoint(&outcome.run_dir).unwrap();
    assert!(ckpt.ends_with("step-00000006"), "{}", ckpt.display());
    assert!(outcome
        .run_dir
        .join("checkpoints/step-00000003/model.safetensors")
        .exists());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 6);
    assert_eq!(state["optimizer_steps"], 6);

    // Batches are read ahead on a background thread, yet each step saw exactly the
    // batches a sampler on the main thread draws, and each checkpoint holds the
    // sampler state after the batches consumed by then (not the reader's, which runs
    // a step ahead).
    let source = config.open_source().unwrap();
    let mut reference = MixtureSampler::new(domains, config.run.seed, Composition::Sample);
    let names = source.domain_names();
    for (i, s) in steps.iter().enumerate() {
        let p: Vec<f64> = names
            .iter()
            .map(|n| s["proportions"][n].as_f64().unwrap())
            .collect();
        let p = Proportions::from_weights(p).unwrap();
        let mut counts = vec![0u64; domains];
        for _ in 0..2 {
            for (d, _) in reference.next_batch(&p, 4) {
                counts[d.0] += 1;
            }
        }
        for (d, n) in names.iter().enumerate() {
            assert_eq!(s["sequences"][n].as_u64().unwrap(), counts[d], "step {i}");
        }
        if i + 1 == 3 || i + 1 == 6 {
            let dir = outcome
                .run_dir
                .join(format!("checkpoints/step-{:08}", i + 1));
            let saved: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
            let saved: SamplerState = serde_json::from_value(saved["sampler"].clone()).unwrap();
            assert_eq!(saved, reference.state(), "checkpoint after step {}", i + 1);
        }
    }

    // The saved model reproduces the final validation losses exactly.
    let (model, _) = load_model::<NdArray<f32>>(&ckpt, &device).unwrap();
    let val = mixlm_eval::validation_losses(&model, source.as_ref(), 16, 4, 8, &device);
    let final_eval = evals.last().unwrap();
    for (d, row) in outcome.rows.iter().enumerate() {
        let logged = final_eval["val_loss"][&row.domain].as_f64().unwrap();
        assert!((val.0[d].unwrap() - logged).abs() < 1e-5, "{}", row.domain);
    }
}

/// Same seed, same config: the same run to the bit, every record of `metrics.jsonl`
/// (batches, proportions, losses, gradient norms, evaluations) equal but for timing.
#[test]
fn runs_are_deterministic_on_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    let run = |name: &str| {
        let outcome = train::<B>(
            &short_run(tmp.path(), name, &[]),
            &device,
            &TrainOptions::quiet(),
        )
        .unwrap();
        let mut lines = metrics(&outcome.run_dir);
        for line in &mut lines {
            let o = line.as_object_mut().unwrap();
            for timing in mixlm_train::metrics::CLOCK_FIELDS {
                o.remove(timing);
            }
        }
        lines
    };
    let (a, b) = (run("a"), run("b"));
    assert_eq!(a.len(), 9, "6 steps and 3 evaluations");
    assert_eq!(a, b);
}

/// The embedded demo, exactly as `mixlm train` runs it: every domain's validation
/// perplexity at least halves, and every domain with learnable context (Markov order
/// >= 1) ends within 1.5x of its best achievable perplexity.
#[test]
fn demo_run_halves_perplexity_and_nears_the_floor() {
    let tmp = tempfile::tempdir().unwrap();
    let config =
        RunConfig::embedded(&[format!("run.out_dir=\"{}\"", tmp.path().display())]).unwrap();
    let outcome = train::<B>(&config, &Default::default(), &TrainOptions::quiet()).unwrap();
    print!("{}", mixlm_eval::format_table(&outcome.rows));
    let domains = &config.data.synthetic.domains;
    assert_eq!(outcome.rows.len(), domains.len());
    for (row, domain) in outcome.rows.iter().zip(domains) {
        let initial = row.initial_ppl.unwrap();
        assert!(
            row.ppl <= 0.5 * initial,
            "{}: {} -> {}",
            row.domain,
            initial,
            row.ppl
        );
        if domain.order >= 1 {
            let ratio = row.ratio_to_floor().unwrap();
            assert!(
                ratio <= 1.5,
                "{}: {:.3} is {ratio:.2}x its floor",
                row.domain,
                row.ppl
            );
        }
    }
}

/// ODM on the synthetic corpus: the bandit ends up sampling most from `noisy`, the
/// domain whose loss stays highest (its floor is ~2.7 nats against ~0.7 for markov1).
///
/// Mixed batches, so every domain gets a reward from the first step on: with
/// single-domain micro-batches the official code's zero initial rewards leave
/// domains that were not drawn early at `eps_t` for a long time (a property of the
/// original, reproduced here, that a 150-step test cannot wait out).
#[test]
fn odm_moves_towards_the_domain_with_the_highest_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let odm = |name: &str, extra: &[&str]| {
        let mut o = vec![
            "run.batch_size=8",
            "run.seq_len=32",
            "eval.every=0",
            "checkpoint.every=0",
            "mixing.method=\"odm\"",
            "mixing.variant=\"official\"",
            "mixing.alpha=0.5",
        ];
        o.extend_from_slice(extra);
        let config = short_run(tmp.path(), name, &o);
        let outcome = train::<B>(&config, &Default::default(), &TrainOptions::quiet()).unwrap();
        metrics(&outcome.run_dir)
            .into_iter()
            .filter(|l| l["kind"] == "train")
            .collect::<Vec<_>>()
    };
    let lines = odm("mixed", &["run.steps=150", "mixing.batches=\"mixed\""]);
    let p = lines.last().unwrap()["proportions"]
        .as_object()
        .unwrap()
        .clone();
    let (top, _) = p
        .iter()
        .max_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
        .unwrap();
    assert_eq!(top, "noisy", "{p:?}");
    // ... and least from markov1, which the model learns first.
    let (bottom, _) = p
        .iter()
        .min_by(|a, b| a.1.as_f64().partial_cmp(&b.1.as_f64()).unwrap())
        .unwrap();
    assert_eq!(bottom, "markov1", "{p:?}");
    assert!(p["noisy"].as_f64().unwrap() > 0.24, "uniform is 0.2: {p:?}");

    // Single-domain micro-batches: each step's 2 micro-batches of 8 give each domain
    // a multiple of 8 sequences.
    let lines = odm(
        "single",
        &[
            "run.steps=10",
            "mixing.batches=\"single\"",
            "run.grad_accum=2",
        ],
    );
    for l in &lines {
        for n in l["sequences"].as_object().unwrap().values() {
            assert_eq!(n.as_u64().unwrap() % 8, 0, "{l}");
        }
    }
}

/// `mixing.method = "odm"` alone runs Algorithm 1 of the ODM paper: single-domain
/// micro-batches, a warm-up of 1% of the steps at `init`, and rewards from the
/// summed micro-batch losses over the policy. Replaying the run's logged per-domain
/// losses and sequence counts through a fresh scheduler (told the step's `G`
/// micro-batches) gives the proportions the run logged, step by step.
#[test]
fn default_odm_is_algorithm_1_and_its_log_replays() {
    use mixlm_mixing::{DomainInfo, DomainLosses, OdmConfig, OdmScheduler, Scheduler};
    let tmp = tempfile::tempdir().unwrap();
    let config = short_run(
        tmp.path(),
        "odm-default",
        &[
            "run.steps=200",
            "run.grad_accum=3",
            "eval.every=0",
            "checkpoint.every=0",
            "mixing.method=\"odm\"",
        ],
    );
    let outcome = train::<B>(&config, &Default::default(), &TrainOptions::quiet()).unwrap();
    let lines: Vec<_> = metrics(&outcome.run_dir)
        .into_iter()
        .filter(|l| l["kind"] == "train")
        .collect();
    // The synthetic corpus's domains, in its order.
    let names: Vec<String> = ["markov1", "markov2", "shared_a", "shared_b", "noisy"]
        .map(String::from)
        .to_vec();
    let info = DomainInfo {
        names: names.clone(),
        natural_weights: vec![1.0; names.len()],
        seed: 0,
        steps: 200,
    };
    let mut replay = OdmScheduler::new(&OdmConfig::default(), &info).unwrap();
    assert_eq!(replay.warmup_steps(), 2);
    let field = |l: &serde_json::Value, key: &str, name: &str| l[key][name].clone();
    let mut moved = 0.0f64;
    for (step, l) in lines.iter().enumerate() {
        let logged: Vec<f64> = names
            .iter()
            .map(|n| field(l, "proportions", n).as_f64().unwrap())
            .collect();
        let p = replay.proportions(step as u64);
        for (a, b) in p.as_slice().iter().zip(&logged) {
            assert!((a - b).abs() < 1e-12, "step {step}: {p:?} vs {logged:?}");
            moved = moved.max((a - 0.2).abs());
        }
        let sequences: Vec<usize> = names
            .iter()
            .map(|n| field(l, "sequences", n).as_u64().unwrap() as usize)
            .collect();
        // Three micro-batches of 4, each from one domain.
        assert!(sequences.iter().all(|n| n % 4 == 0), "{l}");
        let train = names
            .iter()
            .map(|n| field(l, "domain_loss", n).as_f64())
            .collect();
        let feedback = mixlm_mixing::StepFeedback {
            train: DomainLosses(train),
            sequences,
            micro_batches: 3,
            reference: None,
            excess: None,
        };
        replay.observe_train(step as u64, &feedback);
    }
    assert!(moved > 0.01, "the policy left uniform: {moved}");
}

/// The final checkpoint's scheduler state.
fn scheduler_state(run_dir: &std::path::Path) -> serde_json::Value {
    let ckpt = latest_checkpoint(run_dir).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("state.json")).unwrap()).unwrap();
    state["scheduler"].clone()
}

/// Mean over domains of the final validation loss.
fn final_mean_val_loss(run_dir: &std::path::Path) -> f64 {
    let lines = metrics(run_dir);
    let last = lines.iter().rfind(|l| l["kind"] == "eval").unwrap();
    let v = last["val_loss"].as_object().unwrap();
    v.values().map(|x| x.as_f64().unwrap()).sum::<f64>() / v.len() as f64
}

/// Aioli on a synthetic corpus whose cross-domain transfer is known by
/// construction: `twin_a` and `twin_b` are the same Markov chain (shared component of
/// weight 1; their windows differ), `other` has a disjoint vocabulary. The estimated
/// `A` must show full transfer between the twins and little to or from `other`, and
/// the run must end no worse than stratified sampling.
#[test]
fn aioli_recovers_known_transfer_and_is_not_worse_than_stratified() {
    let tmp = tempfile::tempdir().unwrap();
    let common = [
        "run.steps=360",
        "run.batch_size=16",
        "run.seq_len=32",
        "optimizer.lr=0.01",
        "schedule.warmup_steps=20",
        "eval.every=0",
        "eval.sequences=256",
        "eval.batch_size=128",
        "checkpoint.every=0",
        "data.synthetic.domains=[\
         { name = \"twin_a\", first_token = 1, num_tokens = 32, order = 1, successors = 4, shared = { group = \"t\", weight = 1.0 } },\
         { name = \"twin_b\", first_token = 1, num_tokens = 32, order = 1, successors = 4, shared = { group = \"t\", weight = 1.0 } },\
         { name = \"other\", first_token = 33, num_tokens = 32, order = 1, successors = 4 }]",
    ];
    let run = |name: &str, extra: &[&str]| {
        let mut o: Vec<&str> = common.to_vec();
        o.extend_from_slice(extra);
        let config = short_run(tmp.path(), name, &o);
        train::<B>(&config, &Default::default(), &TrainOptions::quiet())
            .unwrap()
            .run_dir
    };
    let aioli = run(
        "aioli",
        &[
            "mixing.method=\"aioli\"",
            "mixing.eta=1.0",
            "mixing.update_steps=100",
            "mixing.lp_rounds=2",
            "mixing.lp_steps=10",
            "mixing.one_hot_factor=0.75",
            "mixing.init_steps=60",
        ],
    );
    let stratified = run("stratified", &[]);

    let state = scheduler_state(&aioli);
    assert_eq!(state["rounds_done"], 3);
    let a: Vec<Vec<f64>> = serde_json::from_value(state["last_a"].clone()).unwrap();
    let names = ["twin_a", "twin_b", "other"];
    println!("A (row: validation group, column: trained group) = ");
    for (n, row) in names.iter().zip(&a) {
        println!("  {n:>9} {row:>9.4?}");
    }
    let lines = metrics(&aioli);
    let last = lines.iter().rfind(|l| l["kind"] == "train").unwrap();
    println!("final proportions {}", last["proportions"]);
    let (aioli_loss, strat_loss) = (
        final_mean_val_loss(&aioli),
        final_mean_val_loss(&stratified),
    );
    println!("mean final validation loss: aioli {aioli_loss:.4}, stratified {strat_loss:.4}");

    let (ta, tb, o) = (0, 1, 2);
    let scale = a.iter().flatten().fold(0.0f64, |m, x| m.max(x.abs()));
    // The twins are one distribution: every trained group moves their validation
    // losses alike (rows agree to 30% of the largest entry; seen: 12%).
    for j in 0..3 {
        assert!(
            (a[ta][j] - a[tb][j]).abs() <= 0.3 * scale,
            "column {j}: {a:?}"
        );
    }
    // Training on either twin helps both twins, by similar amounts (cluster sums
    // within 25%; seen: 10%) ...
    let (sa, sb) = (a[ta][ta] + a[ta][tb], a[tb][ta] + a[tb][tb]);
    assert!(
        sa > 0.0 && sb > 0.0 && (sa - sb).abs() <= 0.25 * sa.max(sb),
        "{a:?}"
    );
    // ... and does nothing for `other`, whose vocabulary is disjoint: its row's
    // largest entry is its own, and the twins' columns give it at most a quarter of
    // that (seen: negative, interference).
    assert!(a[o][o] > 0.0 && a[o][o] >= a[o][ta].max(a[o][tb]), "{a:?}");
    assert!(a[o][ta] + a[o][tb] <= 0.25 * a[o][o], "{a:?}");
    // Not worse than stratified (seen: 1.3202 vs 1.3248 nats).
    assert!(
        aioli_loss <= strat_loss + 0.005,
        "{aioli_loss} vs {strat_loss}"
    );
    // LearnParams segments used fixed-count batches of the smoothed one-hot mixture.
    let learn = lines
        .iter()
        .filter(|l| l["kind"] == "train")
        .nth(60)
        .unwrap();
    let seqs: Vec<u64> = names
        .iter()
        .map(|n| learn["sequences"][n].as_u64().unwrap())
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [2, 2, 12],
        "0.75 x 16 on the segment's group: {seqs:?}"
    );
}

/// DoReMi's recipe on the synthetic corpus: a stratified reference run, then the
/// proxy run (uniform fixed-count batches, objective reweighted by excess loss over
/// the reference), whose averaged weights land in `learned_mixture.toml` for the
/// final run. The paper's prediction: a domain with no learnable structure
/// (`noisy`, whose loss the reference already sits at) is downweighted.
#[test]
fn doremi_proxy_learns_a_mixture_from_excess_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let common = [
        "run.steps=80",
        "run.batch_size=10",
        "run.seq_len=32",
        "eval.every=0",
        "checkpoint.every=0",
    ];
    let run = |name: &str, extra: &[String]| {
        let mut o: Vec<String> = common.iter().map(|s| s.to_string()).collect();
        o.extend_from_slice(extra);
        let o: Vec<&str> = o.iter().map(String::as_str).collect();
        let config = short_run(tmp.path(), name, &o);
        train::<B>(&config, &Default::default(), &TrainOptions::quiet())
            .unwrap()
            .run_dir
    };
    let reference = run("reference", &["run.steps=200".into()]);
    let proxy = run(
        "proxy",
        &[
            "mixing.method=\"doremi\"".into(),
            format!("mixing.reference=\"{}\"", reference.display()),
        ],
    );
    let lines = metrics(&proxy);
    for l in lines.iter().filter(|l| l["kind"] == "train") {
        for (name, p) in l["proportions"].as_object().unwrap() {
            assert!((p.as_f64().unwrap() - 0.2).abs() < 1e-12, "{name}: {l}");
            assert_eq!(l["sequences"][name], 2, "fixed counts, 10 / 5 domains");
        }
    }
    let state = scheduler_state(&proxy);
    assert_eq!(state["updates"], 80);
    // The final run reads the learned mixture.
    let learned = proxy.join("learned_mixture.toml");
    let config = RunConfig::embedded(&[])
        .unwrap()
        .with_mixing_file(&learned)
        .unwrap();
    let mixlm_mixing::MixingConfig::Manual(m) = &config.mixing else {
        panic!("{:?}", config.mixing)
    };
    println!("DoReMi learned mixture: {:?}", m.weights);
    let total: f64 = m.weights.values().sum();
    assert!((total - 1.0).abs() < 1e-9);
    // Excess loss is what the proxy could still learn that the reference has: `noisy`
    // has nothing to learn beyond unigrams, so it ends below uniform and below every
    // first-order domain the reference has learned. (`markov2`'s second-order
    // structure is not learned by a 200-step reference either, so it is low too.)
    let w = |n: &str| m.weights[n];
    assert!(w("noisy") < 0.2, "{:?}", m.weights);
    for learned in ["markov1", "shared_a", "shared_b"] {
        assert!(w("noisy") < w(learned), "{learned}: {:?}", m.weights);
    }
}

/// DoGE's proxy run, out-of-domain setting: the target is `twin_a`'s validation
/// data. `twin_b` is the same generator, so its gradients align with the target's;
/// `other` uses other tokens and a different chain, so its alignment stays near zero
/// (clipped at `dw_min = 0`): the learned mixture puts `other` far below uniform and
/// the twins above it. Batches are exact uniform counts; the weights are logged every
/// step and averaged into the learned mixture.
#[test]
fn doge_proxy_upweights_domains_aligned_with_the_target() {
    let tmp = tempfile::tempdir().unwrap();
    let config = short_run(
        tmp.path(),
        "doge",
        &[
            "run.steps=40",
            "run.batch_size=12",
            "run.seq_len=32",
            "optimizer.lr=0.01",
            "eval.every=0",
            "checkpoint.every=0",
            "mixing.method=\"doge\"",
            "mixing.val_sequences=8",
            "mixing.mu=0.1",
            "mixing.target_domains=[\"twin_a\"]",
            "data.synthetic.domains=[\
             { name = \"twin_a\", first_token = 1, num_tokens = 32, order = 1, successors = 4, shared = { group = \"t\", weight = 1.0 } },\
             { name = \"twin_b\", first_token = 1, num_tokens = 32, order = 1, successors = 4, shared = { group = \"t\", weight = 1.0 } },\
             { name = \"other\", first_token = 33, num_tokens = 32, order = 1, successors = 4 }]",
        ],
    );
    let run_dir = train::<B>(&config, &Default::default(), &TrainOptions::quiet())
        .unwrap()
        .run_dir;
    let names = ["twin_a", "twin_b", "other"];
    let lines = metrics(&run_dir);
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l["kind"] == "train").collect();
    assert_eq!(steps.len(), 40);
    let mut sum = [0.0; 3];
    for l in &steps {
        for (i, name) in names.iter().enumerate() {
            assert_eq!(l["sequences"][name], 4, "exact uniform counts: {l}");
            sum[i] += l["domain_weights"][name].as_f64().unwrap();
        }
    }
    assert_eq!(scheduler_state(&run_dir)["updates"], 40);
    let learned = config
        .clone()
        .with_mixing_file(&run_dir.join("learned_mixture.toml"))
        .unwrap();
    let mixlm_mixing::MixingConfig::Manual(m) = &learned.mixing else {
        panic!("{:?}", learned.mixing)
    };
    println!("DoGE learned mixture: {:?}", m.weights);
    // The learned mixture is the average of the logged weights.
    for (i, name) in names.iter().enumerate() {
        assert!((m.weights[*name] - sum[i] / 40.0).abs() < 1e-9, "{name}");
    }
    assert!(m.weights["other"] < 0.25, "{:?}", m.weights);
    assert!(
        m.weights["twin_a"].min(m.weights["twin_b"]) > 0.35,
        "{:?}",
        m.weights
    );
}

/// `run.precision`: f16 is refused by the config (no loss scaling), bf16 by the device
/// when it has no bf16 (the CPU backend), each with what to do.
#[test]
fn precision_is_checked_against_the_config_and_the_device() {
    let e = RunConfig::embedded(&["run.precision=\"f16\"".to_string()])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("run.precision") && e.contains("loss scaling") && e.contains("bf16"),
        "{e}"
    );
    let e = RunConfig::embedded(&["run.precision=\"fp8\"".to_string()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("fp8") && e.contains("bf16"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let config = short_run(tmp.path(), "bf16-on-cpu", &["run.precision=\"bf16\""]);
    let e = mixlm_train::train_on(
        mixlm_train::BackendKind::Cpu,
        &config,
        &TrainOptions::quiet(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("run.precision = \"bf16\": the ") && e.contains("precision = \"f32\""),
        "{e}"
    );
}

/// Settings that change how the step computes but not what: `activation_checkpointing =
/// "balanced"` recomputes activations in the backward pass (the same losses, step by
/// step, as keeping them), and `attention = "burn"` runs Burn's attention op instead of
/// the fused one (the same up to float rounding).
#[test]
fn checkpointing_and_attention_kernel_train_like_the_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let losses = |name: &str, extra: &[&str]| -> Vec<f64> {
        let config = short_run(tmp.path(), name, extra);
        let outcome = mixlm_train::train_on(
            mixlm_train::BackendKind::Cpu,
            &config,
            &TrainOptions {
                quiet: true,
                start: mixlm_train::Start::Overwrite,
                ..Default::default()
            },
        )
        .unwrap();
        metrics(&outcome.run_dir)
            .iter()
            .filter(|l| l["kind"] == "train")
            .map(|l| l["loss"].as_f64().unwrap())
            .collect()
    };
    let kept = losses("kept", &[]);
    assert_eq!(kept.len(), 6);
    for (setting, tolerance) in [
        ("run.activation_checkpointing=\"balanced\"", 1e-6),
        ("run.attention=\"burn\"", 1e-4),
    ] {
        let other = losses("other", &[setting]);
        assert_eq!(other.len(), kept.len());
        for (a, b) in kept.iter().zip(&other) {
            assert!(
                (a - b).abs() < tolerance,
                "{setting}: {kept:?} vs {other:?}"
            );
        }
    }
    let e = RunConfig::embedded(&["run.activation_checkpointing=\"full\"".to_string()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("full") && e.contains("balanced"), "{e}");
}

/// `mixlm train --resume` verifies the checkpoint once, picking the config, and hands
/// it on: the trainer continues from the checkpoint it is given without looking for
/// (and hashing) the newest one again. Given the older of two, it continues from
/// that one.
#[test]
fn resume_continues_from_the_checkpoint_the_caller_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let config = short_run(tmp.path(), "given", &["checkpoint.every=2", "eval.every=0"]);
    let first = train::<B>(&config, &Default::default(), &TrainOptions::quiet()).unwrap();
    let (_, newest) = mixlm_train::resume::resume_config(&first.run_dir, &[]).unwrap();
    assert!(newest.ends_with("step-00000006"), "{}", newest.display());
    let older = first.run_dir.join("checkpoints/step-00000004");
    let resumed = train::<B>(
        &config,
        &Default::default(),
        &TrainOptions {
            quiet: true,
            start: mixlm_train::Start::ResumeFrom(older),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(resumed.resumed_from, Some(4));
}

/// `model.init_from` starts where another run ended: the new run's initial validation
/// perplexities are the first run's final ones (to the bit), it trains on from there,
/// and a folder with a model of another shape, or no model, is refused naming the key.
#[test]
fn init_from_starts_from_another_runs_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let device = Default::default();
    let options = TrainOptions::quiet();
    let first = train::<B>(&short_run(tmp.path(), "first", &[]), &device, &options).unwrap();
    let from = format!("model.init_from=\"{}\"", first.run_dir.display());
    let second = train::<B>(
        &short_run(tmp.path(), "second", &[&from]),
        &device,
        &options,
    )
    .unwrap();
    assert_eq!(first.rows.len(), 5);
    for (a, b) in first.rows.iter().zip(&second.rows) {
        assert_eq!(b.initial_ppl, Some(a.ppl), "{}", a.domain);
        assert_ne!(b.ppl, a.ppl, "{}: the second run did not train", a.domain);
    }

    let three_layers = short_run(tmp.path(), "third", &[&from, "model.n_layers=3"]);
    let e = format!(
        "{:#}",
        train::<B>(&three_layers, &device, &options).unwrap_err()
    );
    assert!(
        e.starts_with("model.init_from = ") && e.contains("n_layers 2 (the run's [model]: 3)"),
        "{e}"
    );
    let missing = tmp.path().join("nothing-here");
    let none = format!("model.init_from=\"{}\"", missing.display());
    let e = format!(
        "{:#}",
        train::<B>(
            &short_run(tmp.path(), "fourth", &[&none]),
            &device,
            &options
        )
        .unwrap_err()
    );
    assert!(
        e.starts_with(&format!(
            "cannot load the model of model.init_from = {}",
            missing.display()
        )) && e.contains("config.json"),
        "{e}"
    );
}
