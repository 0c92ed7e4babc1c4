//! Data-parallel training with ndarray peers in one process: N peers with micro-batch
//! b and A accumulation steps train like one device with micro-batch b and N x A
//! accumulation steps (the same global batch, the same sequences), and every peer
//! decides the same proportions.

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;
use mixlm_train::checkpoint::{latest_checkpoint, load_model};
use mixlm_train::{train, RunConfig, TrainOptions};
use serde_json::Value;

type B = Autodiff<NdArray<f32>>;

fn config(dir: &Path, name: &str, devices: usize, accum: usize, extra: &[&str]) -> RunConfig {
    let mut overrides: Vec<String> = vec![
        format!("run.out_dir=\"{}\"", dir.display()),
        format!("run.name=\"{name}\""),
        "run.steps=5".into(),
        "run.batch_size=2".into(),
        format!("run.grad_accum={accum}"),
        format!("distributed.devices={devices}"),
        "run.seq_len=16".into(),
        "schedule.warmup_steps=1".into(),
        "eval.every=0".into(),
        "eval.sequences=4".into(),
        "eval.batch_size=8".into(),
        "checkpoint.every=0".into(),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    RunConfig::embedded(&overrides).unwrap()
}

/// Every parameter of a model, flattened, in module order.
fn flatten<Bk: burn::tensor::backend::Backend, M: Module<Bk>>(model: &M) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl<Bk: burn::tensor::backend::Backend> ModuleVisitor<Bk> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<Bk, D>>) {
            self.0
                .extend(param.val().into_data().to_vec::<f32>().unwrap());
        }
    }
    let mut c = Collect(Vec::new());
    model.visit(&mut c);
    c.0
}

/// The parameters of a run's final checkpoint, and the initial ones (the trainer
/// draws them from `run.seed` in parameter order).
fn parameters(run_dir: &Path, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let device = Default::default();
    let (model, config) =
        load_model::<NdArray<f32>>(&latest_checkpoint(run_dir).unwrap(), &device).unwrap();
    <B as burn::tensor::backend::Backend>::seed(&device, seed);
    let init = mixlm_train::distributed::materialize(config.init::<B>(&device));
    (flatten(&model), flatten(&init))
}

fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn train_records(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .collect()
}

/// A per-domain field of a metrics record (`proportions`, `domain_weights`), empty
/// when the record has none.
fn by_domain(record: &Value, field: &str) -> BTreeMap<String, f64> {
    record[field]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect()
}

/// Trains `peers` x accumulation `accum` and one device with `peers * accum`, and
/// compares the parameters, the losses, the proportions and (to `weights_tolerance`)
/// the loss weights step by step.
/// Returns the folder holding the runs (`parallel`, `single`).
fn matches_one_device(
    peers: usize,
    accum: usize,
    mixing: &[&str],
    weights_tolerance: f64,
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let options = TrainOptions::quiet();
    let device = Default::default();
    let parallel = train::<B>(
        &config(dir.path(), "parallel", peers, accum, mixing),
        &device,
        &options,
    )
    .unwrap();
    let single = train::<B>(
        &config(dir.path(), "single", 1, peers * accum, mixing),
        &device,
        &options,
    )
    .unwrap();
    assert_eq!(parallel.steps, 5);
    assert_eq!(parallel.rows.len(), single.rows.len());

    let (a, b) = (
        train_records(&parallel.run_dir),
        train_records(&single.run_dir),
    );
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        // Token counts are global: the same global batch.
        assert_eq!(x["tokens"], y["tokens"]);
        // A NaN loss (a skipped step) is written as null.
        let (lx, ly) = (x["loss"].as_f64(), y["loss"].as_f64());
        assert!(
            lx.zip(ly).map_or(lx == ly, |(a, b)| (a - b).abs() < 1e-5),
            "step {}: loss {lx:?} vs {ly:?}",
            x["step"]
        );
        for (field, tolerance) in [("proportions", 1e-9), ("domain_weights", weights_tolerance)] {
            let (px, py) = (by_domain(x, field), by_domain(y, field));
            assert_eq!(px.len(), py.len(), "{field}");
            // A weights tolerance is given for the methods that weigh domains.
            assert!(field == "proportions" || px.is_empty() == (weights_tolerance == 0.0));
            for (d, p) in &px {
                assert!(
                    (p - py[d]).abs() <= tolerance,
                    "step {}: {field} of {d} {p} vs {}",
                    x["step"],
                    py[d]
                );
            }
        }
        // Every domain's count of sequences is the global batch's.
        assert_eq!(x["sequences"], y["sequences"]);
    }

    let seed = config(dir.path(), "x", 1, 1, mixing).run.seed;
    let (pa, init) = parameters(&parallel.run_dir, seed);
    let (pb, _) = parameters(&single.run_dir, seed);
    assert_eq!(pa.len(), pb.len());
    // Float sums in another order, amplified by AdamW where gradients are tiny: the
    // difference must stay a small fraction of how far training moved the weights.
    let relative = distance(&pa, &pb) / distance(&pb, &init);
    eprintln!("{peers} peers x {accum}: parameters {relative:e} (relative) from one device's");
    assert!(
        relative < 1e-3,
        "{peers} peers vs one device: parameters differ by {relative:e} of the training's movement"
    );
    // Peers other than peer 0 write nothing: one metrics file, one set of checkpoints.
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        2,
        "only the two run folders"
    );
    dir
}

/// A NaN step under `faults.on_nan = "rollback"` with two peers: peer 0 names the
/// checkpoint, both reload it, and the run goes on like one device's rolled-back run.
#[test]
fn two_peers_roll_back_like_one_device() {
    let rollback = [
        "faults.on_nan=\"rollback\"",
        "faults.inject_nan_steps=[4]",
        "checkpoint.every=2",
    ];
    let dir = matches_one_device(2, 1, &rollback, 0.0);
    for run in ["parallel", "single"] {
        let faults = std::fs::read_to_string(dir.path().join(run).join("faults.jsonl")).unwrap();
        let f: Value = serde_json::from_str(faults.lines().next().unwrap()).unwrap();
        assert_eq!(
            (&f["action"], &f["rolled_back_to"]),
            (&"rolled_back".into(), &2.into())
        );
    }
}

#[test]
fn two_peers_train_like_one_device_stratified() {
    matches_one_device(2, 1, &["mixing.method=\"stratified\""], 0.0);
}

#[test]
fn three_peers_train_like_one_device_stratified() {
    matches_one_device(3, 2, &["mixing.method=\"stratified\""], 0.0);
}

#[test]
fn two_peers_train_like_one_device_odm() {
    matches_one_device(2, 2, &["mixing.method=\"odm\""], 0.0);
}

#[test]
fn three_peers_train_like_one_device_odm() {
    matches_one_device(3, 1, &["mixing.method=\"odm\""], 0.0);
}

/// DoGE's per-domain gradients and validation target are summed over the peers: the
/// Gram matrix, hence the domain weights and the update, are the global batch's.
/// (The weights differ from one device's only by f32 sums in another order, which
/// DoGE's `exp(score / mu)` amplifies.)
#[test]
fn two_peers_train_like_one_device_doge() {
    let doge = [
        "mixing.method=\"doge\"",
        "mixing.val_sequences=3",
        "mixing.mu=0.1",
    ];
    matches_one_device(2, 1, &doge, 1e-5);
}

#[test]
fn three_peers_train_like_one_device_doge_on_the_train_target() {
    let doge = ["mixing.method=\"doge\"", "mixing.target=\"train\""];
    matches_one_device(3, 1, &doge, 1e-5);
}

/// `distributed.always_collective` sends a one-device run through the collective
/// path (a collective of one): what it computes is the plain path's, to the bit, so
/// timing the two measures the machinery's cost alone.
#[test]
fn one_peer_through_the_collective_trains_like_the_plain_path() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let c = config(dir.path(), name, 1, 2, extra);
        train::<B>(&c, &Default::default(), &TrainOptions::quiet()).unwrap()
    };
    let odm = "mixing.method=\"odm\"";
    let plain = run("plain", &[odm]);
    let collective = run("collective", &[odm, "distributed.always_collective=true"]);
    let (a, b) = (
        train_records(&plain.run_dir),
        train_records(&collective.run_dir),
    );
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["loss"], y["loss"]);
        assert_eq!(x["proportions"], y["proportions"]);
    }
    let seed = config(dir.path(), "x", 1, 1, &[]).run.seed;
    assert_eq!(
        parameters(&plain.run_dir, seed).0,
        parameters(&collective.run_dir, seed).0
    );
}

/// Three peers repeat to the bit, whether gradients are all-reduced in buckets or
/// one parameter at a time (the same sums, element by element, in peer order: before
/// mixlm's patch to burn-collective the order of a sum of three followed a hash map's
/// random iteration, and this failed).
#[test]
fn three_peers_repeat_to_the_bit_whatever_the_bucketing() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, bucket_mb: &str| {
        let c = config(dir.path(), name, 3, 1, &[bucket_mb]);
        let out = train::<B>(&c, &Default::default(), &TrainOptions::quiet()).unwrap();
        parameters(&out.run_dir, c.run.seed).0
    };
    let bucketed = run("bucketed", "distributed.bucket_mb=25");
    assert_eq!(bucketed, run("per-parameter", "distributed.bucket_mb=0"));
}

/// The same on a GPU backend (CubeCL on wgpu; Mesa's lavapipe in CI), without Burn's
/// fusion layer, which hides the bug: the collective's server thread computes the
/// results, and before mixlm's patch to burn-collective a peer could read a result
/// that thread had queued but not yet run (the run drifted from step 2 on).
#[cfg(feature = "wgpu")]
#[test]
fn one_wgpu_peer_through_the_collective_trains_like_the_plain_path() {
    if !mixlm_model::vulkan_driver_installed() {
        return;
    }
    type Gpu = Autodiff<burn_wgpu::CubeBackend<burn_wgpu::WgpuRuntime, f32, i32, u32>>;
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let c = config(dir.path(), name, 1, 2, extra);
        let out = train::<Gpu>(&c, &Default::default(), &TrainOptions::quiet()).unwrap();
        train_records(&out.run_dir)
            .iter()
            .map(|r| r["loss"].as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let plain = run("plain", &[]);
    assert_eq!(plain.len(), 5);
    assert_eq!(
        plain,
        run("collective", &["distributed.always_collective=true"])
    );
}

/// A run trained on two peers resumes on two, and is refused on another count with
/// the reason.
#[test]
fn resume_needs_the_same_number_of_peers() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), "r", 2, 1, &["checkpoint.every=2"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let options = TrainOptions {
        stop: Some(stop),
        ..TrainOptions::quiet()
    };
    let out = train::<B>(&c, &Default::default(), &options).unwrap();
    assert!(out.interrupted && out.steps == 1, "{out:?}");
    let resume = TrainOptions {
        start: mixlm_train::Start::Resume,
        ..TrainOptions::quiet()
    };
    c.distributed.devices = 3;
    let e = format!(
        "{:#}",
        train::<B>(&c, &Default::default(), &resume).unwrap_err()
    );
    assert!(
        e.contains("trained on 2 data-parallel peer(s)") && e.contains("--devices 2"),
        "{e}"
    );
    c.distributed.devices = 2;
    let out = train::<B>(&c, &Default::default(), &resume).unwrap();
    assert_eq!(out.steps, 5);
    assert_eq!(out.resumed_from, Some(1));
}

// ZeRO sharding (`distributed.shard`): the same training as one device, whatever the
// peers split between them. `bucket_mb = 0` makes every parameter a bucket of its own,
// so every matrix is cut between the peers; the default (25 MB) holds this model in
// one bucket, cut once.

const OPTIMIZER: &str = "distributed.shard=\"optimizer\"";
const GRADIENTS: &str = "distributed.shard=\"gradients\"";
const PER_PARAMETER: &str = "distributed.bucket_mb=0";

#[test]
fn two_peers_sharding_the_optimizer_train_like_one_device() {
    matches_one_device(2, 1, &[OPTIMIZER, "mixing.method=\"odm\""], 0.0);
}

#[test]
fn three_peers_sharding_the_optimizer_per_parameter_train_like_one_device() {
    matches_one_device(3, 2, &[OPTIMIZER, PER_PARAMETER], 0.0);
}

#[test]
fn two_peers_sharding_gradients_train_like_one_device() {
    matches_one_device(
        2,
        2,
        &[GRADIENTS, PER_PARAMETER, "mixing.method=\"odm\""],
        0.0,
    );
}

#[test]
fn three_peers_sharding_gradients_train_like_one_device() {
    matches_one_device(3, 1, &[GRADIENTS, "mixing.method=\"stratified\""], 0.0);
}

/// Stage 1 changes no bit: the same all-reduced gradient, the same norm, the same
/// element-wise update of each slice, and a gather that adds only zeros.
#[test]
fn sharding_the_optimizer_changes_no_bit() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let c = config(dir.path(), name, 3, 1, extra);
        train::<B>(&c, &Default::default(), &TrainOptions::quiet())
            .unwrap()
            .run_dir
    };
    let odm = "mixing.method=\"odm\"";
    let plain = run("plain", &[odm]);
    let sharded = run("sharded", &[odm, OPTIMIZER, PER_PARAMETER]);
    let seed = config(dir.path(), "x", 1, 1, &[]).run.seed;
    same_training(&plain, &sharded, seed, true);
}

/// DoGE keeps whole gradients: its optimizer state may be sharded.
#[test]
fn two_peers_sharding_the_optimizer_train_like_one_device_doge() {
    let doge = [
        OPTIMIZER,
        PER_PARAMETER,
        "mixing.method=\"doge\"",
        "mixing.val_sequences=3",
        "mixing.mu=0.1",
    ];
    matches_one_device(2, 1, &doge, 1e-5);
}

/// A NaN step rolls back a sharded run like one device's: the checkpoint's whole
/// moments are cut to each peer's slices again.
#[test]
fn two_peers_sharding_gradients_roll_back_like_one_device() {
    let rollback = [
        GRADIENTS,
        PER_PARAMETER,
        "faults.on_nan=\"rollback\"",
        "faults.inject_nan_steps=[4]",
        "checkpoint.every=2",
    ];
    matches_one_device(2, 1, &rollback, 0.0);
}

/// A NaN loss under `faults.on_nan = "skip"` skips the step on every peer alike.
#[test]
fn two_peers_sharding_gradients_skip_like_one_device() {
    let skip = [
        GRADIENTS,
        "faults.on_nan=\"skip\"",
        "faults.inject_nan_steps=[3]",
    ];
    matches_one_device(2, 1, &skip, 0.0);
}

/// Aioli's validation-driven updates under ZeRO-2, with three peers.
#[test]
fn three_peers_sharding_gradients_train_like_one_device_aioli() {
    let aioli = [
        GRADIENTS,
        PER_PARAMETER,
        "mixing.method=\"aioli\"",
        "mixing.eta=1.0",
        "mixing.update_steps=6",
        "mixing.lp_rounds=1",
        "mixing.lp_steps=1",
    ];
    matches_one_device(3, 1, &aioli, 0.0);
}

/// Every parameter's losses, proportions and final parameters of two runs, equal to
/// the bit (`exact`) or within rounding.
fn same_training(a: &Path, b: &Path, seed: u64, exact: bool) {
    let (x, y) = (train_records(a), train_records(b));
    assert_eq!(x.len(), y.len());
    for (x, y) in x.iter().zip(&y) {
        assert_eq!(x["step"], y["step"]);
        assert_eq!(x["proportions"], y["proportions"]);
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        match exact {
            true => assert_eq!(lx, ly, "step {}", x["step"]),
            false => assert!((lx - ly).abs() < 1e-5, "step {}: {lx} vs {ly}", x["step"]),
        }
    }
    let ((pa, init), (pb, _)) = (parameters(a, seed), parameters(b, seed));
    match exact {
        true => assert!(pa == pb, "the parameters differ"),
        false => {
            let relative = distance(&pa, &pb) / distance(&pb, &init);
            assert!(relative < 1e-3, "parameters differ by {relative:e}");
        }
    }
}

/// Runs `c` with a stop request, which ends it after step 1 with a checkpoint.
fn stopped_after_one_step(c: &RunConfig) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let options = TrainOptions {
        stop: Some(stop),
        ..TrainOptions::quiet()
    };
    let out = train::<B>(c, &Default::default(), &options).unwrap();
    assert!(out.interrupted && out.steps == 1, "{out:?}");
}

fn resumed(c: &RunConfig) -> mixlm_train::TrainOutcome {
    let options = TrainOptions {
        start: mixlm_train::Start::Resume,
        ..TrainOptions::quiet()
    };
    train::<B>(c, &Default::default(), &options).unwrap()
}

/// A sharded run stopped and resumed continues exactly as it would have.
#[test]
fn a_sharded_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let extra = [GRADIENTS, PER_PARAMETER, "mixing.method=\"odm\""];
    let whole = config(dir.path(), "whole", 2, 1, &extra);
    let whole_run = train::<B>(&whole, &Default::default(), &TrainOptions::quiet()).unwrap();
    let cut = config(dir.path(), "cut", 2, 1, &extra);
    stopped_after_one_step(&cut);
    let out = resumed(&cut);
    assert_eq!((out.steps, out.resumed_from), (5, Some(1)));
    same_training(&whole_run.run_dir, &out.run_dir, whole.run.seed, true);
}

/// A checkpoint of two sharded peers, with 3 micro-batches each per step, resumes on
/// three with 2 each (the same 6 micro-batches a step, so the same sequences): the
/// moments are cut anew for three, and the run continues as the two-peer run does,
/// within rounding (the peers sum in another grouping).
#[test]
fn a_two_peer_sharded_checkpoint_resumes_on_three_peers() {
    let dir = tempfile::tempdir().unwrap();
    let extra = [GRADIENTS, PER_PARAMETER, "run.batch_size=1"];
    let two = config(dir.path(), "two", 2, 3, &extra);
    let two_run = train::<B>(&two, &Default::default(), &TrainOptions::quiet()).unwrap();
    let mut moved = config(dir.path(), "moved", 2, 3, &extra);
    stopped_after_one_step(&moved);
    // Three peers with the same accumulation would be another global batch.
    moved.distributed.devices = 3;
    let e = format!(
        "{:#}",
        train::<B>(
            &moved,
            &Default::default(),
            &TrainOptions {
                start: mixlm_train::Start::Resume,
                ..TrainOptions::quiet()
            }
        )
        .unwrap_err()
    );
    assert!(
        e.contains("6 micro-batches") && e.contains("--set run.grad_accum=2"),
        "{e}"
    );
    moved.run.grad_accum = 2;
    let out = resumed(&moved);
    assert_eq!((out.steps, out.resumed_from), (5, Some(1)));
    same_training(&two_run.run_dir, &out.run_dir, two.run.seed, false);
}

/// A peer holds 1/N of the unsharded optimizer state, plus at most one bucket (here:
/// a few elements, one per bucket, from cutting each into N).
#[test]
fn a_peer_holds_its_share_of_the_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, peers: usize, extra: &[&str]| {
        let c = config(dir.path(), name, peers, 1, extra);
        train::<B>(&c, &Default::default(), &TrainOptions::quiet())
            .unwrap()
            .optimizer_bytes
    };
    let whole = run("whole", 2, &[PER_PARAMETER]);
    assert!(whole > 0);
    // With one bucket per parameter, cutting each into N leaves up to one element
    // (8 bytes of moments) of slack per parameter.
    let (model, _) = load_model::<NdArray<f32>>(
        &latest_checkpoint(&dir.path().join("whole")).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let params = mixlm_train::distributed::shard::param_shapes(&model).len();
    for (peers, shard) in [(2, OPTIMIZER), (3, GRADIENTS)] {
        for bucket in [PER_PARAMETER, "distributed.bucket_mb=25"] {
            let name = format!("{peers}-{}", bucket.len());
            let bytes = run(&name, peers, &[shard, bucket]);
            let share = whole / peers;
            eprintln!("{peers} peers, {shard}, {bucket}: {bytes} bytes of {whole}");
            assert!(
                bytes >= share.saturating_sub(8 * params),
                "{bytes} < {share}"
            );
            assert!(bytes <= share + 8 * params, "{bytes} > {share}");
        }
    }
}
