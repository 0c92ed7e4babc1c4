//! A run that dies continues exactly where it stopped: a real `mixlm train` process
//! is killed (`SIGKILL` at a random step, or `SIGTERM`), resumed with
//! `mixlm train --resume`, and its `metrics.jsonl` must equal, to the bit, that of an
//! uninterrupted run with the same seed (timing fields aside): every step once, the
//! same losses, gradient norms, proportions and evaluations.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn mixlm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mixlm"))
}

/// `train` arguments for a run of the tiny demo model named `name` in `dir`.
fn train_args(dir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let out = format!("run.out_dir=\"{}\"", dir.display());
    let name = format!("run.name=\"{name}\"");
    let mut args = vec!["train".to_string(), "--quiet".to_string()];
    let sets = [
        out.as_str(),
        name.as_str(),
        "run.steps=48",
        "run.batch_size=8",
        "run.seq_len=32",
        "schedule.warmup_steps=4",
        "eval.every=8",
        "eval.sequences=8",
        "checkpoint.every=3",
        "checkpoint.keep=2",
    ];
    for s in sets.iter().chain(extra) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args
}

/// Waits until the run has logged step `step`, and returns the step it had reached.
fn wait_for_step(child: &mut Child, run_dir: &Path, step: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let reached = common::last_step(run_dir);
        if reached >= step {
            return reached;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run exited ({status}) before step {step}");
        }
        assert!(Instant::now() < deadline, "step {step} not reached in time");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A step in `range`, different on every test run (printed, so a failure can be
/// reproduced with `MIXLM_KILL_STEP`).
fn random_step(candidates: &[u64]) -> u64 {
    if let Some(step) = std::env::var("MIXLM_KILL_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return step;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as usize;
    candidates[nanos % candidates.len()]
}

/// Sends SIGTERM (as a scheduler's preemption does) and waits: the output and stderr.
#[cfg(unix)]
fn terminate(child: Child) -> (std::process::Output, String) {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// Resumes `run_dir` to the end and returns the step its checkpoint was at.
fn resume(run_dir: &Path) -> u64 {
    let out = mixlm()
        .args(["train", "--quiet", "--resume"])
        .arg(run_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "resume failed: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("resuming "))
        .unwrap_or_else(|| panic!("no `resuming` line in: {stderr}"));
    line.rsplit("step-").next().unwrap().parse().unwrap()
}

/// Trains `extra`'s run once uninterrupted and once killed with SIGKILL after a
/// random step of `kill_after` and resumed; returns (killed at, resumed from).
fn kill_and_resume(label: &str, extra: &[&str], kill_after: &[u64]) -> (u64, u64, PathBuf) {
    let tmp = tempfile::tempdir().unwrap().keep();
    let status = mixlm()
        .args(train_args(&tmp, "whole", extra))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    let step = random_step(kill_after);
    let run_dir = tmp.join("killed");
    let mut child = mixlm()
        .args(train_args(&tmp, "killed", extra))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reached = wait_for_step(&mut child, &run_dir, step);
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "{label}: the run finished before it was killed"
    );
    eprintln!("{label}: killed at step {reached} (MIXLM_KILL_STEP={step})");

    let from = resume(&run_dir);
    assert!(from <= reached && from > 0, "{label}: resumed from {from}");
    let (whole, resumed) = (
        common::metrics(&tmp.join("whole")),
        common::metrics(&run_dir),
    );
    assert_eq!(whole.len(), resumed.len(), "{label}: number of records");
    for (a, b) in whole.iter().zip(&resumed) {
        assert_eq!(a, b, "{label}: killed at {reached}, resumed from {from}");
    }
    (reached, from, tmp)
}

#[test]
fn stratified_run_killed_at_a_random_step_resumes_exactly() {
    let candidates: Vec<u64> = (4..40).collect();
    let (_, _, tmp) = kill_and_resume("stratified", &[], &candidates);
    // Only the newest `checkpoint.keep = 2` checkpoints are left.
    let left: Vec<String> = std::fs::read_dir(tmp.join("killed/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    std::fs::remove_dir_all(tmp).unwrap();
}

#[test]
fn odm_run_killed_at_a_random_step_resumes_exactly() {
    let extra = [
        "mixing.method=\"odm\"",
        "mixing.variant=\"official\"",
        "mixing.alpha=0.5",
    ];
    let candidates: Vec<u64> = (4..40).collect();
    let (_, _, tmp) = kill_and_resume("odm", &extra, &candidates);
    std::fs::remove_dir_all(tmp).unwrap();
}

/// Two peers under ZeRO-2, killed at a random step: the checkpoint's moments were
/// gathered from both peers' slices, and each peer reads its own back.
#[test]
fn sharded_two_peer_run_killed_at_a_random_step_resumes_exactly() {
    let extra = [
        "distributed.devices=2",
        "distributed.shard=\"gradients\"",
        "distributed.bucket_mb=0",
        "mixing.method=\"odm\"",
    ];
    let candidates: Vec<u64> = (4..40).collect();
    let (_, _, tmp) = kill_and_resume("sharded", &extra, &candidates);
    std::fs::remove_dir_all(tmp).unwrap();
}

/// Aioli's rounds here are 20 steps, LearnParams taking the first 10 (5 groups x
/// 2 steps): the run is killed so that the checkpoint it resumes from lies inside a
/// LearnParams segment, with loss drops of part of the groups measured.
#[test]
fn aioli_run_killed_inside_learn_params_resumes_exactly() {
    let extra = [
        "mixing.method=\"aioli\"",
        "mixing.eta=1.0",
        "mixing.update_steps=20",
        "mixing.lp_rounds=1",
        "mixing.lp_steps=2",
    ];
    // Checkpoints every 3 steps: 3, 6, 9 and 21, 24, 27 are inside LearnParams.
    let candidates = [4, 5, 6, 7, 8, 9, 22, 23, 24, 25, 26, 27, 28];
    let (reached, from, tmp) = kill_and_resume("aioli", &extra, &candidates);
    let in_learn_params = from % 20 < 10;
    // A kill that overshot into the training part of a round proves less; say so.
    if !in_learn_params {
        eprintln!("aioli: killed at {reached}, resumed from {from}, after LearnParams");
    }
    assert!(
        in_learn_params || reached >= 10,
        "resumed from {from} outside LearnParams"
    );
    std::fs::remove_dir_all(tmp).unwrap();
}

/// SIGTERM (as a scheduler's preemption sends it): the step finishes, a checkpoint is
/// written, the process exits 0 saying how to resume; the resumed run is exact.
#[test]
#[cfg(unix)]
fn sigterm_checkpoints_exits_zero_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(mixlm()
        .args(train_args(tmp.path(), "whole", &[]))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success());
    let run_dir = tmp.path().join("stopped");
    let mut child = mixlm()
        .args(train_args(tmp.path(), "stopped", &[]))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_step(&mut child, &run_dir, 7);
    let (out, stderr) = terminate(child);
    assert!(out.status.success(), "exit status {}: {stderr}", out.status);
    let line = stderr
        .lines()
        .find(|l| l.contains("continue with: mixlm train --resume"))
        .unwrap_or_else(|| panic!("no resume hint in: {stderr}"));
    let stopped: u64 = line
        .split("after step ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(stopped < 48, "{line}");
    assert_eq!(common::last_step(&run_dir), stopped);
    assert_eq!(
        resume(&run_dir),
        stopped,
        "resumes from the SIGTERM checkpoint"
    );
    assert_eq!(
        common::metrics(&tmp.path().join("whole")),
        common::metrics(&run_dir)
    );
}

/// A corrupted newest checkpoint is detected by its checksum, named, and the run
/// resumes from the one before, still exactly.
#[test]
fn corrupt_checkpoint_is_named_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    assert!(mixlm()
        .args(train_args(dir, "whole", &["run.steps=12"]))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success());
    // The same run with checkpoints at 3, 6 and 9 only, as if it had died after step 11.
    let broken = [
        "run.steps=12",
        "checkpoint.keep=0",
        "checkpoint.save_final=false",
    ];
    assert!(mixlm()
        .args(train_args(dir, "broken", &broken))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success());
    let run_dir = dir.join("broken");
    let weights = run_dir.join("checkpoints/step-00000009/model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40; // one flipped bit
    std::fs::write(&weights, &bytes).unwrap();

    let out = mixlm()
        .args(["train", "--quiet", "--resume"])
        .arg(&run_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("step-00000009/model.safetensors does not match its SHA-256"),
        "{stderr}"
    );
    assert!(
        stderr.contains("resuming") && stderr.contains("checkpoints/step-00000006"),
        "{stderr}"
    );
    assert_eq!(
        common::metrics(&dir.join("whole")),
        common::metrics(&run_dir)
    );
}

#[test]
fn resume_refuses_changes_that_make_another_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = mixlm()
        .args(train_args(tmp.path(), "r", &["run.steps=6"]))
        .output()
        .unwrap();
    assert!(out.status.success());
    let run_dir = tmp.path().join("r");
    let refused = |args: &[&str]| -> String {
        let out = mixlm()
            .args(["train", "--resume"])
            .arg(&run_dir)
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    let e = refused(&["--set", "optimizer.lr=0.1"]);
    assert!(
        e.starts_with("error: --set optimizer.lr: cannot change on resume") && !e.contains('\n'),
        "{e}"
    );
    let e = refused(&[]);
    assert!(
        e.contains("already finished") && e.contains("--set run.steps=N"),
        "{e}"
    );
    let e = refused(&["--set", "run.steps=5"]);
    assert!(e.contains("already finished"), "{e}");
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = mixlm()
        .args(["train", "--resume"])
        .arg(&empty)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("has no checkpoint to resume or evaluate"), "{e}");
}

/// A comparison stopped by SIGTERM says how to continue; killed later with SIGKILL,
/// it is run again and continues its interrupted run from that run's last checkpoint
/// (the finished one is skipped): every run's metrics and evaluation equal those of
/// an uninterrupted comparison.
#[test]
#[cfg(unix)]
fn an_interrupted_comparison_continues_its_run_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str| {
        let out = tmp.path().join(name);
        let file = tmp.path().join(format!("{name}.toml"));
        let text = format!(
            r#"out_dir = "{}"
seeds = [0]
set = ["run.steps=48", "run.batch_size=8", "run.seq_len=32", "schedule.warmup_steps=4",
       "eval.every=8", "eval.sequences=8", "checkpoint.every=3", "checkpoint.keep=2"]

[[method]]
name = "stratified"
mixing = {{ method = "stratified" }}

[[method]]
name = "odm"
mixing = {{ method = "odm", variant = "official", alpha = 0.5 }}
"#,
            out.display()
        );
        std::fs::write(&file, text).unwrap();
        (file, out)
    };
    let compare = |file: &Path| {
        let mut c = mixlm();
        c.args(["compare", "--quiet"]).arg(file);
        c
    };
    let (whole_file, whole) = write("whole");
    let out = compare(&whole_file).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (file, dir) = write("stopped");
    let odm = dir.join("odm-s0");
    let mut child = compare(&file).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_step(&mut child, &odm, 5);
    let (out, stderr) = terminate(child);
    assert!(
        !out.status.success(),
        "an unfinished comparison is no success"
    );
    let stopped = common::last_step(&odm);
    assert!(
        stderr.contains(&format!(
            "odm-s0 stopped after step {stopped} with a checkpoint; run the same command \
             again to continue it"
        )),
        "{stderr}"
    );

    // At least one checkpoint (every 3 steps) strictly between the stop and the kill:
    // the kill may land after a step's metrics line and before its checkpoint.
    let step = random_step(&(stopped + 4..40).collect::<Vec<_>>());
    let mut child = compare(&file).stderr(Stdio::null()).spawn().unwrap();
    let reached = wait_for_step(&mut child, &odm, step);
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success(), "finished before the kill");
    eprintln!("compare: killed at step {reached} (MIXLM_KILL_STEP={step})");

    let out = compare(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("stratified-s0 is done, skipped"),
        "{stderr}"
    );
    let resumed = stderr
        .lines()
        .find(|l| l.starts_with("resuming "))
        .unwrap_or_else(|| panic!("no `resuming` line in: {stderr}"));
    let from: u64 = resumed.rsplit("step-").next().unwrap().parse().unwrap();
    assert!(from > stopped && from <= reached, "{resumed}");

    let results = |out: &Path| -> serde_json::Value {
        let text = std::fs::read_to_string(out.join("compare/results.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let mut eval = r["eval"].clone();
                eval.as_object_mut().unwrap().remove("checkpoint"); // in its own folder
                serde_json::json!([r["method"], r["steps"], eval])
            })
            .collect()
    };
    assert_eq!(results(&whole), results(&dir));
    for run in ["stratified-s0", "odm-s0"] {
        assert_eq!(
            common::metrics(&whole.join(run)),
            common::metrics(&dir.join(run)),
            "{run}"
        );
    }
}

/// What a refused writer printed: it failed, in one line naming the folder and the
/// PID that holds it.
fn refused_for(out: std::process::Output, run_dir: &Path, holder: u32) {
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success(), "a second writer ran: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ")
            && last.contains(&format!("{} is in use by another mixlm", run_dir.display()))
            && last.contains(&format!("PID {holder}, mixlm train"))
            && last.contains(&format!("kill {holder}")),
        "{stderr}"
    );
}

/// Two `mixlm train` of one run folder, the second started a second after the first,
/// then a `--resume` of the live run: both are refused, naming the folder and the
/// first's PID, and the first run's `metrics.jsonl` holds every step exactly once.
/// Then a run killed with SIGKILL leaves its lock file, which blocks nothing.
#[test]
fn a_second_writer_of_a_live_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("live");
    // Long enough to be alive through the refusals and the doctor below.
    let args = train_args(tmp.path(), "live", &["run.steps=120"]);
    let mut first = mixlm().args(&args).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(first.try_wait().unwrap().is_none(), "the first run ended");
    refused_for(mixlm().args(&args).output().unwrap(), &run_dir, first.id());
    // With a checkpoint written, a resume would find something to continue.
    wait_for_step(&mut first, &run_dir, 4);
    let resumed = mixlm()
        .args(["train", "--quiet", "--resume"])
        .arg(&run_dir)
        .output()
        .unwrap();
    refused_for(resumed, &run_dir, first.id());
    // A reader takes no lock: doctor reads the live run, saying who writes it.
    let (_, out, err) = common::mixlm(&["doctor", run_dir.to_str().unwrap()]);
    assert!(
        out.contains(&format!(
            "is being written by PID {}, mixlm train",
            first.id()
        )) && !err.contains("in use by another mixlm"),
        "{out}{err}"
    );
    assert!(first.wait().unwrap().success());
    let records = common::metrics(&run_dir);
    let steps: Vec<u64> = records
        .iter()
        .filter(|r| r["kind"] == "train")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=120).collect::<Vec<_>>(), "every step once");

    // A lock left by a killed process blocks nothing.
    let killed = tmp.path().join("killed");
    let mut child = mixlm()
        .args(train_args(tmp.path(), "killed", &[]))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_step(&mut child, &killed, 4);
    child.kill().unwrap();
    child.wait().unwrap();
    let holder = std::fs::read_to_string(killed.join(".mixlm.lock")).unwrap();
    assert_eq!(holder, format!("PID {}, mixlm train\n", child.id()));
    assert!(resume(&killed) >= 3);
}

/// Chaos: one run killed with SIGKILL ten times, each time in a part of the run
/// chosen at random (an optimizer step, an evaluation, half-way through a metrics
/// line, inside a checkpoint's write, between the checkpoint folder's rename and the
/// rewrite of `latest`, before older checkpoints are pruned) and at a random arrival
/// there, and resumed after each kill. The process stops at the chosen point through
/// the trainer's test hook (`MIXLM_TEST_PAUSE`, see `mixlm_train::chaos`) and is
/// killed there from outside. Its final `metrics.jsonl` equals an uninterrupted run's
/// to the bit (timing fields aside), and `mixlm doctor` passes on the folder.
#[test]
#[cfg(unix)]
fn a_run_killed_ten_times_in_every_part_ends_like_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let sets = ["run.steps=60", "eval.every=8"];
    assert!(mixlm()
        .args(train_args(dir, "whole", &sets))
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success());
    let seed: u64 = std::env::var("MIXLM_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("chaos: MIXLM_CHAOS_SEED={seed}");
    let mut state = seed | 1;
    let mut next = |n: u64| {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    // The first kill comes after a whole checkpoint, so that every later start is a
    // resume; then every other part at least once, in a random order.
    let mut points = vec![
        "step",
        "step",
        "eval",
        "eval",
        "metrics-line",
        "metrics-line",
        "checkpoint-files",
        "checkpoint-renamed",
        "checkpoint-renamed",
    ];
    for i in (1..points.len()).rev() {
        points.swap(i, next(i as u64 + 1) as usize);
    }
    points.insert(0, "checkpoint-latest");
    let run_dir = dir.join("chaos");
    let marker = dir.join("paused");
    for (kill, point) in points.iter().enumerate() {
        // Evaluations come every 8 steps: the first one keeps the run short of its end.
        let nth = if *point == "eval" { 1 } else { 1 + next(2) };
        let mut command = mixlm();
        match kill {
            0 => command.args(train_args(dir, "chaos", &sets)),
            _ => command.args(["train", "--quiet", "--resume"]).arg(&run_dir),
        };
        let pause = format!("{point}:{nth}:{}", marker.display());
        let mut child = command
            .env("MIXLM_TEST_PAUSE", &pause)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        while !marker.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("kill {kill} ({pause}, seed {seed}): the run exited ({status}) first");
            }
            assert!(
                Instant::now() < deadline,
                "kill {kill}: {pause} not reached"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let at = common::last_step(&run_dir);
        child.kill().unwrap(); // SIGKILL
        assert!(!child.wait().unwrap().success());
        std::fs::remove_file(&marker).unwrap();
        eprintln!("chaos: kill {kill} at {point} #{nth}, after step {at}");
    }
    resume(&run_dir);
    assert_eq!(
        common::metrics(&dir.join("whole")),
        common::metrics(&run_dir),
        "seed {seed}"
    );
    let (ok, out, err) = common::mixlm(&["doctor", run_dir.to_str().unwrap()]);
    assert!(ok, "seed {seed}: {out}{err}");
}
